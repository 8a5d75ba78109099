"""Mount helpers that need no mount: option checks, path handling, errors."""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

from chubbyfs.fuse.mount import (
    MountError, MountOptions, _unescape, is_mounted, mount_direct, mount_fusermount,
    resolve_mountpoint, unmount,
)


def test_options_are_validated() -> None:
    for bad in (dict(fsname="a,b"), dict(subtype=""), dict(subtype="x y"),
                dict(method="magic"), dict(max_read=0)):
        with pytest.raises(ValueError):
            MountOptions(**bad)
    opts = MountOptions(allow_other=True, max_read=65536)
    assert opts.common_options() == ["allow_other", "default_permissions", "max_read=65536"]
    assert MountOptions(default_permissions=False).common_options() == []


def test_resolve_mountpoint_resolves_the_parent_only(tmp_path: pathlib.Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert resolve_mountpoint(tmp_path / "link" / "mnt") == str(real / "mnt")
    # The last component is not resolved (it may be a dead mount).
    assert resolve_mountpoint(tmp_path / "link") == str(tmp_path / "link")
    assert not is_mounted(tmp_path / "link")


def test_mountinfo_unescape() -> None:
    assert _unescape(r"/tmp/a\040b\134c") == "/tmp/a b\\c"
    assert _unescape("/plain") == "/plain"
    assert _unescape("/odd\\04") == "/odd\\04"


def test_mounting_on_a_missing_or_non_directory_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MountError) as info:
        mount_direct(str(tmp_path / "missing"), MountOptions())
    assert info.value.errno == errno.ENOENT
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MountError) as info:
        mount_fusermount(str(f), MountOptions())
    assert info.value.errno == errno.ENOTDIR


def test_missing_fusermount_binary(tmp_path: pathlib.Path) -> None:
    with pytest.raises(MountError, match="not found"):
        mount_fusermount(str(tmp_path), MountOptions(fusermount="no-such-fusermount-binary"))


def test_fusermount_that_sends_no_fd(tmp_path: pathlib.Path) -> None:
    # `false` exits 1 without passing a descriptor, as a refusing fusermount3 does.
    with pytest.raises(MountError, match="false failed: exit status 1"):
        mount_fusermount(str(tmp_path), MountOptions(fusermount="false"))


def test_unmount_of_something_not_mounted_fails_clearly(tmp_path: pathlib.Path) -> None:
    method = "direct" if os.geteuid() == 0 else "fusermount"
    with pytest.raises(MountError):
        unmount(str(tmp_path), method=method)
    with pytest.raises(MountError):
        unmount(str(tmp_path), method="fusermount", fusermount="false")
