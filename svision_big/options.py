"""The options of ``train``, ``enhance`` and ``run``, each declared once: name, default, meaning, flag.

``TrainOptions`` and ``EnhanceSettings`` are frozen dataclasses; each field is one keyword of the
Python API, with its default, its meaning (``help``) and, where the command line has it, its
``Flag``s: the argparse arguments (flag names, type, choices, help text) per command, and how the
parsed value becomes the keyword's. ``cli.py`` builds its flags from them (``add_flags``) and
reads them back (``cli_keywords``); ``pipeline`` builds its keyword signatures from them
(``signature``) and checks the keywords it is given (``keywords``). A new option is one field
here, plus the code that acts on it, plus its test.

Torch-free and light: the command line's ``--help`` imports it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .ngff.format import SUPPORTED_VERSIONS
from .precision import DEFAULT_PRECISION, NAMES

DEFAULT_TRAIN_VOXELS = 4_000_000
OMIT = object()  # a flag value that leaves the keyword out (its Python default applies)


# --------------------------------------------------------------------------- argument types


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def threshold(text: str):
    """``--skip-background``'s value: "auto" or a finite number (raw input units)."""
    from .background import parse_threshold

    try:
        return parse_threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def storage(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"storage options must be JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("storage options must be a JSON object")
    return value


def back_projection(text: str):
    """``--back-projection``'s value: "auto" or a whole number of iterations, 0 or more."""
    if text.strip() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}': choose auto or a whole number of iterations, 0 or more")
    return n


def psf(values: tuple[float, ...] | None):
    """One value means every axis; negative widths are refused here, before any training."""
    if values is None:
        return None
    if not all(math.isfinite(v) for v in values):  # `--psf-fwhm nan` was ignored
        raise ValueError(f"--psf-fwhm {','.join(map(str, values))}: every width must be a finite number")
    if any(v < 0 for v in values):
        raise ValueError(f"--psf-fwhm {','.join(map(str, values))}: a width cannot be negative")
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Flag:
    """An option's flag on some commands: argparse arguments (``(names, keywords)`` pairs, added in
    order), the mutually exclusive group they belong to, and how the parsed namespace becomes the
    keyword's value (default: the one argument's own value); ``keyword``: where the value goes, when
    not to the option's own name."""

    commands: tuple[str, ...]
    arguments: tuple[tuple[tuple[str, ...], dict], ...]
    value: Callable[[argparse.Namespace], Any] | None = None
    group: str | None = None
    keyword: str | None = None


def flag(*names: str, commands: tuple[str, ...], value=None, group=None, keyword=None, **kw) -> Flag:
    """A flag of one argparse argument."""
    return Flag(commands, ((names, kw),), value, group, keyword)


def option(default, help: str, *flags: Flag, factory=None):
    """A dataclass field: one keyword, its default, its meaning and its flags."""
    meta = {"help": help, "flags": flags}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_TRAIN_RUN = ("train", "run")
_QUIET = "no progress lines (warnings and errors still go to stderr)"
_ENHANCE_RUN = ("enhance", "run")


@dataclass(frozen=True)
class TrainOptions:
    """``train``'s keywords (``run`` takes those in ``RUN_TRAINING``), in the command line's order."""

    steps: int | None = option(
        None,
        "training steps per stage (None: the standard budget)",
        flag("--steps", commands=_TRAIN_RUN, type=int, help="training steps (default: the standard budget)"),
    )
    channel: int = option(
        0,
        "the channel to train on",
        flag("--channel", commands=("train",), type=int, default=0, help="the channel to train on (default 0)"),
        flag(
            "--channel",
            commands=("run",),
            type=int,
            help="train and enhance only this channel (default: every channel, one model each)",
        ),
    )
    seed: int = option(
        0,
        "seed of the training sample and the initial weights",
        flag(
            "--seed",
            commands=_TRAIN_RUN,
            type=int,
            default=0,
            help="seed of the training sample and the initial weights, 0 to 2^63 - 1 (default 0)",
        ),
    )
    budget: int = option(
        DEFAULT_TRAIN_VOXELS,
        "voxels of level 0 to train on",
        flag(
            "--budget",
            commands=_TRAIN_RUN,
            type=int,
            default=None,
            help="voxels of level 0 to train on",
            value=lambda a: OMIT if a.budget is None else a.budget,
        ),
    )
    acquisition: str = option(
        "auto",
        "how the input's voxels were recorded (train.fit's acquisition)",
        flag(
            "--acquisition",
            commands=_TRAIN_RUN,
            choices=["auto", "integrate", "sample", "cubic"],
            default="auto",
            help="how the input's voxels were recorded: a detector's mean over each voxel (integrate), "
            "point samples at voxel centres (sample), an antialiased cubic resize (cubic), or auto "
            "(the one that makes the input most like itself one scale down; docs/fidelity.md)",
        ),
    )
    psf_fwhm: Any = option(
        None,
        "the input's Gaussian blur, FWHM per axis Z,Y,X in input voxels (None: estimated)",
        flag(
            "--psf-fwhm",
            commands=_TRAIN_RUN,
            type=floats,
            help="the input's Gaussian blur (PSF) FWHM, Z,Y,X in input voxels (or one value for all axes); "
            "default: estimated from the input; 0 = train on unblurred pairs",
            value=lambda a: psf(a.psf_fwhm),
        ),
    )
    denoise: str = option(
        "auto",
        "remove the input's noise first: auto, on, off",
        flag(
            "--denoise",
            commands=_TRAIN_RUN,
            choices=["auto", "on", "off"],
            default="auto",
            help="remove the input's noise before upsampling: where the measured noise and the blind "
            "filter's error say it pays (auto, the reason is printed), always (on), never (off)",
        ),
    )
    operator: str = option(
        "auto",
        "what the result is: auto, network, baseline, projected",
        flag(
            "--operator",
            commands=_TRAIN_RUN,
            choices=["auto", "network", "baseline", "projected"],
            default="auto",
            help="what the result is: the held-aside check's choice (auto), the trained SR network even "
            "where the check prefers a cubic (network), the better cubic (baseline), or that cubic "
            "back-projected under the acquisition (projected, clean inputs); the check's scores are printed",
        ),
    )
    ensemble: int | str = option(
        "auto",
        "flip/transpose variants the network averages: auto, 1, 4, 8",
        flag(
            "--ensemble",
            commands=_TRAIN_RUN,
            choices=["auto", "1", "4", "8"],
            default="auto",
            help="flip/transpose variants the network averages: the check's choice (auto), or 1, 4, 8 "
            "(each halving halves the network's cost)",
        ),
    )
    back_projection: int | str = option(
        "auto",
        "the network stages' and the closing back-projection iterations: auto (the check's choice) or a number >= 0",
        flag(
            "--back-projection",
            commands=_TRAIN_RUN,
            type=back_projection,
            default="auto",
            help="back-projection iterations of the network stages and the closing one: the held-aside check's "
            "choice (auto; none on noisy inputs), or a number, 0 or more, used whatever the check says (its "
            "scores are printed beside it)",
        ),
    )
    axial: str = option(
        "3d",
        "z-only factors: 3d (the cross-scale 3D network) or lateral (a 2D network learnt from the lateral planes)",
        flag(
            "--axial",
            commands=_TRAIN_RUN,
            choices=["3d", "lateral"],
            default="3d",
            help="for z-only factors (2,1,1 or 4,1,1): the cross-scale 3D network (3d), or a 2D network learnt "
            "from the input's own lateral planes degraded as z was, run along z (lateral; docs/fidelity.md 3h)",
        ),
    )
    z_spacing: Any = option(
        None,
        "--axial lateral: the input's z step in lateral voxels (None: from its voxel sizes)",
        flag(
            "--z-spacing",
            commands=_TRAIN_RUN,
            type=float,
            default=None,
            help="--axial lateral: the input's z step in lateral voxels (default: its z voxel size over the "
            "lateral one; where they are equal, the z factor: the output isotropic)",
            value=lambda a: OMIT if a.z_spacing is None else a.z_spacing,
        ),
    )
    nonfinite: str = option(
        "error",
        'NaN/Inf in the sample stop training, naming how many ("error"), or read as the fill value ("fill")',
        flag(
            "--nonfinite",
            commands=_TRAIN_RUN,
            choices=["error", "fill"],
            default="error",
            help="NaN/Inf in a float input: stop with their count (error), or read them as the array's "
            "fill value and count them in the provenance (fill)",
        ),
    )
    storage_options: dict | None = option(
        None,
        "fsspec options for the input",
        flag(
            "--storage-options",
            commands=("train",),
            type=storage,
            help="JSON fsspec options for the input (e.g. an S3 endpoint)",
        ),
    )
    quiet: bool = option(
        False,
        "no progress lines",
        flag("--quiet", commands=("train",), action="store_true", help=_QUIET),
    )
    time_index: int = option(0, "the time point to train on")
    checkpoint_dir: Any = option(None, "where training saves its state every few steps and resumes from (train.fit)")


# ``train``'s positional parameters after (input, factor), in their order (new options are keywords only)
TRAIN_POSITIONAL = (
    "steps",
    "channel",
    "time_index",
    "seed",
    "budget",
    "storage_options",
    "quiet",
    "psf_fwhm",
    "acquisition",
    "nonfinite",
    "denoise",
    "operator",
    "ensemble",
    "checkpoint_dir",
)
# the training keywords ``run`` takes (it passes them on to ``train``); its others are ``EnhanceSettings``
RUN_TRAINING = (
    "steps",
    "seed",
    "budget",
    "quiet",
    "acquisition",
    "psf_fwhm",
    "denoise",
    "operator",
    "ensemble",
    "axial",
    "z_spacing",
    "back_projection",
)


@dataclass(frozen=True)
class EnhanceSettings:
    """Everything ``enhance`` is asked besides its input, output and model(s): its keywords, in the
    command line's order."""

    channel: int | None = option(
        None,
        "the channel to enhance (None: every channel)",
        flag("--channel", commands=("enhance",), type=int, help="enhance only this channel"),
    )
    nonfinite: str = option(
        "error",
        'NaN/Inf in a float input stop the run ("error") or read as the fill value ("fill", counted)',
        flag(
            "--nonfinite",
            commands=("enhance",),
            choices=["error", "fill"],
            default="error",
            help="NaN/Inf in a float input: stop (error), or read them as the fill value, counted (fill)",
        ),
    )
    workers: int | None = option(
        None,
        "task threads of the local cluster (None: one per core)",
        flag(
            "--workers",
            commands=_ENHANCE_RUN,
            group="where",
            type=int,
            help="tasks at once on the local Dask cluster, one thread each in this process (default: one per core)",
        ),
    )
    scheduler: str | None = option(
        None,
        'a Dask scheduler address, or "sync" to run in this process (None: a local cluster)',
        flag(
            "--scheduler",
            commands=_ENHANCE_RUN,
            group="where",
            help="address of an existing Dask scheduler, or 'sync' to run in this process",
        ),
    )
    block: tuple[int, ...] | int | None = option(
        None,
        "output voxels per task of the last pass, Z,Y,X (None: the defaults)",
        flag(
            "--block",
            commands=_ENHANCE_RUN,
            type=ints,
            help="output voxels written per task, Z,Y,X (a multiple of the factor)",
        ),
    )
    dtype: str | None = option(
        None,
        "the output's dtype (None: the input's)",
        flag("--dtype", commands=_ENHANCE_RUN, help="output dtype (default: the input's), e.g. float32"),
    )
    ngff: str | None = option(
        None,
        "the output's NGFF version (None: the input's)",
        flag(
            "--ngff",
            commands=_ENHANCE_RUN,
            choices=SUPPORTED_VERSIONS,
            help="NGFF version of the output (default: the input's)",
        ),
    )
    shards: bool = option(
        False,
        "zarr v3 sharding, one shard per block",
        flag(
            "--shards",
            commands=_ENHANCE_RUN,
            action="store_true",
            help="zarr v3 sharding: one shard per block (NGFF 0.5)",
        ),
    )
    compression: bool = option(
        True,
        "compress the output's chunks",
        flag(
            "--no-compression",
            commands=_ENHANCE_RUN,
            action="store_true",
            help="store chunks uncompressed",
            value=lambda a: not a.no_compression,
        ),
    )
    overwrite: bool | str = option(
        False,
        'replace an existing svision-big output made with other settings ("any": also one svision-big did not write)',
        Flag(
            _ENHANCE_RUN,
            (
                (
                    ("--overwrite",),
                    dict(
                        action="store_true",
                        help="replace an existing svision-big output made with other settings (refused when the "
                        "folder holds any file an svision-big output does not, or has no svision-big provenance)",
                    ),
                ),
                (
                    ("--overwrite-any",),
                    dict(
                        action="store_true",
                        help="like --overwrite, also for an OME-Zarr image svision-big did not write (never the input)",
                    ),
                ),
            ),
            value=lambda a: "any" if a.overwrite_any else a.overwrite,
        ),
    )
    force: bool = option(
        False,
        "run blocks too small for their halo",
        flag(
            "--force",
            commands=_ENHANCE_RUN,
            action="store_true",
            help="run a --block smaller than twice the halo even when the repeated work is large",
        ),
    )
    break_lock: bool = option(
        False,
        "take the output's lock even from a live run or another host",
        flag(
            "--break-lock",
            commands=_ENHANCE_RUN,
            action="store_true",
            help="take the output's lock from another run (one on another host, or one you know is gone)",
        ),
    )
    strict: bool = option(
        False,
        "a missing input chunk stops the run (else: counted, warned about)",
        flag(
            "--strict",
            commands=_ENHANCE_RUN,
            action="store_true",
            help="a missing chunk in the input is an error (default: read as the fill value, counted, warned)",
        ),
    )
    skip_background: bool | float | str | None = option(
        None,
        'None/False: off; True/"auto": blocks in the background (the default rule) written as their cubic '
        "upsampling; a number: the threshold in raw input units",
        flag(
            "--skip-background",
            commands=_ENHANCE_RUN,
            nargs="?",
            const="auto",
            default=None,
            type=threshold,
            metavar="THRESHOLD",
            help="write blocks whose input lies in the background (decided on a coarse pyramid level) as "
            "their cubic upsampling, without the network; THRESHOLD in input units (default: 10%% of the "
            "model's intensity range above its low percentile; see docs/sparse.md)",
        ),
    )
    device: str | None = option(
        None,
        "torch device for inference (None: cuda where a worker has it, else cpu)",
        flag(
            "--device",
            commands=_ENHANCE_RUN,
            help="torch device for inference (default: cuda where a worker has it, else cpu)",
        ),
    )
    precision: str = option(
        DEFAULT_PRECISION,
        "the networks' arithmetic: float32, bfloat16, float16 or auto",
        flag(
            "--precision",
            commands=_ENHANCE_RUN,
            choices=list(NAMES),
            default=DEFAULT_PRECISION,
            help=f"the networks' arithmetic: float32 (default {DEFAULT_PRECISION}: the reference, the same "
            "bytes on every machine, as the Python API), auto (bfloat16 on CPUs with native bfloat16, about "
            "1.3x faster, else float32), bfloat16, float16 (CUDA devices only)",
        ),
    )
    storage_options: dict | None = option(
        None,
        "fsspec options for the input",
        flag(
            "--storage-options",
            commands=_ENHANCE_RUN,
            type=storage,
            help="JSON fsspec options for the input (e.g. S3 endpoint)",
        ),
    )
    output_storage_options: dict | None = option(
        None,
        "fsspec options for the output (None: the input's, on the same kind of store)",
        flag(
            "--output-storage-options", commands=_ENHANCE_RUN, type=storage, help="JSON fsspec options for the output"
        ),
    )
    progress: bool = option(
        True,
        "progress lines",
        flag("--quiet", commands=("enhance",), action="store_true", value=lambda a: not a.quiet, help=_QUIET),
        flag("--quiet", commands=("run",), action="store_true", keyword="quiet", help=_QUIET),
    )
    client: Any = option(None, "a dask.distributed Client to run on")
    on_block: Callable[[int], None] | None = option(None, "called with each last-pass block index once written")
    provenance_extra: dict | None = option(None, "recorded beside the provenance (``run``: its key and model files)")


# --------------------------------------------------------------------------- deriving the flags and keywords


def _flags(cls, command: str, only=None, exclude=()):
    for f in fields(cls):
        if (only is None or f.name in only) and f.name not in exclude:
            for fl in f.metadata.get("flags", ()):
                if command in fl.commands:
                    yield f, fl


def add_flags(parser: argparse.ArgumentParser, cls, command: str, only=None, exclude=()) -> None:
    """``command``'s flags of the options of ``cls`` (or of those named in ``only``), in declaration order."""
    groups: dict = {}
    for _, fl in _flags(cls, command, only, exclude):
        target = parser
        if fl.group is not None:
            if fl.group not in groups:
                groups[fl.group] = parser.add_mutually_exclusive_group()
            target = groups[fl.group]
        for names, kw in fl.arguments:
            target.add_argument(*names, **kw)


def cli_keywords(args: argparse.Namespace, cls, command: str) -> dict:
    """The keywords ``command``'s flags of ``cls`` give (a flag left at its ``OMIT`` value gives none)."""
    out = {}
    for f, fl in _flags(cls, command):
        if fl.value is not None:
            value = fl.value(args)
        else:
            value = getattr(args, fl.arguments[0][0][0].lstrip("-").replace("-", "_"))
        if value is not OMIT:
            out[fl.keyword or f.name] = value
    return out


def defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls)}


def signature(lead: tuple[str, ...], params: dict, var_keyword: str | None = None, keyword_only: bool = True):
    """A function's ``inspect.Signature``: ``lead`` positional-or-keyword parameters, then ``params``
    (name -> default), keywords only unless ``keyword_only`` is False."""
    kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
    kinds = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in lead]
    kinds += [inspect.Parameter(n, kind, default=d) for n, d in params.items()]
    if var_keyword:
        kinds.append(inspect.Parameter(var_keyword, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(kinds)


def keywords(fn: str, cls, options: dict, args: tuple = (), positional: tuple[str, ...] = (), lead: int = 0):
    """``options`` (and ``args``, bound to the ``positional`` names) as ``cls``, with the TypeErrors
    Python gives a function ``fn`` with those parameters."""
    if len(args) > len(positional):
        raise TypeError(
            f"{fn}() takes from {lead} to {lead + len(positional)} positional arguments but {lead + len(args)} "
            "were given"
        )
    known = {f.name for f in fields(cls)}
    for name in options:
        if name not in known:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")
    given = dict(zip(positional, args))
    for name in options:
        if name in given:
            raise TypeError(f"{fn}() got multiple values for argument {name!r}")
    return cls(**given, **options)
