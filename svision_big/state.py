"""The output's run state: its lock, and ``OutputState``, the owner of ``OUT/svision_state/``.

The lock: one run at a time writes into an output.

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
import re
import socket
import sys
import time
import uuid

from .ngff import NgffError, foreign_file, make_store, open_output_group, store_exists
from .store import is_remote, local_path

LOCK_NAME = "lock"
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
        import fsspec.core

        return fsspec.core.url_to_fs(self.url, **(self.options or {}))

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


# --------------------------------------------------------------------------- the state folder

STATE_DIR = "svision_state"
SETUP_MARKER = "setup"  # svision_state/setup: written first, so a half set-up output is known as ours
MODEL_FILE = "svision_model.svb"  # where `run` keeps the model it trained (per channel: svision_model_c<c>.svb)
# False: a finished output keeps its models only there (moved out of svision_state/models-<key>/,
# where `run` keeps them while it works so that a resumed run reuses them). True copies them.
KEEP_STATE_MODELS = False

# What an svision-big output consists of (paths relative to the output): the image group, its
# pyramid levels and their chunks, and the state folder. `--overwrite` deletes only these; any other
# file (a thesis.docx beside zarr.json) makes it refuse, and delete nothing.
_OUR_FILES = re.compile(r"""(?x)^(?:
    zarr\.json | \.zgroup | \.zattrs                                             # the image group
  | \d+/(?:zarr\.json | \.zarray | \.zattrs | c | (?:c[/.])?\d+(?:[/.]\d+)*)      # levels and their chunks
  | svision_state/(?:
        lock(?:\.[0-9a-f]+)?                                  # the lock (and a killed run's private copy)
      | setup                                                 # the setup marker
      | done-[0-9a-f]+/p\d+/\d+(?:\.json)?                    # done-records (and their notes)
      | done-[0-9a-f]+/l\d+/\d+                                # pyramid levels' done-records
      | work-[0-9a-f]+/p\d+/(?:zarr\.json | c(?:/\d+)*)        # staged pass outputs
      | models-[0-9a-f]+/c\d+\.svb(?:\.part)?                 # models `run` trained for this output
      | models-[0-9a-f]+/c\d+\.ckpt/s\d+\.pt(?:\.part)?      # their training checkpoints (a resumed training)
    )
  | svision_model(?:_c\d+)?\.svb                             # ... and where they stay once it is complete
)$""")


# The names svision-big creates in the state folder: cleaning up removes these and nothing else.
_STATE_ENTRY = re.compile(r"^(?:lock|lock\.[0-9a-f]+|setup|(?:done|work|models)-[0-9a-f]+)$")


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _fs(url: str, options: dict | None):
    import fsspec.core

    return fsspec.core.url_to_fs(url, **(options or {}))


def _no_step(step: str) -> None:
    pass


class DoneRecords:
    """One empty object per finished block under ``url``: explicit, survives any crash,
    cheap to list on resume, and independent of whether chunks equal the fill value."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = url
        self.fs, self.root = _fs(url, options)

    def create(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def mark(self, index: int) -> None:
        self.fs.pipe_file(f"{self.root}/{index}", b"")

    def note(self, index: int, note: dict) -> None:
        """What a block found in its input (missing chunks, non-finite values), beside its record."""
        self.fs.pipe_file(f"{self.root}/{index}.json", json.dumps(note).encode())

    def notes(self) -> list[dict]:
        """Every block's note (only blocks that found something have one)."""
        try:
            self.fs.invalidate_cache(self.root)
            names = [n for n in self.fs.ls(self.root, detail=False) if n.endswith(".json")]
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(n)) for n in names]

    def clear(self) -> None:
        """Forget every record (the array they describe is about to be created anew)."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache(self.root)

    def load(self) -> set[int]:
        try:
            self.fs.invalidate_cache(self.root)
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.isdigit():
                out.add(int(base))
        return out


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


# what older outputs, which recorded no identity, record of it in their provenance under the same name
_RECORDED = ("input", "block", "dtype", "channel", "precision", "nonfinite")


def settings_differences(prev: dict, identity: dict | None, kind: str = "enhance", most: int = 4) -> str:
    """The settings an output was made with that differ from this run's, as "block [16, 32, 32], now
    [8, 16, 16]; dtype uint16, now float32" (the refusal said "fingerprint ..., now -"); "" when none
    can be named. ``prev``: the output's provenance; ``identity``: this run's (``kind`` "enhance": what
    the fingerprint hashes; "run": ``run``'s settings). Outputs of older versions, which recorded no
    identity, are compared on the provenance entries both have."""
    old = prev.get("identity" if kind == "enhance" else "run_identity")
    if identity is None:
        return ""
    if not isinstance(old, dict):
        if kind == "run":
            return "made by svision-big enhance, not run" if "run_key" not in prev else "made by another run"
        old = {k: prev[k] for k in _RECORDED if k in prev}
        identity = {k: v for k, v in identity.items() if k in old}
    names = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    said = [f"{k} {_shown(old.get(k))}, now {_shown(identity.get(k))}" for k in names[:most]]
    return "; ".join(said + ([f"{len(names) - most} more"] if len(names) > most else []))


class OutputState:
    """The run state of one output, ``OUT/svision_state/``, and what may be done to the output:

    - ``lock``: one run at a time (:class:`OutputLock`);
    - ``setup``: the marker of a setup in progress;
    - ``work-<fingerprint>/p<k>``: pass ``k``'s staged float32 output (the last pass writes level 0);
    - ``done-<fingerprint>/p<k>/<block>``: pass ``k``'s done-records (:class:`DoneRecords`);
    - ``done-<fingerprint>/l<level>/<unit>``: pyramid level ``level``'s done-records, one per chunk or shard;
    - ``models-<run key>/c<channel>.svb``: the models `run` trained, until the output is complete.

    Reading (``provenance``, ``verdict``) never writes; every write happens under the lock.
    """

    def __init__(self, output: str, options: dict | None = None):
        self.output = output
        self.options = options

    def url(self, *parts: str) -> str:
        return _join(self.output, STATE_DIR, *parts)

    def lock(self, break_lock: bool = False) -> OutputLock:
        return OutputLock(self.url(LOCK_NAME), self.options, break_lock, what=self.output)

    # ------------------------------------------------------------------ the output as a whole

    def provenance(self) -> dict:
        """The svision_big attributes of the output ({} when there are none or it cannot be read)."""
        try:
            import zarr

            prev = zarr.open_group(make_store(self.output, self.options, read_only=True), mode="r").attrs.get(
                "svision_big"
            )
        except Exception:
            return {}
        return prev if isinstance(prev, dict) else {}

    def verdict(
        self,
        fp: str,
        overwrite: bool | str,
        digest: str | None = None,
        identity: dict | None = None,
        kind: str = "enhance",
    ) -> str:
        """ "new", "resume" (same fingerprint), "restart" (a setup was killed before any block) or
        "replace" (``overwrite``, and it holds nothing but an svision-big output; an output without
        svision-big provenance only with ``overwrite="any"``); refuses anything else. ``digest``: the
        input's content digest (``pipeline.input_digest``); a fingerprint match whose recorded digest
        differs is another input, not a resume. ``identity``: what this run's fingerprint hashes
        (``kind`` "enhance"), or the settings of a ``run`` (``kind`` "run"); a refusal names the ones
        that differ from the output's. Reads only: nothing is written or deleted here."""
        if not store_exists(self.output, self.options):
            return "new"
        prev = self.provenance() or None
        changed = prev is not None and None not in (digest, prev.get("input_digest")) and prev["input_digest"] != digest
        if prev is not None and prev.get("fingerprint") == fp and not changed:
            return "resume"
        if prev is None and self._only_state():
            return "new"  # holds nothing but svision-big state: a lock, models that `run` saved for this output
        if (
            prev is None
            and SETUP_MARKER in self.entries()
            and foreign_file(self.output, self.options, allowed=_our_file) is None
        ):
            return "restart"  # a run killed while setting it up: no block was computed yet, start the setup again
        if prev is None and overwrite != "any":  # a plain image, another tool's output: never ours to replace
            raise NgffError(
                f"{self.output} already exists and is not an svision-big output (no svision_big provenance): "
                f"--overwrite replaces only svision-big outputs; pass --overwrite-any to replace it"
            )
        if not overwrite:
            differ = settings_differences(prev, identity, kind) or f"fingerprint {prev.get('fingerprint')}, now {fp}"
            why = (
                f"was made from another input (content digest {prev.get('input_digest')}, now {digest})"
                if changed
                else f"was made with other settings ({differ})"
            )
            raise NgffError(f"{self.output} already exists and {why}: pass --overwrite to replace it")
        fs, root = _fs(self.output, self.options)
        if not fs.isdir(root):
            raise NgffError(f"{self.output} exists and is not a folder: refusing to replace it")
        stray = foreign_file(self.output, self.options, allowed=_our_file)
        if stray is not None:
            raise NgffError(
                f"{self.output} holds {stray}, which is not part of an svision-big output: refusing to "
                f"delete anything (move it elsewhere, or choose another output)"
            )
        return "replace"

    def checked_verdict(
        self,
        fp: str,
        overwrite: bool,
        lock: OutputLock,
        digest: str | None = None,
        identity: dict | None = None,
        kind: str = "enhance",
    ) -> str:
        """``verdict`` without the lock; when it refuses while another run holds the lock (say, that
        run is half-way through creating the output), report the lock, the real cause."""
        try:
            return self.verdict(fp, overwrite, digest, identity, kind)
        except NgffError:
            owner = lock.owner()
            if owner is not None:
                raise lock._refusal(owner) from None
            raise

    def clear(self) -> None:
        """Delete the output's contents, keeping its lock (held by this run) and the models `run`
        trained for it (keyed by their settings). ``verdict`` has checked that nothing else is in it."""
        fs, root = _fs(self.output, self.options)
        root = root.rstrip("/")
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != STATE_DIR:
                fs.rm(entry, recursive=True)
                continue
            for inner in fs.ls(entry, detail=False):
                base = inner.rstrip("/").rsplit("/", 1)[-1]
                if _STATE_ENTRY.match(base) and base != LOCK_NAME and not base.startswith("models-"):
                    fs.rm(inner, recursive=True)
        fs.invalidate_cache(root)

    def _only_state(self) -> bool:
        fs, root = _fs(self.output, self.options)
        try:
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return True
        return set(names) <= {STATE_DIR}

    # ------------------------------------------------------------------ the state folder

    def entries(self) -> list[str]:
        """Names in the state folder, the lock left out."""
        fs, root = _fs(self.url(), self.options)
        try:
            fs.invalidate_cache(root)
            return [
                n.rstrip("/").rsplit("/", 1)[-1]
                for n in fs.ls(root, detail=False)
                if n.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME
            ]
        except FileNotFoundError:
            return []

    def has_leftovers(self) -> bool:
        """True when the state folder holds more than the lock (a complete output: a run killed
        while cleaning up)."""
        return any(_STATE_ENTRY.match(n) for n in self.entries())

    def clean(self, keep_models: bool = True) -> None:
        """Remove the done-records, scratch arrays and setup marker of a complete output (on an object
        store, most of its objects), keeping the lock (released by its owner) and, with
        ``keep_models``, the models `run` trained; the folder goes once it is empty."""
        fs, root = _fs(self.url(), self.options)
        for name in self.entries():
            if _STATE_ENTRY.match(name) and not (keep_models and name.startswith("models-")):
                fs.rm(f"{root.rstrip('/')}/{name}", recursive=True)
        fs.invalidate_cache(root)

    # ------------------------------------------------------------------ one enhance run's state

    @staticmethod
    def work_dir(fp: str) -> str:
        """Where the staged pass outputs of the run with fingerprint ``fp`` live (path in the output)."""
        return f"{STATE_DIR}/work-{fp}"

    def scratch_path(self, fp: str, k: int) -> str:
        return f"{self.work_dir(fp)}/p{k}"

    def done_url(self, fp: str, k: int) -> str:
        """Where pass ``k``'s done-records live (:class:`DoneRecords`)."""
        return self.url(f"done-{fp}", f"p{k}")

    def level_done_url(self, fp: str, level: int) -> str:
        """Where pyramid level ``level``'s done-records live, one per write unit (:class:`DoneRecords`)."""
        return self.url(f"done-{fp}", f"l{level}")

    def set_up(self, fmt, fp: str, provenance: dict, scratch, level0, after_step=_no_step):
        """Create a new output: marker, group, scratch arrays, level 0, then the provenance (last).
        Killed before the provenance, the output holds only svision-big files and the marker, and the
        next run starts its setup again (``verdict``: "restart"); killed after it, every array exists
        and the run resumes. ``scratch``: (path, shape, chunks, shards) per staged pass output;
        ``level0(group)`` creates level 0; ``after_step(name)`` is called after each step."""
        fs, marker = _fs(self.url(SETUP_MARKER), self.options)
        fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(marker, fp.encode())
        after_step("marker")
        group = open_output_group(self.output, fmt, self.options, mode="a")
        after_step("group")
        for path, shape, chunks, shards in scratch:
            self.create_scratch(path, shape, chunks, shards)
            after_step(f"scratch {path.rsplit('/', 1)[-1]}")
        level0(group)
        after_step("level 0")
        group.attrs["svision_big"] = {**provenance, "state": "writing level 0"}
        after_step("provenance")
        return group

    def ensure_arrays(self, group, scratch, level0) -> None:
        """On resume, create any array the output lacks (an older version could be killed between
        writing the provenance and creating the arrays). An existing array is never re-created: its
        chunks are the work already done."""
        import zarr

        for path, shape, chunks, shards in scratch:
            try:
                zarr.open_array(make_store(_join(self.output, path), self.options, read_only=True), mode="r")
            except Exception:
                self.create_scratch(path, shape, chunks, shards)
        try:
            zarr.open_array(make_store(self.output, self.options, read_only=True), path="0", mode="r")
        except Exception:
            level0(group)

    def create_scratch(self, path: str, shape, chunks, shards=None) -> None:
        """A float32 scratch array (zarr v3, uncompressed: written once and read once) in the state folder."""
        import zarr

        # a store rooted at the array itself: no group metadata lands in the output (a v2 image stays pure v2)
        zarr.create_array(
            make_store(_join(self.output, path), self.options, read_only=False),
            shape=tuple(shape),
            chunks=tuple(chunks),
            shards=None if shards is None else tuple(shards),
            dtype="float32",
            fill_value=0.0,
            compressors=None,
            overwrite=True,
            zarr_format=3,
        )

    def remove(self, path: str) -> None:
        """Remove a scratch array or folder (a path in the output) when it exists."""
        fs, root = _fs(_join(self.output, path), self.options)
        if fs.exists(root):
            fs.rm(root, recursive=True)

    # ------------------------------------------------------------------ models `run` trains

    @staticmethod
    def model_file(channel: int, n_channels: int) -> str:
        """Where a complete output keeps the model `run` trained for ``channel``."""
        return MODEL_FILE if n_channels == 1 else f"svision_model_c{channel}.svb"

    def models_root(self, key: str) -> tuple:
        """(filesystem, folder) of the models `run` trains with settings ``key``."""
        return _fs(self.url(f"models-{key}"), self.options)

    def finish_run(self, key: str, kept: dict[int, str]) -> None:
        """After `run` completed the output: its models to their place (``keep_models``), then the
        state removed (the models' state copies too, unless ``KEEP_STATE_MODELS``)."""
        self.keep_models(key, kept)
        self.clean(keep_models=KEEP_STATE_MODELS)

    def keep_models(self, key: str, kept: dict[int, str]) -> None:
        """Move the models `run` trained from the state folder to their place in the output (``kept``:
        channel -> file name)."""
        fs, root = self.models_root(key)
        out_root = _fs(self.output, self.options)[1].rstrip("/")
        for c, name in kept.items():
            src = f"{root}/c{c}.svb"
            if fs.exists(src):
                (fs.copy if KEEP_STATE_MODELS else fs.mv)(src, f"{out_root}/{name}")


def _our_file(rel: str) -> bool:
    return bool(_OUR_FILES.match(rel))
