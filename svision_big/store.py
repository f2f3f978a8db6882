"""Where a store lives: the spellings of one location, and whether two locations overlap.

A local store can be named many ways (``in.ome.zarr``, ``./in.ome.zarr``, ``~/in.ome.zarr``,
``file:///abs/in.ome.zarr``, a symlink, a bind mount). Every check that protects the input
(``--overwrite`` must never delete it, an output must never land inside it) compares *resolved*
locations, never raw strings: a raw comparison let ``file://IN`` with ``IN --overwrite`` delete the
input. This module is the one place that turns a spelling into a location.
"""

from __future__ import annotations

import os
import posixpath

# fsspec protocols that name the same kind of store
_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "az": "az", "local": "file"}


def is_remote(url: str) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://``, ``gs://``, ``memory://`` ...)."""
    return "://" in str(url) and not str(url).startswith("file://")


def local_path(url: str) -> str:
    """The absolute local path of ``url``: ``file://`` stripped (also ``file://localhost/``), ``~`` expanded."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
        if url.startswith("localhost/"):
            url = url[len("localhost") :]
    return os.path.abspath(os.path.expanduser(url))


def location(url: str) -> tuple[str, str]:
    """(protocol, normalised path): equal for two spellings of one store (symlinks resolved locally)."""
    url = str(url)
    if not is_remote(url):
        return "file", os.path.realpath(local_path(url))
    proto, rest = url.split("://", 1)
    proto = proto.lower()
    return _PROTOCOL_ALIASES.get(proto, proto), posixpath.normpath("/" + rest.strip("/"))


def _inside(path: str, root: str, sep: str) -> bool:
    return path == root or path.startswith(root.rstrip(sep) + sep)


def _ancestors(path: str):
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _nested_local(a: str, b: str) -> bool:
    """``a`` is ``b`` or lies inside it: by path, and by inode (bind mounts, case-insensitive names)."""
    if _inside(a, b, os.sep):
        return True
    if not os.path.exists(b):
        return False
    return any(_same_file(p, b) for p in _ancestors(a) if os.path.exists(p))


def same_or_nested(a: str, b: str) -> bool:
    """True when two stores are one, or one lies inside the other, however each is spelled."""
    (pa, la), (pb, lb) = location(a), location(b)
    if pa != pb:
        return False
    if pa == "file":
        return _nested_local(la, lb) or _nested_local(lb, la)
    return _inside(la, lb, "/") or _inside(lb, la, "/")
