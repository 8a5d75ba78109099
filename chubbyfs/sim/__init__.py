"""Deterministic simulation of a chubbyfs cell (see docs/simulation.md).

Entry points: `swarm.run_sim(seed)` for one seeded swarm run,
`cluster.open_cluster(config, seed)` for scripted scenarios (under
`determinism.run_deterministic`), and `python -m chubbyfs.sim run|replay|sweep`.
"""
