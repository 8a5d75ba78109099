"""Checkers over simulated runs: linearizability (`wgl`), Raft white-box
invariants (`raft_invariants`) and durability of acknowledged writes
(`durability`)."""
