"""The lock: one run at a time writes into an output.

Two runs writing into one output at once would corrupt it silently (blocks of either run, the
output marked complete all the same). A run takes
``OUT/svision_state/lock`` before it writes anything else into an output and gives it back when it
ends, also on error. The lock is a small JSON file naming its owner (host, pid, start time), so a
refused run can say who holds it.

Local paths: the lock file is created exclusively (``O_CREAT | O_EXCL``, atomic on local and NFSv3+
filesystems) and its owner keeps an ``flock`` on it for as long as it lives, so the kernel marks a
crashed owner's lock as free. A lock whose owner is gone (same host, pid not running, flock free)
is stale: the next run takes it over, in place, under that flock (two runs taking over at once
cannot both win). Another host's lock is never taken over: ``break_lock`` (``--break-lock``) takes
any lock, for owners the user knows are gone.

fsspec stores (``s3://`` ...): object stores have no exclusive create everywhere. The lock is
written with an exclusive-create mode where the filesystem has one (``xb``: an S3 conditional
put, atomic on AWS S3; other S3-compatible servers may ignore the condition), else with a plain
put, and then read back after a short settle: a run whose token is not the one stored lost the
race and stops. Two runs writing within the settle time of each other on a store without
exclusive create can still both believe they won; docs/reliability.md says so.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import time
import uuid

from ..store import fs_and_path, is_remote, local_path
from .layout import STATE_DIR

REMOTE_SETTLE_S = 0.5  # read-back delay for stores without exclusive create
_HELD: dict[str, OutputLock] = {}  # lock url -> the lock this process holds (re-entrant: run -> enhance)


class OutputLocked(RuntimeError):
    """Another run holds the output's lock; worded as one line for the user."""


def pid_alive(pid: int) -> bool:
    """True when a process with this pid runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def pid_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None: a
    pid and its start time name one process, where a pid alone is reused after its owner dies."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def describe_owner(rec: dict | None) -> str:
    if not rec:
        return "another run (its owner is not recorded yet)"
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}"


def _parse(data: bytes) -> dict | None:
    try:
        rec = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "pid" in rec and "host" in rec else None


class OutputLock:
    """``OUT/svision_state/lock``; ``acquire`` then ``release`` (or use as a context manager)."""

    def __init__(self, url: str, storage_options: dict | None = None, break_lock: bool = False, what: str = ""):
        self.url = url.rstrip("/")
        self.options = storage_options
        self.break_lock = break_lock
        self.what = what or self.url.rsplit("/", 2)[0]  # the output, for messages
        self.record: dict | None = None
        self.depth = 0
        self._fd: int | None = None
        self._made: list[str] = []  # folders acquire created (removed again on release when empty)

    # ------------------------------------------------------------------ public

    def acquire(self) -> OutputLock:
        held = _HELD.get(self.url)
        if held is not None:  # this process already holds it (run -> enhance)
            held.depth += 1
            return held
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": pid_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
            "command": " ".join(sys.argv)[:500],
        }
        (self._acquire_remote if is_remote(self.url) else self._acquire_local)()
        self.depth = 1
        _HELD[self.url] = self
        return self

    def release(self) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth:
            return
        _HELD.pop(self.url, None)
        if is_remote(self.url):
            fs, path = self._fs()
            try:
                if _parse(fs.cat_file(path)) == self.record:  # never remove a lock someone broke and took
                    fs.rm(path)
            except FileNotFoundError:
                pass
            return
        path = local_path(self.url)
        fd, self._fd = self._fd, None
        try:
            if fd is not None and os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)  # still ours (not broken by another run): unlink while holding the flock
        except FileNotFoundError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
        # the folders acquire made, and the state folder itself: a run that resumed an output it did
        # not create left an emptied svision_state/ behind
        state = os.path.dirname(path)
        for d in [*reversed(self._made), *([state] if os.path.basename(state) == STATE_DIR else [])]:
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty: the run left its state (done-records) there; or gone already

    def owner(self) -> dict | None:
        """The record of a live owner other than this process, or None (no lock, or a stale one)."""
        if self.url in _HELD:
            return None
        if is_remote(self.url):
            fs, path = self._fs()
            try:
                rec = _parse(fs.cat_file(path))
            except FileNotFoundError:
                return None
            return None if self._stale(rec, flock_free=True) else (rec or {})
        path = local_path(self.url)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            free = self._try_flock(fd)
            rec = _parse(os.pread(fd, 1 << 16, 0))
            return None if self._stale(rec, free) else (rec or {})
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ local

    def _acquire_local(self) -> None:
        path = local_path(self.url)
        self._makedirs(os.path.dirname(path))
        data = json.dumps(self.record).encode()
        for _ in range(50):  # each round: create, or take over a stale lock, or refuse
            try:
                fd = self._create_local(path, data)
            except FileNotFoundError:  # a run releasing its lock removed the emptied folder: make it again
                self._makedirs(os.path.dirname(path))
                continue
            if fd is not None:
                self._fd = fd
                return
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # released meanwhile: create it
            free = self._try_flock(fd)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and perhaps re-created between our calls: look again
                os.close(fd)
                continue
            rec = _parse(os.pread(fd, 1 << 16, 0))
            if not free and rec is None:  # its owner is between creating and writing it
                os.close(fd)
                time.sleep(0.05)
                continue
            if self.break_lock or self._stale(rec, free):
                if not free:  # --break-lock on a lock whose owner still holds its flock
                    os.close(fd)
                    os.unlink(path)
                    self._note(rec, broken=True)
                    continue  # create it anew
                os.ftruncate(fd, 0)  # take it over in place, under its flock: one taker wins
                os.pwrite(fd, data, 0)
                os.fsync(fd)
                self._fd = fd
                self._note(rec, broken=self.break_lock and not self._stale(rec, free))
                return
            os.close(fd)
            raise self._refusal(rec)
        raise OutputLocked(f"{self.what}: could not take the lock {path} (it kept changing): try again")

    def _create_local(self, path: str, data: bytes) -> int | None:
        """Create the lock exclusively, already written and flocked: the record is written to a
        private file first, then hard-linked into place (atomic, fails if the lock exists), so no
        reader ever sees an empty lock. Filesystems without hard links get O_EXCL, then the write."""
        import fcntl

        tmp = f"{path}.{self.record['token']}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fsync(fd)
            try:
                os.link(tmp, path)
                return fd
            except FileExistsError:
                os.close(fd)
                return None
            except OSError:  # no hard links here
                pass
        finally:
            os.unlink(tmp)
        os.close(fd)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        os.fsync(fd)
        return fd

    @staticmethod
    def _try_flock(fd: int) -> bool:
        """Take the flock without waiting: True when nobody held it (it stays ours on this fd)."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            return True  # a filesystem without flock: the pid decides

    def _makedirs(self, d: str) -> None:
        missing = []
        while d and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for m in reversed(missing):
            try:
                os.mkdir(m)
                self._made.append(m)
            except FileExistsError:
                pass  # another run made it at the same instant

    # ------------------------------------------------------------------ fsspec stores

    def _fs(self):
        return fs_and_path(self.url, self.options)

    def _acquire_remote(self) -> None:
        fs, path = self._fs()
        data = json.dumps(self.record).encode()
        for _ in range(5):
            try:
                rec = _parse(fs.cat_file(path))
                exists = True
            except FileNotFoundError:
                rec, exists = None, False
            if exists:
                if not (self.break_lock or self._stale(rec, flock_free=True)):
                    raise self._refusal(rec)
                fs.rm(path)
                self._note(rec, broken=not self._stale(rec, flock_free=True))
            try:
                with fs.open(path, "xb") as fh:  # exclusive where the store has it (S3 If-None-Match)
                    fh.write(data)
            except FileExistsError:
                continue  # another run created it first: read its owner
            except (NotImplementedError, ValueError, TypeError):
                fs.pipe_file(path, data)  # no exclusive create here: the read-back below decides
            time.sleep(REMOTE_SETTLE_S)
            fs.invalidate_cache(path)
            try:
                now = _parse(fs.cat_file(path))
            except FileNotFoundError:
                continue
            if now == self.record:
                return
            raise self._refusal(now)
        raise OutputLocked(f"{self.what}: could not take the lock {self.url} (it kept changing): try again")

    # ------------------------------------------------------------------ shared

    def _stale(self, rec: dict | None, flock_free: bool) -> bool:
        """A lock is stale when its owner ran on this host and is gone (an unreadable lock counts
        when nobody holds its flock: a run killed between creating and writing it)."""
        if not flock_free:
            return False
        if rec is None:
            return not is_remote(self.url)
        if rec.get("host") != socket.gethostname():
            return False
        try:
            pid = int(rec.get("pid"))
        except (TypeError, ValueError):
            return True
        if pid == os.getpid():
            return self.url not in _HELD
        # a live pid is the owner only if it started when the owner did (pids are reused)
        started = rec.get("pid_start")
        return not pid_alive(pid) or started is not None and pid_start(pid) not in (None, started)

    def _refusal(self, rec: dict | None) -> OutputLocked:
        return OutputLocked(
            f"{self.what} is being written by another run ({describe_owner(rec)}): wait for it "
            f"to finish, or pass --break-lock if that run is gone"
        )

    def _note(self, rec: dict | None, broken: bool) -> None:
        how = "breaking the lock" if broken else "taking over the stale lock"
        why = "" if broken else " (no longer running)"
        print(f"svision-big: note: {how} of {describe_owner(rec)}{why} on {self.what}", file=sys.stderr, flush=True)
