"""`@frozen`: the cheaper constructor of the FUSE request and reply classes
and of Raft's entries and messages keeps every behaviour of
`@dataclass(frozen=True, slots=True)`."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import pickle

import pytest

import chubbyfs._frozen
from chubbyfs._frozen import builder, frozen
from chubbyfs.fuse import requests as rq
from chubbyfs.fuse.replies import Attr, OpenOut
from tests.purity import impure_imports


@frozen
class Point:
    x: int
    y: int = 7


@frozen
class Point3(Point):
    z: int = 0


def test_built_like_the_dataclass() -> None:
    assert Point(1) == Point(1, 7) == Point(y=7, x=1)
    assert Point(1, 2) != Point(2, 1)
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert repr(Point(1, 2)) == "Point(x=1, y=2)"
    assert dataclasses.astuple(Point3(1, 2, 3)) == (1, 2, 3)
    assert Point3(1) == Point3(1, 7, 0) and Point3.__slots__ == ("z",)
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, q=2)  # type: ignore[call-arg]


def test_still_frozen_and_slotted() -> None:
    p = Point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        p.other = 1  # type: ignore[attr-defined]
    assert dataclasses.replace(p, y=5) == Point(1, 5)


def test_the_protocol_classes_use_it() -> None:
    assert rq.Open(5, 2, 0).flags == 2
    assert rq.SetLkW(5, 3, 9, rq.FileLock(0, 1, 1, 0), 1).fh == 3  # fields inherited from a base
    assert OpenOut(4).pack() == OpenOut(4, 0, 0).pack()
    assert Attr(ino=3, mode=0o100644).blksize == 4096


def test_a_builder_makes_what_the_constructor_makes() -> None:
    build = builder(Point)
    assert builder(Point) is build, "made once per class"
    p = build(1, 2)
    assert type(p) is Point and p == Point(1, 2) and hash(p) == hash(Point(1, 2)) and repr(p) == "Point(x=1, y=2)"
    assert build(1) == Point(1, 7), "defaults as in the class"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        p.other = 1  # type: ignore[attr-defined]
    assert dataclasses.replace(p, y=5) == Point(1, 5)
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    release = builder(rq.Release)(5, 7, 0, rq.abi.RELEASE_FLOCK_UNLOCK, 9)
    assert release == rq.Release(5, 7, 0, rq.abi.RELEASE_FLOCK_UNLOCK, 9) and release.flock_unlock
    assert builder(OpenOut)(4, 2).pack() == OpenOut(4, 2).pack()


def test_a_class_with_inherited_fields_is_its_own_builder() -> None:
    assert builder(Point3) is Point3 and builder(rq.SetLkW) is rq.SetLkW
    assert builder(Point3)(1, 2, 3) == Point3(1, 2, 3)


def test_refuses_what_it_cannot_build() -> None:
    with pytest.raises(TypeError, match="plain fields"):
        @frozen
        class WithFactory:
            items: list[int] = dataclasses.field(default_factory=list)
    with pytest.raises(TypeError, match="plain fields"):
        @frozen
        class WithPostInit:
            x: int

            def __post_init__(self) -> None:
                pass


def test_pure() -> None:
    assert not impure_imports(pathlib.Path(chubbyfs._frozen.__file__))
