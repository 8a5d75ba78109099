"""The mount: FUSE operations mapped onto Chubby cells (see docs/mount.md).

* `errors`: cell error codes -> errno (pure)
* `inodes`: inode numbers, lookup counts and paths (pure)
* `files`: the per-open-file buffer that is read and committed whole (pure)
* `sessions`: one client session per (cell, user), and cached read handles
* `ops`: `ChubbyOperations`, the `chubbyfs.fuse.Operations` subclass
"""
