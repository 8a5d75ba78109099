"""Helpers that run real chubbyfs processes, shared by end-to-end tests and benchmarks."""
