"""Names in a cell: ``/ls/<cell>/a/b/c``, validated once, in one place.

A path is canonical or rejected: no empty components (so no ``//`` and no
trailing ``/``), no ``.`` or ``..``, no NUL or other control characters (they
would make sequencers and listings unprintable), bounded component length and
depth. The cell root ``/ls/<cell>`` is itself a node (a directory).
"""

from __future__ import annotations

ROOT_PREFIX = "/ls/"
ACL_DIRECTORY_NAME = "acl"
_MAX_CELL_NAME_CHARS = 64
_CELL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class InvalidNameError(ValueError):
    """A cell name, path or component that the cell does not accept."""


def check_cell_name(cell: str) -> None:
    if not isinstance(cell, str) or not cell:
        raise InvalidNameError("cell name must be a non-empty string")
    if len(cell) > _MAX_CELL_NAME_CHARS:
        raise InvalidNameError(f"cell name longer than {_MAX_CELL_NAME_CHARS} characters")
    if cell in (".", "..") or not set(cell) <= _CELL_NAME_CHARS:
        raise InvalidNameError(f"cell name {cell!r} must use only letters, digits, '.', '_', '-'")


def check_component(name: str, max_name_bytes: int) -> None:
    """Validate one path component (also used for ACL names)."""
    if not isinstance(name, str):
        raise InvalidNameError("name must be a string")
    if name == "":
        raise InvalidNameError("empty name component")
    if name in (".", ".."):
        raise InvalidNameError(f"name component {name!r} is not allowed")
    if "/" in name:
        raise InvalidNameError(f"name component {name!r} contains '/'")
    if "\x00" in name:
        raise InvalidNameError("name contains NUL")
    if not name.isprintable():
        raise InvalidNameError(f"name {name!r} contains control characters")
    if len(name.encode("utf-8", "surrogatepass")) > max_name_bytes:
        raise InvalidNameError(f"name component longer than {max_name_bytes} bytes")


def cell_root(cell: str) -> str:
    return ROOT_PREFIX + cell


def acl_directory(cell: str) -> str:
    return f"{ROOT_PREFIX}{cell}/{ACL_DIRECTORY_NAME}"


def acl_file_path(cell: str, acl_name: str) -> str:
    return f"{acl_directory(cell)}/{acl_name}"


def split_path(path: str, cell: str, max_name_bytes: int, max_depth: int) -> tuple[str, ...]:
    """Components below the cell root; () for the root itself.

    Raises InvalidNameError for anything not canonical, outside the cell,
    over-long or over-deep.
    """
    if not isinstance(path, str):
        raise InvalidNameError("path must be a string")
    root = cell_root(cell)
    if path == root:
        return ()
    if not path.startswith(root + "/"):
        raise InvalidNameError(f"path {path[:200]!r} is not inside {root}")
    components = tuple(path[len(root) + 1:].split("/"))
    if len(components) > max_depth:
        raise InvalidNameError(f"path deeper than {max_depth} components")
    for component in components:
        check_component(component, max_name_bytes)
    return components


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}"


def parent_of(path: str) -> str:
    """Parent of a canonical path below the root (the caller checks that)."""
    return path.rsplit("/", 1)[0]


def base_name(path: str) -> str:
    return path.rsplit("/", 1)[1]
