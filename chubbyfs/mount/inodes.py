"""Inode numbers, lookup counts and the paths they stand for.

Inode numbers are derived, not allocated: a Chubby node is identified by its
cell and its instance number (cell-wide unique, never reused), so
`ino = cell_index << 48 | instance`. A node deleted and re-created gets a new
instance and therefore a new inode; a renamed node keeps its inode. `readdir`
can name inodes without registering them. The table only remembers inodes
the kernel holds (lookup count > 0), with their last known path, plus the
pinned virtual ones: the mount root and each cell's `.chubby/` control files.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT_INO = 1
CELL_SHIFT = 48
_INSTANCE_MASK = (1 << CELL_SHIFT) - 1
# Virtual inodes of a cell sit at the top of its instance range.
_VIRTUAL_BASE = 1 << 47
CONTROL_DIR = ".chubby"
CONTROL_FILES = ("state", "master", "epoch", "session")


@dataclass(slots=True)
class Inode:
    ino: int
    cell: str
    path: str  # Chubby path: /ls/<cell>/...; "" for the mount root
    is_dir: bool
    instance: int  # 0 for virtual inodes
    virtual: str | None = None  # None (a real node), "root", "control", or a control file name
    nlookup: int = 0

    @property
    def pinned(self) -> bool:
        return self.virtual is not None


class InodeTable:
    def __init__(self, cells: list[str]) -> None:
        if len(cells) >= 1 << (64 - CELL_SHIFT):
            raise ValueError("too many cells for the inode layout")
        self.cells = list(cells)
        self._cell_index = {cell: i + 1 for i, cell in enumerate(cells)}
        self._inodes: dict[int, Inode] = {ROOT_INO: Inode(ROOT_INO, "", "", True, 0, "root")}
        # (cell, path) -> inos of real nodes at that path, and
        # (cell, directory path) -> inos of its children: invalidations name paths.
        self._by_path: dict[tuple[str, str], set[int]] = {}
        self._children: dict[tuple[str, str], set[int]] = {}
        for cell in cells:
            base = self._cell_index[cell] << CELL_SHIFT | _VIRTUAL_BASE
            self._inodes[base] = Inode(base, cell, f"/ls/{cell}/{CONTROL_DIR}", True, 0, "control")
            for k, name in enumerate(CONTROL_FILES, start=1):
                self._inodes[base + k] = Inode(base + k, cell, f"/ls/{cell}/{CONTROL_DIR}/{name}",
                                               False, 0, name)

    # ------------------------------------------------------------- numbering

    def ino_of(self, cell: str, instance: int) -> int:
        if not 0 < instance < _VIRTUAL_BASE:
            raise ValueError(f"instance {instance} outside the inode layout")
        return self._cell_index[cell] << CELL_SHIFT | instance

    def control_dir(self, cell: str) -> Inode:
        return self._inodes[self._cell_index[cell] << CELL_SHIFT | _VIRTUAL_BASE]

    def control_file(self, cell: str, name: str) -> Inode | None:
        if name not in CONTROL_FILES:
            return None
        base = self._cell_index[cell] << CELL_SHIFT | _VIRTUAL_BASE
        return self._inodes[base + 1 + CONTROL_FILES.index(name)]

    def has_cell(self, cell: str) -> bool:
        return cell in self._cell_index

    # ------------------------------------------------------------ references

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def node(self, cell: str, instance: int, path: str, is_dir: bool) -> Inode:
        """The inode of a real node seen at `path` (remembered with no references
        yet, or with its path updated if it moved)."""
        ino = self.ino_of(cell, instance)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = Inode(ino, cell, path, is_dir, instance)
            self._index(inode)
        elif inode.path != path:
            self._unindex(inode)
            inode.path = path
            self._index(inode)
        return inode

    def _index(self, inode: Inode) -> None:
        self._by_path.setdefault((inode.cell, inode.path), set()).add(inode.ino)
        parent = inode.path.rpartition("/")[0]
        self._children.setdefault((inode.cell, parent), set()).add(inode.ino)

    def _unindex(self, inode: Inode) -> None:
        for index, key in ((self._by_path, (inode.cell, inode.path)),
                           (self._children, (inode.cell, inode.path.rpartition("/")[0]))):
            inos = index.get(key)
            if inos is not None:
                inos.discard(inode.ino)
                if not inos:
                    del index[key]

    def ref(self, ino: int, count: int = 1) -> None:
        """The kernel now holds `count` more lookup references."""
        self._inodes[ino].nlookup += count

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped `count` references; unpinned inodes at 0 go."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.nlookup = max(0, inode.nlookup - count)
        self.drop_unreferenced(ino)

    def drop_unreferenced(self, ino: int) -> None:
        inode = self._inodes.get(ino)
        if inode is not None and inode.nlookup == 0 and not inode.pinned:
            del self._inodes[ino]
            self._unindex(inode)

    def moved(self, cell: str, old_path: str, new_path: str) -> None:
        """A rename: update the paths of the moved node and its subtree."""
        prefix = old_path + "/"
        for inode in self._inodes.values():
            if inode.cell != cell or inode.pinned:
                continue
            if inode.path == old_path or inode.path.startswith(prefix):
                self._unindex(inode)
                inode.path = new_path + inode.path[len(old_path):]
                self._index(inode)

    def by_path(self, cell: str, path: str) -> list[Inode]:
        """Inodes the kernel may hold for `path` (used by invalidation)."""
        if path == "":
            return [self._inodes[ROOT_INO]]
        return [self._inodes[ino] for ino in self._by_path.get((cell, path), ())]

    def children(self, cell: str, path: str) -> list[Inode]:
        """Real nodes the table holds directly under the directory `path`."""
        return [self._inodes[ino] for ino in self._children.get((cell, path), ())]

    def of_cell(self, cell: str) -> list[Inode]:
        """Every real node of `cell` the table holds."""
        return [i for i in self._inodes.values() if i.cell == cell and i.virtual is None]

    def __len__(self) -> int:
        return len(self._inodes)

    def assert_invariants(self) -> None:
        root = self._inodes[ROOT_INO]
        assert root.virtual == "root" and root.is_dir
        for ino, inode in self._inodes.items():
            assert inode.ino == ino
            assert inode.nlookup >= 0
            if inode.virtual is None:
                assert ino == self.ino_of(inode.cell, inode.instance)
                assert inode.path.startswith(f"/ls/{inode.cell}"), inode.path
                assert ino in self._by_path.get((inode.cell, inode.path), ()), inode.path
            elif inode.virtual != "root":
                assert ino >> CELL_SHIFT == self._cell_index[inode.cell]
        real = sum(1 for i in self._inodes.values() if i.virtual is None)
        assert sum(len(inos) for inos in self._by_path.values()) == real, "stale path index"
        assert sum(len(inos) for inos in self._children.values()) == real, "stale children index"
