"""The Chubby cell in simulation (see docs/simulation.md, "The Chubby cell in
simulation"): real replicas (RaftNode + CellService) on the simulated disk
and network, simulated Chubby clients over simulated links, a fenced
resource, and the lock, session, ephemeral and node-operation checkers.

Entry points: `swarm.run_cell_sim(seed)`, `cluster.open_cell_cluster(config,
seed)` for scripted scenarios (under `determinism.run_deterministic`), and
`python -m chubbyfs.sim.cell run|replay|sweep`.
"""
