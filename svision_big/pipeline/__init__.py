"""Out-of-core pipeline on OME-Zarr images: train on a sampled region, enhance block by block.

Data flows one way: input store -> block (read + halo) -> operator -> output store. Level 0
of the output is written block by block (resumable through done-records), the pyramid is then
built from the stored level 0, and the OME metadata is written last, so an output only claims
to be an image once it is complete.

The package, lowest layer first (a module imports only those above it):

- ``layout``: outer axes, passes, block plans, level 0's chunks and shards, scratch arrays;
- ``cluster``: where the tasks run (the in-process cluster, a scheduler, none), the device check;
- ``identity``: the provenance and the fingerprint, the input's digest;
- ``request``: every check that needs no write, and ``resolve`` -> the frozen ``EnhanceRun``;
- ``finish``: the pyramid and the OME metadata, last;
- ``training`` (``train``), ``enhancing`` (``enhance``: the steps, each reading the ``EnhanceRun``),
  ``running`` (``run`` = train + enhance).

The options of ``train``, ``enhance`` and ``run`` are declared once, in ``svision_big.options``.
This module re-exports the names callers use (the command line calls ``pipeline.train``,
``pipeline.enhance`` and ``pipeline.run`` through it). To replace a step in a test, patch it in the
module that looks it up (``enhancing._run_passes``, ``enhancing._after_setup_step``,
``running.train``, ``running.enhance_with``, ``request._check_coarse_finite``,
``layout.MAX_REPEATED_VOXELS``): those are not re-exported here, so a patch of ``pipeline`` fails
instead of silently reaching nothing.
"""

from __future__ import annotations

from ..model import Model, ModelFileError, load_model
from ..options import DEFAULT_TRAIN_VOXELS, EnhanceSettings, TrainOptions
from ..passes import NARROW_BP_HALO
from ..train import fit
from .enhancing import enhance, enhance_with
from .identity import input_digest
from .layout import (
    DEFAULT_CHUNK,
    DEFAULT_PASS_BLOCK,
    _default_pass_block,
    _scratch_layout,
    _whole_chunks,
    stored_order,
)
from .request import EnhanceRun, resolve
from .running import run
from .training import MIN_TRAIN_EDGE, train, training_region

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_PASS_BLOCK",
    "DEFAULT_TRAIN_VOXELS",
    "MIN_TRAIN_EDGE",
    "NARROW_BP_HALO",
    "EnhanceRun",
    "EnhanceSettings",
    "Model",
    "ModelFileError",
    "TrainOptions",
    "enhance",
    "enhance_with",
    "fit",
    "input_digest",
    "load_model",
    "resolve",
    "run",
    "stored_order",
    "train",
    "training_region",
    "_default_pass_block",
    "_scratch_layout",
    "_whole_chunks",
]
