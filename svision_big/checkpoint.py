"""Training that resumes: each stage's full state, saved every few steps, so an interrupted training
continues from its last save to the same bytes as an uninterrupted one.

A Ctrl-C at 30% of training restarted it from step 1 (issue 28.4), while enhancing already resumed.
A checkpoint holds everything the next step depends on: the network, Adam's moments, the learning
rate schedule, the best weights so far, the running loss, and the states of both random generators
that draw the training pairs. It also holds a digest of what it was trained on (the volume, the
degradation, the settings), and is used only where that digest matches: a checkpoint of another
training is ignored, never mixed in. Files are written whole, then renamed, so a kill during a save
leaves the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch


def digest(v: np.ndarray, *parts) -> str:
    """What a stage trains on: the volume's bytes and shape, and ``parts`` (degradation, settings)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(v.shape), str(v.dtype), *map(repr, parts)]).encode())
    h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:24]


class Checkpoints:
    """Stage checkpoints of one training in a folder (local or any fsspec URL): ``s<i>.pt``."""

    def __init__(self, url: str, storage_options: dict | None = None, fs=None) -> None:
        """``url``: the folder; with ``fs`` (an fsspec filesystem), a path on it."""
        if fs is None:
            from .store import fs_and_path

            fs, url = fs_and_path(str(url), storage_options)
        self.fs, self.root = fs, str(url).rstrip("/")

    def _path(self, stage: int) -> str:
        return f"{self.root}/s{stage}.pt"

    def load(self, stage: int, ident: str) -> dict | None:
        """The saved state of ``stage`` if it was made by the same training (``ident``), else None."""
        path = self._path(stage)
        try:
            if not self.fs.exists(path):
                return None
            state = torch.load(io.BytesIO(self.fs.cat_file(path)), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is no checkpoint: train from the start
            return None
        return state if isinstance(state, dict) and state.get("ident") == ident else None

    def save(self, stage: int, ident: str, state: dict) -> None:
        buf = io.BytesIO()
        torch.save({**state, "ident": ident}, buf)
        path = self._path(stage)
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(f"{path}.part", buf.getvalue())
        self.fs.mv(f"{path}.part", path)

    def clear(self) -> None:
        """Remove the folder (the training it served is complete)."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


def rng_state(rng: np.random.Generator, gen: torch.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": gen.get_state()}


def set_rng_state(rng: np.random.Generator, gen: torch.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    gen.set_state(state["torch"])
