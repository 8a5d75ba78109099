"""chubbyfs: a Chubby-style lock service on Raft, used through a FUSE mount.

`chubbyfs.connect(cell)` opens a blocking session; trio programs use
`chubbyfs.client.session.open_session`.
"""

from typing import Any

__version__ = "0.1.0"


def connect(cell: str, **options: Any) -> Any:
    """A blocking session with `cell`; see `chubbyfs.client.blocking`."""
    # Imported here so that `import chubbyfs` stays light (the pure cores
    # and the CLI need none of the client).
    from chubbyfs.client.blocking import connect as _connect

    return _connect(cell, **options)
