"""``OutputState``, the owner of ``OUT/svision_state/``: preparing or refusing an output, its
scratch arrays, done-record places and the models `run` trains, and naming the settings an output
was made with that differ from this run's (``settings_differences``)."""

from __future__ import annotations

import json

from ..store import NgffError, foreign_file, fs_and_path, make_store, open_output_group, store_exists
from .layout import _STATE_ENTRY, LOCK_NAME, MODEL_FILE, SETUP_MARKER, STATE_DIR, _join, _our_file
from .lock import OutputLock

# False: a finished output keeps its models only there (moved out of svision_state/models-<key>/,
# where `run` keeps them while it works so that a resumed run reuses them). True copies them.
KEEP_STATE_MODELS = False


def _no_step(step: str) -> None:
    pass


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
        fs, root = fs_and_path(self.output, self.options)
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
        fs, root = fs_and_path(self.output, self.options)
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
        fs, root = fs_and_path(self.output, self.options)
        try:
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return True
        return set(names) <= {STATE_DIR}

    # ------------------------------------------------------------------ the state folder

    def entries(self) -> list[str]:
        """Names in the state folder, the lock left out."""
        fs, root = fs_and_path(self.url(), self.options)
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
        fs, root = fs_and_path(self.url(), self.options)
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
        fs, marker = fs_and_path(self.url(SETUP_MARKER), self.options)
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
        fs, root = fs_and_path(_join(self.output, path), self.options)
        if fs.exists(root):
            fs.rm(root, recursive=True)

    # ------------------------------------------------------------------ models `run` trains

    @staticmethod
    def model_file(channel: int, n_channels: int) -> str:
        """Where a complete output keeps the model `run` trained for ``channel``."""
        return MODEL_FILE if n_channels == 1 else f"svision_model_c{channel}.svb"

    def models_root(self, key: str) -> tuple:
        """(filesystem, folder) of the models `run` trains with settings ``key``."""
        return fs_and_path(self.url(f"models-{key}"), self.options)

    def finish_run(self, key: str, kept: dict[int, str]) -> None:
        """After `run` completed the output: its models to their place (``keep_models``), then the
        state removed (the models' state copies too, unless ``KEEP_STATE_MODELS``)."""
        self.keep_models(key, kept)
        self.clean(keep_models=KEEP_STATE_MODELS)

    def keep_models(self, key: str, kept: dict[int, str]) -> None:
        """Move the models `run` trained from the state folder to their place in the output (``kept``:
        channel -> file name)."""
        fs, root = self.models_root(key)
        out_root = fs_and_path(self.output, self.options)[1].rstrip("/")
        for c, name in kept.items():
            src = f"{root}/c{c}.svb"
            if fs.exists(src):
                (fs.copy if KEEP_STATE_MODELS else fs.mv)(src, f"{out_root}/{name}")
