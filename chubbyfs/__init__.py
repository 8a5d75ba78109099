"""chubbyfs: a Chubby-style lock service on Raft, used through a FUSE mount."""

__version__ = "0.1.0"
