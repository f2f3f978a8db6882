"""Stores: where one lives (the spellings of one location, and whether two locations overlap), and
opening, testing and deleting one, for a local path or any fsspec URL.

A local store can be named many ways (``in.ome.zarr``, ``./in.ome.zarr``, ``~/in.ome.zarr``,
``file:///abs/in.ome.zarr``, a symlink, a bind mount). Every check that protects the input
(``--overwrite`` must never delete it, an output must never land inside it) compares *resolved*
locations, never raw strings: a raw comparison let ``file://IN`` with ``IN --overwrite`` delete the
input. This module is the one place that turns a spelling into a location, and the one place
that turns a URL into a zarr store or an fsspec filesystem; it knows zarr, not the NGFF versions.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import TYPE_CHECKING

import zarr
import zarr.errors
from zarr.storage import FsspecStore, LocalStore

if TYPE_CHECKING:
    from .ngff.format import NgffFormat

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


# --------------------------------------------------------------------------
# Opening, testing and deleting stores (local paths and fsspec URLs)
# --------------------------------------------------------------------------


class NgffError(ValueError):
    """A problem with an OME-Zarr store, worded as one line for the user."""


def without_file_scheme(url: str) -> str:
    """``url`` without a leading ``file://`` (nothing else changed: no ``~``, no absolute path)."""
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def make_store(url: str, storage_options: dict | None, read_only: bool):
    """A zarr store for a local path (``LocalStore``) or an fsspec URL (``FsspecStore``)."""
    url = str(url)
    if is_remote(url):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return LocalStore(local_path(url), read_only=read_only)


def fs_and_path(url: str, storage_options: dict | None):
    """The fsspec filesystem of ``url`` and the path on it (``fsspec.core.url_to_fs``)."""
    import fsspec.core

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def store_exists(url: str, storage_options: dict | None = None) -> bool:
    """True when anything exists at ``url`` (local path or fsspec URL)."""
    url = str(url)
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = fs_and_path(url, storage_options)
    fs.invalidate_cache(path)  # listings cached by an earlier call may be stale
    return bool(fs.exists(path))


_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
# what a zarr store's files are called: metadata, or chunk keys (v3 "c/0/1", v2 "0.1" or "0/1")
_ZARR_FILE = re.compile(r"^(?:zarr\.json|\.zgroup|\.zarray|\.zattrs|\.zmetadata|c|\d+(?:\.\d+)*)$")


def _store_fs(url: str, storage_options: dict | None):
    if is_remote(url):
        return fs_and_path(url, storage_options)
    import fsspec

    return fsspec.filesystem("file"), local_path(url)


def foreign_file(url: str, storage_options: dict | None = None, allowed=None) -> str | None:
    """The first file under ``url`` (relative path) that no zarr store holds, or None.

    ``allowed(relative_path)`` replaces the generic rule (zarr metadata or chunk-key names), for
    callers that know exactly what they wrote. Lists every file: as costly as deleting them.
    """
    fs, root = _store_fs(str(url), storage_options)
    root = root.rstrip("/")
    ok = allowed or (lambda rel: bool(_ZARR_FILE.match(rel.rsplit("/", 1)[-1])))
    for p in sorted(fs.find(root, withdirs=False)):
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else p
        if not ok(rel):
            return rel
    return None


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a zarr store at ``url``; refuse anything that is not one, and anything that holds
    files no zarr store has (a ``thesis.docx`` beside ``zarr.json``): then nothing is deleted.

    The check guards against ``--overwrite`` pointed at a home directory or a folder of papers.
    """
    url = str(url)
    fs, path = _store_fs(url, storage_options)
    if not fs.exists(path):
        return
    if not fs.isdir(path) or not any(fs.exists(f"{path.rstrip('/')}/{m}") for m in _ZARR_MARKERS):
        raise NgffError(f"{url} exists and is not a zarr store: refusing to delete it")
    stray = foreign_file(url, storage_options)
    if stray is not None:
        raise NgffError(
            f"{url} holds {stray}, which is not part of a zarr store: refusing to delete it "
            f"(move it elsewhere, or choose another output)"
        )
    fs.rm(path, recursive=True)


def open_output_group(url: str, fmt: NgffFormat, storage_options: dict | None = None, mode: str = "a") -> zarr.Group:
    """Create or open a group for writing, on the zarr format of ``fmt`` (an ``ngff.NgffFormat``).

    ``mode`` is 'a' (open or create), 'r+' (must exist) or 'w-' (must not
    exist). Mode 'w' is only accepted for a store that does not exist yet:
    truncating an existing output would destroy resumable work.
    """
    url = str(url)
    exists = store_exists(url, storage_options)
    if mode == "w":
        if exists:
            raise NgffError(f"refusing to open existing {url} with mode 'w' (it would erase it)")
        mode = "w-"
    if mode not in ("a", "r+", "w-"):
        raise ValueError(f"mode must be 'a', 'r+' or 'w-', not {mode!r}")
    if mode == "w-" and exists:
        raise NgffError(f"{url} already exists")
    if mode == "r+" and not exists:
        raise NgffError(f"{url} does not exist")
    store = make_store(url, storage_options, read_only=False)
    if exists:
        try:
            group = zarr.open_group(store, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            if mode == "r+":
                raise NgffError(f"{url} is not a zarr group") from None
            # An empty directory / prefix: create the group in it.
            return zarr.open_group(store, mode="a", zarr_format=fmt.zarr_format)
        if group.metadata.zarr_format != fmt.zarr_format:
            raise NgffError(
                f"{url} is a zarr v{group.metadata.zarr_format} group; NGFF {fmt.version} needs zarr v{fmt.zarr_format}"
            )
        return group
    return zarr.open_group(store, mode="w-", zarr_format=fmt.zarr_format)
