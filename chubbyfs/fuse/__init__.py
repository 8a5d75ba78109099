"""The FUSE kernel protocol spoken directly over /dev/fuse. Knows nothing of Chubby.

Public surface: subclass `Operations`, then
`async with mount_fs(mountpoint, ops, MountOptions(...)) as session:`.
Requests and replies are the frozen dataclasses in `requests` and `replies`;
`codec` and `abi` are the pure wire layer. See docs/fuse-layer.md.
"""

from . import abi, requests
from .codec import DecodeOptions, decode_request, encode_error, encode_notify, encode_reply
from .errors import FuseDecodeError, FuseEncodeError, FuseError
from .mount import MountError, MountOptions, is_mounted, mount_fs, unmount
from .negotiate import FuseConfig, Negotiated, NegotiationError
from .ops import Operations, RequestContext
from .replies import (
    Attr, AttrOut, CreateOut, DirEntry, DirEntryPlus, DirentBuffer, EntryOut, IoctlOut,
    NotifyDelete, NotifyInvalEntry, NotifyInvalInode, NotifyPoll, NotifyStore, OpenOut,
    StatfsOut, dirent_type,
)
from .requests import FileLock
from .session import FuseProtocolError, FuseSession, SessionStats

__all__ = [
    "abi", "requests",
    "DecodeOptions", "decode_request", "encode_error", "encode_notify", "encode_reply",
    "FuseDecodeError", "FuseEncodeError", "FuseError",
    "MountError", "MountOptions", "is_mounted", "mount_fs", "unmount",
    "FuseConfig", "Negotiated", "NegotiationError",
    "Operations", "RequestContext",
    "Attr", "AttrOut", "CreateOut", "DirEntry", "DirEntryPlus", "DirentBuffer", "EntryOut",
    "IoctlOut", "NotifyDelete", "NotifyInvalEntry", "NotifyInvalInode", "NotifyPoll",
    "NotifyStore", "OpenOut", "StatfsOut", "dirent_type",
    "FileLock",
    "FuseProtocolError", "FuseSession", "SessionStats",
]
