"""``run`` = ``train`` + ``enhance``: one model per channel trained on a sampled region (kept in the
output's state, so a re-run after a crash reuses them), then the enhance run."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import numpy as np

from .. import __version__
from ..checkpoint import Checkpoints
from ..harmcheck import check_choice
from ..model import Model, ModelFileError
from ..ngff import Image, NgffError, format_for, open_image, store_exists
from ..noisecheck import denoise_mode
from ..options import RUN_TRAINING, EnhanceSettings, TrainOptions, defaults, signature
from ..progress import decision
from ..settings import check_back_projection, parse_factors
from ..state import OutputState
from ..store import location
from .enhancing import enhance_with
from .identity import _fingerprint
from .layout import _channel_axis, _check_block, _check_channel
from .request import _check_range, _check_reachable, _check_request, _check_training_args, _output_dtype
from .training import _check_trainable, train


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def run(input: str | os.PathLike, output: str | os.PathLike, factor, **kwargs) -> dict:
    """Train one model per channel on sampled regions, then enhance (``kwargs``: the training
    keywords in ``options.RUN_TRAINING`` and the :class:`EnhanceSettings`; ``quiet`` means no
    progress). Trained models are kept in the output's state folder, so re-running after a crash
    reuses them instead of training again."""
    input, output = os.fspath(input), os.fspath(output)
    t = TrainOptions(**{n: kwargs.pop(n) for n in RUN_TRAINING if n in kwargs})
    # every check that needs no model runs before training (minutes) and before any write
    _check_training_args(t.steps, t.budget, t.seed)
    denoise_mode(t.denoise)
    check_choice(t.operator, t.ensemble)
    check_back_projection(t.back_projection)
    s = _check_request(input, output, EnhanceSettings(progress=not t.quiet, **kwargs))
    image = _check_run_input(input, output, factor, t.budget, s)
    cax = _channel_axis(image)
    channels = [s.channel] if s.channel is not None else (list(range(image.shape[cax])) if cax is not None else [0])
    key, run_identity = _run_identity(input, factor, image, t)
    state = OutputState(output, s.output_storage_options)
    kept = {c: state.model_file(c, len(channels)) for c in channels}
    lock = state.lock(s.break_lock)
    prev = state.provenance()
    if prev.get("run_key") == key and prev.get("state") == "complete":  # this run finished earlier
        if state.has_leftovers():
            with lock:
                state.finish_run(key, kept)
        return {
            "output": output,
            "state": "already complete",
            "fingerprint": prev.get("fingerprint"),
            "computed": 0,
            "models": [_join(output, n) for n in kept.values()],
        }
    fs, root = state.models_root(key)
    fresh = store_exists(output, s.output_storage_options) and not fs.exists(root)  # not an earlier run of this one
    if fresh:
        state.checked_verdict("-", s.overwrite, lock, identity=run_identity, kind="run")  # refused unless --overwrite
    held = lock.acquire()  # training writes models into the output: the lock covers it, and enhance re-enters it
    try:
        overwrite = s.overwrite
        if fresh:
            if state.verdict("-", overwrite, identity=run_identity, kind="run") == "replace":
                state.clear()
            overwrite = False
        train_kw = {**{n: getattr(t, n) for n in RUN_TRAINING}, "storage_options": s.storage_options}
        train_kw["nonfinite"] = s.nonfinite
        models = [_channel_model(fs, root, input, factor, c, train_kw) for c in channels]
        extra = {"run_key": key, "run_identity": run_identity, "model_files": sorted(kept.values())}
        model = models if len(models) > 1 else models[0]
        stats = enhance_with(input, output, model, replace(s, overwrite=overwrite, provenance_extra=extra))
        state.finish_run(key, kept)
        stats["models"] = [_join(output, n) for n in kept.values()]
        return stats
    finally:
        held.release()


_RUN_KEYWORDS = ("steps", "seed", "channel", "budget", "storage_options", "output_storage_options", "quiet")
_RUN_KEYWORDS += ("overwrite", "acquisition", "psf_fwhm", "denoise", "operator", "ensemble", "axial", "z_spacing")
_RUN_KEYWORDS += ("back_projection",)
run.__signature__ = signature(
    ("input", "output", "factor"),
    {n: {**defaults(TrainOptions), **defaults(EnhanceSettings)}[n] for n in _RUN_KEYWORDS},
    var_keyword="kwargs",
)


def _run_identity(input: str, factor, image: Image, t: TrainOptions) -> tuple[str, dict]:
    """(the run's key, what it records): the settings that make two runs train the same models."""
    run_identity = {
        "input": list(location(input)),  # ./in and in are one input: the run resumes
        "factor": str(factor),
        "steps": t.steps,
        "seed": t.seed,
        "budget": t.budget,
        "shape": list(image.shape),
        "version": __version__,
        "acquisition": t.acquisition,
        "psf_fwhm": None if t.psf_fwhm is None else list(np.atleast_1d(t.psf_fwhm)),
    }
    choices = {
        "denoise": t.denoise,
        "operator": t.operator,
        "ensemble": str(t.ensemble),
        "back_projection": str(t.back_projection),
    }
    if t.axial != "3d":  # absent at its default: older keys hold
        choices.update(axial=t.axial, z_spacing=t.z_spacing)
    key = _fingerprint({**run_identity, **{k: c for k, c in choices.items() if c != "auto"}})  # "auto": older keys
    # recorded, "auto" included: a refusal names what differs
    return key, json.loads(json.dumps({**run_identity, **choices}, default=str))


def _check_run_input(input: str, output: str, factor, budget: int, s: EnhanceSettings) -> Image:
    """The input opened, and every check on it and the settings that needs no model (before training)."""
    image = open_image(input, s.storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    parse_factors(factor, len(spatial))
    _check_channel(image, s.channel, input)
    _check_trainable(image, budget, input)
    _check_block(s.block, len(spatial))
    _check_range(image, input, _output_dtype(s.dtype, image.dtype))  # before training (minutes)
    format_for(s.ngff or image.fmt.version).check_shards(s.shards or None)  # NGFF 0.4 cannot shard: before training
    _check_reachable(output, s.output_storage_options, "output")  # before training (minutes), not after
    return image


def _channel_model(fs, root: str, input: str, factor, channel: int, train_kw: dict) -> Model:
    """The model for one channel: the one trained earlier for this run (in the state folder), else
    trained now and saved there."""
    path = f"{root}/c{channel}.svb"
    if fs.exists(path):
        try:
            m = Model.from_bytes(fs.cat_file(path), where=path)
            if not train_kw["quiet"]:
                decision(f"channel {channel}: reusing the model trained earlier ({path})", "reuse", model=path)
            return m
        except ModelFileError as exc:  # a model an older version left half-written (a full disk): train again
            print(f"svision-big: note: {exc}; training channel {channel} again", file=sys.stderr, flush=True)
            fs.rm(path)
    ckpt = Checkpoints(f"{root}/c{channel}.ckpt", fs=fs)  # an interrupted training resumes from here
    m = train(input, factor, channel=channel, checkpoint_dir=ckpt, **train_kw)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{path}.part", m.to_bytes())  # whole, then renamed: a full disk leaves no half model
    fs.mv(f"{path}.part", path)
    ckpt.clear()
    return m
