"""The mapping from filesystem operations to Chubby (see docs/mount.md).

The implementation lives in `chubbyfs.mount`; this module is its public name.
"""

from chubbyfs.mount.ops import ChubbyOperations, MountConfig
from chubbyfs.mount.sessions import SessionPool

__all__ = ["ChubbyOperations", "MountConfig", "SessionPool"]
