"""What ``fit`` is asked to do: its options, each declared once, checked and resolved once.

``FitOptions`` declares every keyword ``fit`` takes, with its default and meaning;
``fit_request`` checks a volume and the options (one-line ValueErrors) and resolves them into the
``FitRequest`` the decisions read. ``TrainConfig`` holds the training hyper-parameters, and
``parse_factors``/``split_stages`` the upsampling factors (x4 = two x2 stages).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import Checkpoints
from .degrade import check_acquisition
from .harmcheck import check_choice
from .options import keywords
from .values import check_workable

if TYPE_CHECKING:
    from .operator import Normalisation

# What ``auto`` trains with: the method's own antialiased cubic model. Measured fit-PSNR gain over
# cubic (seed 0, default steps): authors'-style beads x4 (cubic acquisition) +5.68 dB trained as
# cubic, -0.09 trained on a mix of the three models; filaments x2 recorded by integration +0.96
# as cubic, +0.87 as integrate, +0.47 mixed, 0.00 as sample (fell back to cubic); beads x2
# +0.90 as cubic, +0.57 mixed. A mix learns an average inverse that fits none of them.
AUTO_ACQUISITION = "cubic"
DEFAULT_STEPS = 500  # measured: 500 steps beat 1500 against the truth (x2 beads 51.4 vs 49.3 dB; x4,2,2 48.1 vs 45.4)
BP_CANDIDATES = (0, 1, 2, 5, 10)


@dataclass
class TrainConfig:
    steps: int = DEFAULT_STEPS
    batch: int = 8
    patch: int = 32  # high-res patch edge (voxels), shrunk to fit thin axes
    lr: float = 1e-3
    loss: str = "l2"
    n_val: int = 16
    seed: int = 0
    quiet: bool = False
    bp_candidates: tuple[int, ...] = BP_CANDIDATES
    net: dict = field(default_factory=dict)  # NetConfig overrides (features, shrink, mapping, groups)


# --------------------------------------------------------------------------- factors


def parse_factors(factor: int | tuple[int, ...] | list[int] | str, ndim: int) -> tuple[int, ...]:
    """An int applies to every spatial axis; a tuple gives one per axis. Each must be 1, 2 or 4."""
    if isinstance(factor, str):
        parts = [p for p in factor.replace("x", ",").split(",") if p.strip()]
        try:
            factor = tuple(int(p) for p in parts) if len(parts) > 1 else int(parts[0])
        except (ValueError, IndexError):
            raise ValueError(f"factor '{factor}' is not an integer or a comma-separated list of integers") from None
    if isinstance(factor, (int, np.integer)):
        factors = (int(factor),) * ndim
    else:
        factors = tuple(int(f) for f in factor)
        if len(factors) != ndim:
            raise ValueError(f"factor {tuple(factor)} has {len(factors)} entries for {ndim} spatial axes")
    if any(f not in (1, 2, 4) for f in factors):
        raise ValueError(
            f"factor {factors}: each axis must be 1, 2 or 4 (x4 = two x2 stages; past x4 the network hallucinates)"
        )
    if all(f == 1 for f in factors):
        raise ValueError("factor 1 on every axis: nothing to enhance")
    return factors


def split_stages(factors: tuple[int, ...]) -> list[tuple[int, ...]]:
    """x4 on an axis = two x2 stages: (4, 2, 2) -> [(2, 2, 2), (2, 1, 1)]."""
    n = max(int(math.log2(f)) for f in factors)
    return [tuple(2 if f >= 2 ** (i + 1) else 1 for f in factors) for i in range(n)]


@dataclass(frozen=True)
class FitOptions:
    """``fit``'s settings, each declared once: ``fit(volume, factor, **options)`` takes these names."""

    steps: int | None = field(default=None, metadata={"help": f"training steps per stage (default {DEFAULT_STEPS})"})
    seed: int = field(default=0, metadata={"help": "random seed: the same seed gives the same model bytes"})
    psf_fwhm: tuple[float, ...] | float | None = field(
        default=None,
        metadata={
            "help": "the input's Gaussian blur (FWHM per axis in input voxels), which the truth shares; training "
            "pairs are blurred to match it. None: estimated from the input (selfsim); zeros: plain pairs"
        },
    )
    noise: str | bool = field(default="auto", metadata={"help": "noise matching: auto (if material), on, off"})
    quiet: bool = field(default=False, metadata={"help": "no progress and no decision lines"})
    acquisition: str = field(
        default="auto",
        metadata={
            "help": "how the input's voxels were recorded: cubic (an antialiased resize), integrate (a detector's "
            "mean over each voxel), sample (point samples at voxel centres) or auto (self-similarity picks)"
        },
    )
    denoise: str | bool = field(
        default="auto",
        metadata={
            "help": "auto removes noise first where worth_denoising says it pays, on always (the blind filter, then "
            "the better cubic), off never"
        },
    )
    max_train_voxels: int = field(default=8_000_000, metadata={"help": "training sample size cap (voxels)"})
    max_stage2_voxels: int = field(default=1_000_000, metadata={"help": "a second stage's training sample cap"})
    config: TrainConfig | None = field(default=None, metadata={"help": "training hyper-parameters"})
    norm: Normalisation | None = field(
        default=None, metadata={"help": "statistics measured elsewhere (e.g. a coarse pyramid level) to reuse"}
    )
    operator: str = field(
        default="auto",
        metadata={
            "help": "what the result is: auto (the held-aside check chooses), network (the trained network, even "
            "where the check prefers a baseline; it then trains on the input as it is), baseline (the better "
            "cubic) or projected (that cubic back-projected under the acquisition; clean inputs only)"
        },
    )
    ensemble: int | str = field(default="auto", metadata={"help": "auto (the check's choice) or 1, 4, 8 variants"})
    back_projection: int | str = field(
        default="auto",
        metadata={
            "help": "the network stages' and the closing back-projection iterations: auto (the held-aside check's "
            "choice; none on noisy inputs) or a number, 0 or more, used whatever the check says (it still runs "
            "and is recorded)"
        },
    )
    axial: str = field(
        default="3d",
        metadata={
            "help": "z-only factors: 3d (the cross-scale 3D network) or lateral (a 2D network learnt from the lateral "
            "planes, degraded as z was, run along z; docs/fidelity.md 3h)"
        },
    )
    z_spacing: float | None = field(
        default=None,
        metadata={
            "help": "axial lateral: the input's z step in lateral voxels (z voxel size over the lateral one); "
            "None: the z factor (the output isotropic)"
        },
    )
    checkpoint_dir: str | Checkpoints | None = field(
        default=None,
        metadata={
            "help": "a folder (local or fsspec URL) where each stage's training state is saved; a fit interrupted "
            "there and called again the same way resumes from it, to the same model bytes"
        },
    )


def fit_options(options: dict) -> FitOptions:
    """``options`` as ``FitOptions``, or the TypeError Python gives for an unknown keyword."""
    return keywords("fit", FitOptions, options)


@dataclass(frozen=True)
class FitRequest:
    """One fit's settings, checked and resolved once (``fit_request``)."""

    factors: tuple[int, ...]
    cfg: TrainConfig
    seed: int
    quiet: bool
    acquisition: str  # as asked: "auto" or a model
    acq: str  # the model trained with, until the input's own is found
    psf_fwhm: tuple[float, ...] | list[float] | None
    noise: str | bool
    denoise: str | bool
    operator: str
    ensemble: int | None  # None: the check's choice
    max_train_voxels: int
    max_stage2_voxels: int
    checkpoints: Checkpoints | None
    axial: str = "3d"
    z_spacing: float | None = None
    back_projection: int | None = None  # None: the check's choice (and none on noisy inputs)


def fit_request(volume: np.ndarray, factor: int | tuple[int, ...] | str, opts: FitOptions) -> FitRequest:
    """Check the volume and the settings (one-line ValueErrors) and resolve them."""
    if volume.ndim not in (2, 3):
        raise ValueError(f"fit needs a 2D (y, x) or 3D (z, y, x) array, got shape {volume.shape}")
    if volume.size == 0:
        raise ValueError(f"fit needs voxels, got an empty array of shape {volume.shape}")
    if not 0 <= opts.seed < 2**63:  # torch's generator said only "Overflow when unpacking long long"
        raise ValueError(f"seed {opts.seed}: use a whole number from 0 to 2^63 - 1")
    check_workable(volume)
    operator, forced_size = check_choice(opts.operator, opts.ensemble)
    forced_bp = check_back_projection(opts.back_projection)
    factors = parse_factors(factor, volume.ndim)
    cfg = copy.deepcopy(opts.config) if opts.config is not None else TrainConfig()
    cfg.seed, cfg.quiet = opts.seed, opts.quiet
    if opts.steps is not None:
        if opts.steps < 1:
            raise ValueError(f"steps must be positive, got {opts.steps}")
        cfg.steps = int(opts.steps)
    psf_fwhm = opts.psf_fwhm
    if psf_fwhm is not None and not isinstance(psf_fwhm, (tuple, list)):
        psf_fwhm = (float(psf_fwhm),) * volume.ndim
    if psf_fwhm is not None and (len(psf_fwhm) != volume.ndim or any(float(p) < 0 for p in psf_fwhm)):
        raise ValueError(f"psf_fwhm {tuple(psf_fwhm)} needs {volume.ndim} non-negative widths (one per spatial axis)")
    ckpt = opts.checkpoint_dir
    check_axial(opts.axial, opts.z_spacing, factors)
    if opts.axial == "lateral" and operator == "projected":
        raise ValueError(
            "operator projected is not offered with axial lateral (its check weighs the lateral stage against the "
            "plain cubics): use auto, network or baseline"
        )
    return FitRequest(
        factors=factors,
        cfg=cfg,
        seed=opts.seed,
        quiet=opts.quiet,
        acquisition=opts.acquisition,
        acq=AUTO_ACQUISITION if opts.acquisition == "auto" else check_acquisition(opts.acquisition),
        psf_fwhm=psf_fwhm,
        noise=opts.noise,
        denoise=opts.denoise,
        operator=operator,
        ensemble=forced_size,
        max_train_voxels=opts.max_train_voxels,
        max_stage2_voxels=opts.max_stage2_voxels,
        checkpoints=ckpt if ckpt is None or isinstance(ckpt, Checkpoints) else Checkpoints(ckpt),
        axial=opts.axial,
        z_spacing=None if opts.z_spacing is None else float(opts.z_spacing),
        back_projection=forced_bp,
    )


def check_back_projection(value: int | str) -> int | None:
    """``back_projection`` as iterations, or None for the check's choice ("auto"); a one-line ValueError
    for anything else (a number below 0, a fraction, a word)."""
    if isinstance(value, str) and value.strip() == "auto":
        return None
    n = None
    if not isinstance(value, bool):
        try:
            n = int(value) if isinstance(value, str) or float(value) == int(value) else None
        except (TypeError, ValueError, OverflowError):
            n = None
    if n is None or n < 0:
        raise ValueError(f"back_projection {value!r}: choose auto or a whole number of iterations, 0 or more")
    return n


AXIAL = ("3d", "lateral")


def check_axial(axial: str, z_spacing: float | None, factors: tuple[int, ...]) -> None:
    """One-line ValueErrors for an ``axial`` choice the factors or the spacing cannot take."""
    if axial not in AXIAL:
        raise ValueError(f"axial {axial!r}: choose one of {', '.join(AXIAL)}")
    if axial == "lateral" and (len(factors) != 3 or factors[0] == 1 or any(f != 1 for f in factors[1:])):
        raise ValueError(
            f"axial lateral enhances z alone: it needs a z-only factor such as 2,1,1 or 4,1,1, got {','.join(map(str, factors))}"
        )
    if z_spacing is not None and not (float(z_spacing) > 0 and math.isfinite(float(z_spacing))):
        raise ValueError(f"z_spacing {z_spacing!r}: give the z step in lateral voxels, a positive number")
