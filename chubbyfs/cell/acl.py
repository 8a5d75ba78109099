"""ACL files and access checks.

An ACL is a file in ``/ls/<cell>/acl/`` listing principals, one per line (as
Plan 9 groups). Every node names three ACLs: read, write, change-ACL. Blank
lines and lines starting with ``#`` are ignored; a line ``*`` admits every
authenticated principal. A missing ACL file admits nobody, except the cell's
administrators (from the bootstrap command), who pass every check so that a
broken ACL file can never lock the cell out of itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

EVERYONE = "*"
MAX_PRINCIPAL_CHARS = 256


class AclKind(enum.IntEnum):
    READ = 0
    WRITE = 1
    CHANGE_ACL = 2


@dataclass(frozen=True, slots=True)
class AclNames:
    """The three ACL names of a node (each names a file in the ACL directory)."""

    read: str
    write: str
    change_acl: str

    def for_kind(self, kind: AclKind) -> str:
        if kind == AclKind.READ:
            return self.read
        if kind == AclKind.WRITE:
            return self.write
        return self.change_acl

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.read, self.write, self.change_acl)


def parse_acl(contents: bytes) -> frozenset[str]:
    """Principals listed in an ACL file's contents."""
    text = contents.decode("utf-8", errors="replace")
    principals = set()
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            principals.add(entry)
    return frozenset(principals)


def check_principal(principal: str) -> None:
    """Raise ValueError for a principal the cell cannot reason about."""
    if not isinstance(principal, str) or not principal:
        raise ValueError("principal must be a non-empty string")
    if len(principal) > MAX_PRINCIPAL_CHARS:
        raise ValueError(f"principal longer than {MAX_PRINCIPAL_CHARS} characters")
    if principal == EVERYONE or principal != principal.strip() or not principal.isprintable():
        raise ValueError(f"principal {principal[:80]!r} is not allowed")


def admits(principals: frozenset[str], principal: str) -> bool:
    return principal in principals or EVERYONE in principals


def format_acl(principals: list[str] | tuple[str, ...]) -> bytes:
    """Contents of an ACL file listing `principals` (sorted, for determinism)."""
    return "".join(p + "\n" for p in sorted(set(principals))).encode("utf-8")
