"""Self-supervised training: one network per x2 stage, settings chosen on held-aside crops.

``fit`` is the whole recipe: global normalisation, noise model, stage-by-stage training (the
second x2 stage learns from the first stage's output), then the data-dependent inference
settings (back-projection iterations, closing full-factor back-projection) picked by how well
the operator reconstructs crops the network never trained on.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import selfsim
from .checkpoint import Checkpoints, digest, rng_state, set_rng_state
from .degrade import ACQUISITIONS, Degradation, blur, check_acquisition
from .denoise import as_network, fit_blind_filter
from .model import Model, StageRecord
from .network import NetConfig, SVNet
from .noise import NoiseModel, noise_bins
from .operator import ENSEMBLES, Normalisation, OperatorSpec, StageOp, apply_normalised, back_project, clamp_, predict
from .progress import Progress, decision
from .sampling import PairSampler, patch_shape, split_regions
from .values import check_workable

# What ``auto`` trains with: the method's own antialiased cubic model. Measured fit-PSNR gain over
# cubic (seed 0, default steps): authors'-style beads x4 (cubic acquisition) +5.68 dB trained as
# cubic, -0.09 trained on a mix of the three models; filaments x2 recorded by integration +0.96
# as cubic, +0.87 as integrate, +0.47 mixed, 0.00 as sample (fell back to cubic); beads x2
# +0.90 as cubic, +0.57 mixed. A mix learns an average inverse that fits none of them.
AUTO_ACQUISITION = "cubic"
DEFAULT_STEPS = 500  # measured: 500 steps beat 1500 against the truth (x2 beads 51.4 vs 49.3 dB; x4,2,2 48.1 vs 45.4)
BP_CANDIDATES = (0, 1, 2, 5, 10)
# What a trained stage's residual corrects (degrade.INTERPOLATIONS). The B-spline, measured against Keys on
# the trained clean cases (fit-PSNR, dB): nuclei x2 58.47 -> 63.52, authors' beads x4 48.22 -> 50.53,
# beads x2 39.86 -> 40.61, beads x(2,1,1) 62.70 -> 63.22, filaments x4 50.90 -> 51.13; lattice
# light-sheet integrate x2 41.77 -> 41.65.
RESIDUAL_INTERPOLATION = "bspline"
# Noisy data (noise matching on) never back-project. Back-projection copies the input's noise
# into the output (-3 to -4.5 dB in a first re-implementation of the method), and the held-aside check cannot see it there: its
# recorrupted targets decorrelate from the input only as far as the noise estimate is right, and
# the estimate runs ~20% low (Poisson-100 x2 mixed data: gain 0.0157 measured vs 0.0198 true;
# clipping at zero hides the read noise). Measured against the truth, the check picked 1
# iteration on noisy x(4,2,2) filaments (full operator -1.72 dB against cubic; -0.43 with none)
# and, on cubic upsampling alone, preferred 1 where the truth says -1.9 dB
# (benchmarks/noisy_check.py). The scores are still computed and recorded.
NOISY_BP = 0
BP_TOLERANCE = 0.005  # relative MSE an extra back-projection iteration must beat (2% cost 0.66 dB on x2 beads)
# background noise std (normalised): clean synthetic data (0.2% read noise) 0.0011-0.0014, 1% read noise 0.0045-0.0062
BACKGROUND_STD_THRESHOLD = 0.003
NOISE_STD_THRESHOLD = 0.02  # noise std at mid intensity (normalised): Poisson-1000 data measure 0.023-0.030 and are worth denoising (+0.6 to +7.5 dB); clean data with a PSF measure up to 0.025 (signal leak), which `worth_denoising` then refuses (their blind error is far below it)


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


# --------------------------------------------------------------------------- statistics


SATURATED_FRACTION = 1e-4  # voxels at the maximum, as a fraction, that mark it as a detector's ceiling


def saturation(flat: np.ndarray) -> float | None:
    """The input's ceiling, if it has one: its maximum, when at least 16 voxels and
    ``SATURATED_FRACTION`` of them sit exactly there (a clipped detector, a full 8-bit range).
    Unclipped data reach their maximum at a handful of voxels."""
    top = float(flat.max())
    count = int(np.count_nonzero(flat == top))
    return top if count >= max(16, SATURATED_FRACTION * flat.size) else None


def measure_normalisation(sample: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.99) -> Normalisation:
    """Robust global percentiles of the training sample; the clamp floor is 0 for non-negative
    data, the ceiling the saturation value if the data have one."""
    flat = np.asarray(sample).ravel()
    if flat.size > 4_000_000:
        flat = flat[np.random.default_rng(0).choice(flat.size, 4_000_000, replace=False)]
    flat = flat.astype(np.float64)
    lo, hi = np.percentile(flat, [lo_pct, hi_pct])
    if hi - lo <= 0:
        hi = float(flat.max())
        lo = float(flat.min())
    if hi - lo <= 0:
        raise ValueError("the volume is constant: there is nothing to learn from it")
    return Normalisation(lo=float(lo), hi=float(hi), floor=non_negative_floor(flat), ceiling=saturation(flat))


NEGATIVE_EXCURSION = 0.1  # deepest negatives, as a fraction of the top, that still read as excursions around zero


def non_negative_floor(flat: np.ndarray) -> float | None:
    """0 when the data are a non-negative quantity (photon counts), else None (no floor).

    Data that never go below 0 are. So are data whose median is at least 0 and whose negatives
    (their 0.01th percentile) stay within ``NEGATIVE_EXCURSION`` of the top: resampling lobes (an
    antialiased cubic downscale undershoots next to every bright object) and zero-mean read noise
    around an offset-subtracted background. Measured: the cubic-acquired clean beads had 6.5% of
    their voxels below 0 (deepest -5% of the top), and leaving the output unclamped there cost
    0.12 dB against cubic clamped at 0. Background-subtracted data that are mostly negative, or
    signed data (phase, differences), keep no floor."""
    lowest = float(flat.min())
    if lowest >= 0:
        return 0.0
    top = float(np.percentile(flat, 99.99))
    deep = float(np.percentile(flat, 0.01))
    if top > 0 and float(np.median(flat)) >= 0 and -deep <= NEGATIVE_EXCURSION * top:
        return 0.0
    return None


def foreground_threshold(v: np.ndarray) -> float:
    """Normalised intensity above which a voxel counts as signal (robust to sparse data)."""
    t = 0.2
    if np.count_nonzero(v > t) < 64:
        t = float(np.quantile(v, 0.99))
    return t


NOISE_TAIL_LIMIT = 3.0  # ``NoiseBins.tail_ratio`` above which the measured "noise" is structure


def choose_noise(v: np.ndarray, mode: str | bool) -> NoiseModel | None:
    """Noise to add to training partners: estimated from the data; 'auto' applies it only if material.

    Material means: the robust (median-slope) fit reaches NOISE_STD_THRESHOLD at mid intensity,
    or the darkest voxels already vary by BACKGROUND_STD_THRESHOLD. In sparse data the second
    test is the only evidence left: their bright bins hold sub-voxel structure that looks like
    noise whether or not it is (clean and Poisson-noisy beads show the same top-bin variance)."""
    if mode in (False, "off", None):
        return None
    bins = noise_bins(v)
    model = bins.least_squares()
    if mode in (True, "on"):
        return model
    material = bins.theil_sen().std(0.5) > NOISE_STD_THRESHOLD or bins.background_std() > BACKGROUND_STD_THRESHOLD
    return model if material and bins.tail_ratio() <= NOISE_TAIL_LIMIT else None


# --------------------------------------------------------------------------- one stage


def _loss_fn(name: str):
    if name == "l2":
        return torch.nn.functional.mse_loss
    if name == "l1":
        return torch.nn.functional.l1_loss
    raise ValueError(f"unknown loss '{name}': use l2 or l1")


def _val_pairs(sampler: PairSampler, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed + 7919)
    gen = torch.Generator().manual_seed(seed + 7919)
    return [sampler.pair(sampler.origin(rng), rng, gen) for _ in range(n)]


def train_stage(
    v: np.ndarray,
    deg: Degradation,
    cfg: TrainConfig,
    label: str = "train",
    checkpoints: Checkpoints | None = None,
    stage: int = 0,
) -> tuple[SVNet, list, dict]:
    """Train one stage on a normalised volume; returns the best net (by held-aside loss), val pairs, report.
    With ``checkpoints``, the whole training state is saved at every validation step and a matching
    saved state is resumed from: the result is the same bytes as an uninterrupted training."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    patch = patch_shape(v.shape, deg.factors, cfg.patch)
    train_region, val_region, disjoint = split_regions(v.shape, patch)
    patch = patch_shape(train_region.shape, deg.factors, cfg.patch)
    thr = foreground_threshold(v)
    sampler = PairSampler(v, train_region, patch, deg, thr)
    val_sampler = PairSampler(v, val_region, patch_shape(val_region.shape, deg.factors, cfg.patch), deg, thr)
    val = _val_pairs(val_sampler, cfg.n_val, cfg.seed)

    net = SVNet(NetConfig(factors=deg.factors, **{"interpolation": RESIDUAL_INTERPOLATION, **cfg.net}))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps), eta_min=cfg.lr * 0.1)
    loss_fn = _loss_fn(cfg.loss)
    val_every = max(10, cfg.steps // 20)
    best = (float("inf"), copy.deepcopy(net.state_dict()), 0)
    running, first = None, 1
    ident = None if checkpoints is None else digest(v, deg, replace(cfg, quiet=True), stage, torch.__version__)
    saved = None if checkpoints is None else checkpoints.load(stage, ident)
    if saved is not None:
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        set_rng_state(rng, gen, saved["rng"])
        best, running, first = (
            (saved["best_loss"], saved["best"], saved["best_step"]),
            saved["running"],
            saved["step"] + 1,
        )
        if not cfg.quiet:
            decision(f"{label}: resuming training at step {first} of {cfg.steps} (checkpoint)", "resume", step=first)
    bar = Progress(cfg.steps, label, unit="steps", quiet=cfg.quiet)
    t0 = time.perf_counter()
    for step in range(first, cfg.steps + 1):
        net.train()
        lr_b, hr_b = sampler.batch(cfg.batch, rng, gen)
        loss = loss_fn(net(lr_b), hr_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % val_every == 0 or step == cfg.steps:
            vl = validation_loss(net, val, loss_fn)
            if vl < best[0]:
                best = (vl, copy.deepcopy(net.state_dict()), step)
            if checkpoints is not None and step < cfg.steps:
                checkpoints.save(
                    stage,
                    ident,
                    {
                        "step": step,
                        "net": net.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "rng": rng_state(rng, gen),
                        "best_loss": best[0],
                        "best": best[1],
                        "best_step": best[2],
                        "running": running,
                    },
                )
            bar.update(step, loss=running, val=vl)
        else:
            bar.update(step, loss=running)
    bar.close()
    net.load_state_dict(best[1])
    net.eval()
    report = {
        "steps": cfg.steps,
        "best_step": best[2],
        "val_loss": best[0],
        "train_loss": running,
        "seconds": round(time.perf_counter() - t0, 2),
        "patch": list(patch),
        "val_disjoint": disjoint,
        "parameters": net.n_parameters(),
        "loss": cfg.loss,
    }
    return net, val, report


def validation_loss(net: SVNet, val: list, loss_fn) -> float:
    net.eval()
    with torch.inference_mode():
        return float(np.mean([loss_fn(net(lr[None, None])[0, 0], hr).item() for lr, hr in val]))


def _check_pairs(val: list, deg: Degradation) -> list:
    """Held-aside pairs for choosing settings: made like the training pairs, with the chosen
    acquisition model (never a fixed one: a check whose partners assume another physics than the
    data's picks settings for that physics), and for noisy data with noise-matched partners and
    targets whose noise is independent of them."""
    return val


def choose_bp_iters(stage: StageOp, val: list, floor: float | None, candidates: tuple[int, ...]) -> tuple[int, dict]:
    """Back-projection iterations that best reconstruct held-aside crops (0 wins on noisy data).

    The ensemble prediction is computed once per crop; iterations then continue from the previous
    candidate, so trying every candidate costs one network pass per crop."""
    errors = {n: [] for n in candidates}
    with torch.inference_mode():
        for lr, hr in _check_pairs(val, stage.degradation):
            y = clamp_(predict(stage.net, lr, stage.ensemble), floor)
            done = 0
            for n in sorted(candidates):
                y = back_project(y, lr, stage.degradation, n - done, floor)
                done = n
                errors[n].append(torch.mean((y - hr) ** 2).item())
    scores = {n: float(np.mean(e)) for n, e in errors.items()}
    return _fewest_good(scores), {str(k): v for k, v in scores.items()}


def _fewest_good(scores: dict[int, float]) -> int:
    """Fewest iterations whose error is within BP_TOLERANCE of the best: every iteration widens the
    halo each block must read (about 3.5 input voxels per x2 iteration), so it must pay for itself."""
    best = min(scores.values())
    return min(n for n, v in scores.items() if v <= best * (1.0 + BP_TOLERANCE))


# --------------------------------------------------------------------------- whole recipe


def blurred(v: np.ndarray, fwhm: tuple[float, ...]) -> np.ndarray:
    """``v`` blurred by a Gaussian of ``fwhm`` (voxels) per axis; ``v`` itself when there is none."""
    if not any(f > 0 for f in fwhm):
        return v
    return blur(torch.from_numpy(np.ascontiguousarray(v, np.float32)), tuple(fwhm)).numpy()


def sample_box(shape: tuple[int, ...], v: np.ndarray, max_voxels: int) -> tuple[slice, ...]:
    """A sub-box of at most ``max_voxels`` centred on the signal, for in-memory training of large arrays."""
    total = int(np.prod(shape))
    if total <= max_voxels:
        return tuple(slice(0, n) for n in shape)
    scale = (max_voxels / total) ** (1.0 / len(shape))
    size = [max(1, min(n, int(n * scale))) for n in shape]
    weights = np.clip(v, 0, None)
    centre = [
        int(np.average(np.arange(n), weights=weights.sum(axis=tuple(a for a in range(len(shape)) if a != d)) + 1e-12))
        for d, n in enumerate(shape)
    ]
    return tuple(
        slice(int(np.clip(c - s // 2, 0, n - s)), int(np.clip(c - s // 2, 0, n - s)) + s)
        for c, s, n in zip(centre, size, shape)
    )


def fit(
    volume: np.ndarray,
    factor: int | tuple[int, ...] = 2,
    steps: int | None = None,
    seed: int = 0,
    psf_fwhm: tuple[float, ...] | float | None = None,
    noise: str | bool = "auto",
    quiet: bool = False,
    acquisition: str = "auto",
    denoise: str | bool = "auto",
    max_train_voxels: int = 8_000_000,
    max_stage2_voxels: int = 1_000_000,
    config: TrainConfig | None = None,
    norm: Normalisation | None = None,
    operator: str = "auto",
    ensemble: int | str = "auto",
    checkpoint_dir: str | Checkpoints | None = None,
) -> Model:
    """Train a model on ``volume`` (numpy (z, y, x) or (y, x)) for the given upsampling factor.

    ``psf_fwhm``: the input's Gaussian blur (FWHM per axis in *input* voxels), which the truth
    shares; training pairs are blurred to match it (``selfsim.pair_blur``). None: estimated from
    the input (``selfsim.estimate``); zeros: plain pairs.
    ``acquisition``: how the input's voxels were recorded, "cubic" (an antialiased resize, as in
    the method's paper), "integrate" (a detector's mean over each voxel), "sample" (point samples
    at voxel centres) or "auto" (the one cross-scale self-similarity picks).
    ``norm``: pass statistics measured elsewhere (e.g. a coarse pyramid level) to reuse them.
    ``denoise``: "auto" (True) removes noise first where ``worth_denoising`` says it pays, "on"
    always (the blind filter, then the better cubic), "off" (False) never.
    ``operator``: what the result is. "auto": the held-aside check chooses (``do_no_harm``);
    "network": the trained SR network, even where the check prefers a baseline (with ``denoise``
    "auto" the network then trains on the input as it is: a denoised input gets no network);
    "baseline": the better cubic on the check; "projected": that cubic back-projected under the
    acquisition (clean inputs only). ``ensemble``: "auto" (the check's choice) or 1, 4, 8 variants.
    ``checkpoint_dir``: a folder (local or fsspec URL) where each stage's training state is saved
    every few steps; a fit interrupted there and called again the same way resumes from it, to the
    same model bytes (``checkpoint.Checkpoints``; remove the folder once the model is saved).
    """
    volume = np.asarray(volume)
    if volume.ndim not in (2, 3):
        raise ValueError(f"fit needs a 2D (y, x) or 3D (z, y, x) array, got shape {volume.shape}")
    if volume.size == 0:
        raise ValueError(f"fit needs voxels, got an empty array of shape {volume.shape}")
    if not 0 <= seed < 2**63:  # torch's generator said only "Overflow when unpacking long long"
        raise ValueError(f"seed {seed}: use a whole number from 0 to 2^63 - 1")
    check_workable(volume)
    operator, forced_size = check_choice(operator, ensemble)
    factors = parse_factors(factor, volume.ndim)
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    cfg.seed, cfg.quiet = seed, quiet
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        cfg.steps = int(steps)
    if psf_fwhm is not None and not isinstance(psf_fwhm, (tuple, list)):
        psf_fwhm = (float(psf_fwhm),) * volume.ndim
    if psf_fwhm is not None and (len(psf_fwhm) != volume.ndim or any(float(p) < 0 for p in psf_fwhm)):
        raise ValueError(f"psf_fwhm {tuple(psf_fwhm)} needs {volume.ndim} non-negative widths (one per spatial axis)")
    acq = AUTO_ACQUISITION if acquisition == "auto" else check_acquisition(acquisition)
    norm = norm or measure_normalisation(volume)
    v_full = norm.forward_array(volume).numpy()
    v = v_full[sample_box(v_full.shape, v_full, max_train_voxels)]
    t_start = time.perf_counter()

    nm0 = choose_noise(v, noise)
    # the blind filter is tried whenever material noise is measured (``worth_denoising`` decides);
    # the least-squares model reads sub-voxel beads as noise: clean x4 beads were denoised
    mode = denoise_mode(denoise)
    if operator == "network" and mode == "on":
        raise ValueError(
            "--operator network with --denoise on: a denoised input gets no SR network; use --denoise auto or off"
        )
    if operator == "network" and mode == "auto":
        mode = "off"  # the network was asked for: it trains on the input as it is (noise-matched pairs)
        if not quiet and nm0 is not None:
            decision(
                "noise measured, not removed: --operator network trains the SR network on the input as it "
                "is, with noise-matched pairs (--denoise on and the default operator denoise it instead)",
                "denoise",
                used=False,
            )
    nm_any = nm0
    if mode == "on" and nm_any is None:
        nm_any = choose_noise(v, "on")  # asked for: the noise model even where it is not material
    w, off, drep = fit_blind_filter(v, seed) if nm_any is not None and mode != "off" else (None, 0.0, {})
    worth = w is not None and worth_denoising(v, drep, nm_any)
    if w is not None:
        drep.update(mode=mode, forced=mode == "on" and not worth)
        if not quiet and not worth:
            decision(
                f"noise measured, not removed: {denoise_reason(drep)}{_HOW_TO_DENOISE[mode]}", "denoise", used=False
            )
    if w is not None and (worth or mode == "on"):  # the filter, then the better cubic: no SR network (DENOISED_SR)
        w, off = blend_centre(w, off, drep)
        dnet = as_network(w, off)
        drep.update(noise=[nm_any.gain, nm_any.offset], noise_std_mid=nm_any.std(0.5))
        if not quiet:
            decision(
                f"noise found (std {nm_any.std(0.5):.3g} at mid range): denoising first with a {drep['kind']} "
                f"({denoise_reason(drep)}){_HOW_TO_DENOISE[mode]}",
                "denoise",
                used=True,
            )
        ddeg = Degradation((1,) * volume.ndim, None, None, acq)
        record = StageRecord(dnet.config, dnet.state_dict(), ddeg, 0, DENOISER_ENSEMBLE, drep)
        if operator == "projected":
            raise ValueError(
                "--operator projected: back-projection needs a clean input, and this one is denoised "
                "(noise is never back-projected); use --operator baseline or network"
            )
        return _denoised_cubic(record, norm, factors, acquisition, acq, psf_fwhm, seed, v, cfg, nm_any, t_start, quiet)
    stages: list[StageRecord] = []
    ops: list[StageOp] = []
    refused = None  # noise the blind filter would not remove: the check still carries it
    if REFUSED_NOISE_AS_CLEAN and nm0 is not None and drep and not drep.get("used"):
        refused, nm0, noise = nm0, None, False  # see REFUSED_NOISE_AS_CLEAN
    sr_plan = split_stages(factors)
    found = None  # selfsim.SelfSimilarity, when the input's blur is estimated
    if psf_fwhm is not None:
        blur_p = tuple(float(q) for q in psf_fwhm)
    elif nm0 is None:  # clean: the input's own blur and acquisition (noise would read as sharpness)
        found = selfsim.estimate(v, sr_plan[0], ACQUISITIONS if acquisition == "auto" else (acq,))
        acq, blur_p = found.acquisition, found.psf_fwhm
        if not quiet:
            decision(
                f"acquisition {found.acquisition}{' (auto; --acquisition overrides)' if acquisition == 'auto' else ''}, "
                f"input blur FWHM {tuple(round(q, 2) for q in blur_p)} voxels (--psf-fwhm overrides; spectral mismatch "
                + ", ".join(f"{a} {c:.3g}" for a, c in found.scores.items())
                + ")",
                "acquisition",
                acquisition=found.acquisition,
                psf_fwhm=list(blur_p),
            )
    else:
        blur_p = (0.0,) * volume.ndim
    stage_source, stage_blur = v, blur_p
    ckpt = (
        checkpoint_dir
        if checkpoint_dir is None or isinstance(checkpoint_dir, Checkpoints)
        else Checkpoints(checkpoint_dir)
    )
    for i, sf in enumerate(sr_plan):
        stage_input = blurred(stage_source, selfsim.pair_blur(stage_blur, sf))
        nm = choose_noise(stage_input, noise)
        deg = Degradation(sf, None, None if nm is None else (nm.gain, nm.offset), acq)
        net, val, report = train_stage(
            stage_input, deg, cfg, label=f"stage {i + 1} {'x'.join(map(str, sf))}", checkpoints=ckpt, stage=i
        )
        op = StageOp(net, deg, 0, ensemble=TRAIN_ENSEMBLE)
        bp, scores = choose_bp_iters(op, val, norm.bounds_n, cfg.bp_candidates)
        if nm is not None:  # noisy: none, whatever the (biased) check says, see NOISY_BP
            bp = NOISY_BP
        op = StageOp(net, deg, bp, ensemble=TRAIN_ENSEMBLE)
        report.update(
            bp_iters=bp,
            bp_val_mse=scores,
            noise=None if nm is None else [nm.gain, nm.offset],
            noise_std_mid=None if nm is None else nm.std(0.5),
            pair_blur=list(selfsim.pair_blur(stage_blur, sf)),
        )
        if not quiet:
            decision(
                f"stage {i + 1}: factors {sf}, val loss {report['val_loss']:.3g}, "
                f"back-projection {bp} iterations{' (noisy data: none)' if nm else ''} (val mse {scores}), "
                f"noise matching {'on' if nm else 'off'}, {report['seconds']:.0f} s",
                "stage",
                stage=i + 1,
                bp_iters=bp,
            )
        ops.append(op)
        stages.append(StageRecord(net.config, net.state_dict(), deg, bp, True, report))
        if i + 1 < len(sr_plan):  # the next stage learns from this one's output on the input itself
            sub = stage_source[sample_box(stage_source.shape, stage_source, max_stage2_voxels)]
            spec = OperatorSpec(tuple(ops), norm)
            stage_source = apply_normalised(torch.from_numpy(np.ascontiguousarray(sub)), spec).numpy()
            stage_blur = tuple(q * f for q, f in zip(stage_blur, sf))

    noise_t = None if nm0 is None else (nm0.gain, nm0.offset)
    full = Degradation(factors, None, noise_t, acq)  # check crops carry the input's noise
    v_check = blurred(v, selfsim.pair_blur(blur_p, factors))  # checks one scale down, blurred as pairs are
    final_deg, final_iters, final_scores = None, 0, {}
    if len(sr_plan) > 1 and nm0 is None:  # never back-project onto a noisy input (NOISY_BP)
        final_deg = full
        final_iters, final_scores = choose_final_bp(ops, norm, final_deg, v_check, cfg)
        if not quiet:
            decision(
                f"closing x{'x'.join(map(str, factors))} back-projection: {final_iters} iterations "
                f"(val mse {final_scores})",
                "closing back-projection",
                bp_iters=final_iters,
            )
    model = Model(
        stages=stages,
        norm=norm,
        factors=factors,
        final=final_deg,
        final_bp_iters=final_iters,
        info={
            "seed": seed,
            "final_bp_val_mse": final_scores,
            "train_shape": list(v.shape),
            "steps": cfg.steps,
            "acquisition": {
                "chosen": acquisition if acquisition != "auto" else f"auto ({acq})",
                "trained_with": acq,
                "psf_fwhm": list(blur_p),
                "psf_given": psf_fwhm is not None,
                "self_similarity": None if found is None else found.record(),
            },
            "noise_estimate": None if nm0 is None else nm0.std(0.5),
            "denoiser": False,
            "denoise_check": drep or None,
        },
    )
    # the input's acquisition, once estimated, is what the check repeats; without an estimate (noisy
    # data) ``auto`` must win under all three
    check = full if acquisition != "auto" or found is not None else Degradation(full.factors, None, full.noise, "mixed")
    if refused is not None:  # noise-matched sources, recorrupted targets: a net that copies noise loses there
        capped = bounded_noise(refused, drep)  # no more noise than the blind error allows
        check = Degradation(check.factors, None, (capped.gain, capped.offset), check.acquisition)
    model = do_no_harm(model, check, v_check, cfg, full_scale=v, operator=operator, ensemble=forced_size)
    model.info["fit_seconds"] = round(time.perf_counter() - t_start, 2)
    if not quiet:
        b = model.info["baseline"]
        decision(f"held-aside check (val mse): {b['scores']}", "check", scores=b["scores"])
        summarise(model)
    return model


# --------------------------------------------------------------------------- do no harm

# DENOISED_SR: noisy data that the blind filter denoises get the filter, then cubic upsampling, and no
# SR network (``fit`` returns ``_denoised_cubic``). Measured against the truth (x2, integrate
# acquisition, 300 steps): an SR network trained on the denoised volume lost to denoised cubic
# (Poisson-50 filaments 38.55 vs 40.36 dB fit-PSNR, Poisson-200 mixed 39.88 vs 43.09), while the
# held-aside check one scale down preferred the network in both: the check cannot see it, so the
# network is not offered.
# Noise that the blind filter refused to remove (``worth_denoising``: the noise model claims more
# than the filter's whole blind error, or removing it would not pay) is taken for structure: the SR
# stages train without noise matching, on pairs blurred as the input is.
REFUSED_NOISE_AS_CLEAN = True
DENOISE_MARGIN = 0.8
MATERIAL_NOISE_VAR = (
    0.005**2
)  # normalised units: noise below 0.5% of the range is left to the SR network  # the blind filter's estimated error must be below this fraction of the noise it removes


def blend_centre(w: np.ndarray, off: float, report: dict) -> tuple[np.ndarray, float]:
    """The blind filter's estimate and the voxel itself are two estimates of the signal with
    independent errors (the filter's, ``denoised_error``, and the noise): their inverse-variance
    blend keeps a fraction ``err / (err + noise)`` of the voxel. An underestimated noise keeps
    more of it (less smoothing), the safe side."""
    err, var = max(report["denoised_error"], 0.0), report["noise_var"]
    beta = err / (err + var) if err + var > 0 else 0.0
    w = w * (1.0 - beta)
    w[(w.shape[0] // 2,) * w.ndim] += beta
    report["centre_weight"] = beta
    return w, off * (1.0 - beta)


# What the result is (``fit(operator=...)``, ``--operator``): "auto" lets the held-aside check choose; the
# others force one offer whatever the check says (issue 28.1: a user could not ask for enhancement
# the check had refused). The check still runs, and its scores are printed beside the forced choice.
OPERATORS = ("auto", "network", "baseline", "projected")


def check_choice(operator: str, ensemble: int | str) -> tuple[str, int | None]:
    """(operator, ensemble size or None for the check's choice), or a one-line ValueError."""
    if operator not in OPERATORS:
        raise ValueError(f"operator {operator!r}: choose one of {', '.join(OPERATORS)}")
    if str(ensemble) == "auto":
        return operator, None
    try:
        size = int(ensemble)
    except (TypeError, ValueError):
        size = None
    if size not in ENSEMBLES:
        raise ValueError(f"ensemble {ensemble!r}: choose auto or one of {', '.join(map(str, sorted(ENSEMBLES)))}")
    return operator, size


DENOISE_MODES = {"auto": "auto", "on": "on", "off": "off", True: "auto", False: "off"}
_HOW_TO_DENOISE = {"auto": "; --denoise on|off overrides", "on": " (--denoise on)", "off": ""}


def denoise_mode(denoise: str | bool) -> str:
    try:
        return DENOISE_MODES[denoise]
    except (KeyError, TypeError):
        raise ValueError(f"denoise must be auto, on or off, got {denoise!r}") from None


def denoise_reason(report: dict) -> str:
    """Why the blind filter was (not) used, in the measured figures of ``worth_denoising``."""
    nv, err, mod = report["noise_var"], report["denoised_error"], report["modelled_noise_var"]
    if not report["consistent"]:
        return (
            f"the noise model claims variance {mod:.3g}, more than the filter's whole blind error "
            f"{report['blind_mse']:.3g}: structure read as noise"
        )
    if nv <= MATERIAL_NOISE_VAR:
        return f"noise variance {nv:.3g} is below {MATERIAL_NOISE_VAR:.3g}, too little to remove"
    verb = "<" if err < DENOISE_MARGIN * nv else ">="
    return f"filter error {err:.3g} {verb} {DENOISE_MARGIN:g} x noise variance {nv:.3g}"


def worth_denoising(v: np.ndarray, report: dict, nm: NoiseModel) -> bool:
    """Whether the blind filter makes the input closer to its clean signal, judged at the input's
    own scale: for independent noise its blind error is (its error against the clean signal) +
    (the noise variance), so it helps when that error, blind error minus the noise, stays below
    the noise itself. The noise model runs low (a 25% low gain on Poisson-50 data), which makes
    this test refuse denoising rather than force it. Records the figures in ``report``."""
    modelled = float(np.mean(np.clip(nm.gain * np.clip(v, 0, None) + nm.offset, 0, None)))
    # the blind error bounds the noise from above (the model reads fine structure as noise: on clean
    # oversampled data it said 8.6e-6 where the blind error was 6.9e-10)
    noise_var = min(modelled, report["blind_mse"])
    err = report["blind_mse"] - noise_var
    # a noise model that claims more noise than the filter's whole blind error is wrong (structure
    # read as noise): the split of that error into noise and filter error is then unknown, and
    # taking all of it as noise is the most aggressive filter there is (measured: x(4,2,2)
    # Poisson-1000 filaments -0.88 dB, cells3d nuclei x2 -0.92 dB against cubic). Stay out.
    consistent = modelled < report["blind_mse"]
    used = consistent and noise_var > MATERIAL_NOISE_VAR and err < DENOISE_MARGIN * noise_var
    report.update(
        noise_var=noise_var,
        modelled_noise_var=modelled,
        denoised_error=err,
        consistent=bool(consistent),
        used=bool(used),
    )
    return report["used"]


def bounded_noise(nm: NoiseModel, report: dict) -> NoiseModel:
    """``nm`` scaled so that its mean variance on the input is at most the blind filter's whole error,
    which bounds any independent noise from above (``worth_denoising``). The check on noise the filter
    refused recorrupts with this, not with the model: on clean texture x(4,2,2) the model claimed
    variance 2.6e-4 where the blind error was 2.8e-8, and the recorrupted check then refused every
    offer sharper than the B-spline (1.24-1.66x its error) while the truth gave them +2.0 to +9.0 dB
    (docs/fidelity.md, section 3e)."""
    modelled = float(report.get("modelled_noise_var") or 0.0)
    if modelled <= 0.0:
        return nm
    s = min(1.0, float(report["noise_var"]) / modelled)
    return NoiseModel(nm.gain * s, nm.offset * s)


# While training, stages run one variant (the back-projection choice, a second stage's input, the
# closing back-projection); ``do_no_harm`` then picks the ensemble the model keeps. Every measured
# result since the acquisition models came in ran so: ``ensemble=True`` read as one variant then.
TRAIN_ENSEMBLE = 1
DENOISER_ENSEMBLE = 1  # the filter is symmetric already: every variant gives the same
ENSEMBLE_TOLERANCE = 0.005  # relative MSE a larger ensemble must beat (each halving halves the network's cost)
WIN_MARGIN = 0.02  # relative MSE the trained operator must beat the cubic baseline by (~0.09 dB): the check is a sample


CHECK_VOXELS = 300_000  # low-res voxels of the held-aside slab each check volume scores on


def check_volumes(v: np.ndarray, deg: Degradation, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole training volume degraded once more by ``deg`` (each acquisition in turn when it is
    "mixed"), as (low-res source, target): the check at the scale below the input's. Noisy data
    get noise-matched sources and recorrupted targets, as training pairs do."""
    vc = np.ascontiguousarray(v[tuple(slice(0, n - n % f) for n, f in zip(v.shape, deg.factors))])
    acqs = ACQUISITIONS if deg.acquisition == "mixed" else (deg.acquisition,)
    gen = torch.Generator().manual_seed(seed + 2)
    return [Degradation(deg.factors, deg.psf_fwhm, deg.noise, a).synthesize(torch.from_numpy(vc), gen) for a in acqs]


def held_aside_slab(shape_lr: tuple[int, ...], factors: tuple[int, ...], patch: int) -> tuple[slice, ...]:
    """Low-res box of the slab the SR stages never trained on (``split_regions``), cut to
    ``CHECK_VOXELS`` around its centre."""
    hr = tuple(n * f for n, f in zip(shape_lr, factors))
    _, val, _ = split_regions(hr, patch_shape(hr, factors, patch))
    box = [[-(-a // f), b // f] for a, b, f in zip(val.start, val.stop, factors)]
    while np.prod([b - a for a, b in box]) > CHECK_VOXELS:
        d = int(np.argmax([b - a for a, b in box]))
        a, b = box[d]
        cut = max(1, (b - a) // 8)
        box[d] = [a + cut // 2, b - (cut - cut // 2)]
    return tuple(slice(a, b) for a, b in box)


def cubic_baseline(model: Model, keep: int = 0, interpolation: str = "keys") -> Model:
    """The safe baseline as a model: the first ``keep`` stages (the denoiser, if any), then cubic
    upsampling by the whole factor with ``interpolation`` (Keys or B-spline: a one-stage net whose
    learned correction is exactly zero, no ensemble, no back-projection), so the pipeline runs it
    like any model."""
    cfg = NetConfig(
        factors=model.factors,
        features=1,
        shrink=1,
        mapping=0,
        groups=1,
        extract_kernel=1,
        kernel=1,
        interpolation=interpolation,
    )
    net = SVNet(cfg)
    for prm in net.parameters():
        torch.nn.init.zeros_(prm)
    first = model.stages[keep].degradation  # its noise model stays on record; with no back-projection nothing uses it
    deg = Degradation(model.factors, None, first.noise, first.acquisition)
    rec = StageRecord(
        cfg,
        {k: t.detach().clone() for k, t in net.state_dict().items()},
        deg,
        0,
        1,
        {"baseline": BASELINE_NAMES[interpolation], "trained": [s.report for s in model.stages[keep:]]},
    )
    return Model(stages=[*model.stages[:keep], rec], norm=model.norm, factors=model.factors, info=dict(model.info))


BASELINE_NAMES = {"keys": "cubic", "bspline": "B-spline"}  # the baselines' names in reports and verdicts


def baselines(model: Model, denoiser: int = 0) -> dict[str, Model]:
    """The safe baselines the trained operator must beat: Keys cubic and cubic B-spline upsampling,
    after the denoiser when there is one (its stages are kept)."""
    pre = "denoised " if denoiser else ""
    return {f"{pre}{name}": cubic_baseline(model, denoiser, i) for i, name in BASELINE_NAMES.items()}


# How much better on the check the other cubic must be to replace the default one. Measured on the
# 35-case matrix (docs/fidelity.md, section 3b): the check one scale down ranks the two cubics poorly
# (B-spline/Keys check-MSE ratios of 0.92-1.00 where Keys was better against the truth, 0.04-1.05
# where the B-spline was), so the default holds unless the check is clear.
BASELINE_MARGIN = 0.10


# A baseline corrected by back-projection (the interpolation, then iterations that make the output,
# degraded as the input was, agree with the input) is offered beside the network where the
# acquisition is known and the input clean. Measured on the matrix's smooth cases, each row the
# gain over the better cubic against the truth with 2 iterations (the check's choice in brackets):
# nuclei x(2,1,1) cubic-acquired, PSF 2.5: B-spline + back-projection +1.96 dB where the network
# gave +1.68 (check MSE 0.185x the B-spline's against the network's 0.968x); beads x(4,2,2)
# integrated, PSF 2: +1.08 where the network lost to the B-spline on the check (0.736x against
# 8.36x). Both under the acquisition ``selfsim`` found; under the true one the gains were +16 and
# +7 dB (docs/fidelity.md, section 3d).
PROJECTED_ITERS = (2, 5, 10)
# How much better on the check a projected baseline must be to replace a network that wins: it is only
# as right as the acquisition model, which ``selfsim`` may have wrong. Measured: no-PSF nuclei x(4,2,2)
# took it at 0.756x the B-spline's check MSE against the network's 0.775x, and lost 0.90 dB to the
# B-spline where the network had gained 0.12.
PROJECTED_MARGIN = 0.05


def projected_baselines(model: Model) -> dict[str, Model]:
    """Each cubic, then ``n`` back-projection iterations under the model's acquisition, for each
    ``n`` in ``PROJECTED_ITERS``: models the pipeline runs like any other."""
    acq = model.stages[0].degradation.acquisition
    out = {}
    for interp, name in BASELINE_NAMES.items():
        base = cubic_baseline(model, 0, interp)
        s = base.stages[0]
        for n in PROJECTED_ITERS:
            rec = StageRecord(s.config, s.state, Degradation(model.factors, None, None, acq), n, 1, dict(s.report))
            out[f"{name} + back-projection {n}"] = _with_stages(base, [rec])
    return out


def safe_baseline(scores: dict[str, float], names: list[str], default: str) -> str:
    """``default`` unless another baseline beats it on the check by ``BASELINE_MARGIN``."""
    other = min((n for n in names if n != default), key=scores.get)
    return other if scores[other] < scores[default] * (1.0 - BASELINE_MARGIN) else default


def _with_ensemble(model: Model, size: int) -> Model:
    return _with_stages(
        model, [StageRecord(s.config, s.state, s.degradation, s.bp_iters, size, s.report) for s in model.stages]
    )


def _with_stages(model: Model, stages: list[StageRecord]) -> Model:
    """``model`` with other stages, everything else kept."""
    return Model(
        stages=stages,
        norm=model.norm,
        factors=model.factors,
        final=model.final,
        final_bp_iters=model.final_bp_iters,
        info=model.info,
    )


def check_mse(model: Model, src: torch.Tensor, tgt: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(torch.mean((apply_normalised(src, model.spec()) - tgt) ** 2))


def _swap_denoiser(model: Model, net: SVNet) -> Model:
    s = model.stages[0]
    return _with_stages(
        model, [StageRecord(net.config, net.state_dict(), s.degradation, 0, s.ensemble, s.report), *model.stages[1:]]
    )


def do_no_harm(
    model: Model,
    deg: Degradation,
    v: np.ndarray,
    cfg: TrainConfig,
    denoiser: int = 0,
    full_scale: np.ndarray | None = None,
    operator: str = "auto",
    ensemble: int | None = None,
) -> Model:
    """Keep the trained operator only where the held-aside check says it beats the safe baselines
    under every acquisition ``deg`` stands for ("mixed": all three, what ``auto`` checks, because a
    net trained for one model over-sharpens inputs another made: x(2,1,1) point-sampled beads
    scored 0.15x cubic's error on cubic-made check pairs, 1.14x on point-sampled ones, and lost
    6.87 dB against the truth)
    (cubic upsampling, and the denoiser followed by cubic when there is one), with the fewest
    ensemble variants within ``ENSEMBLE_TOLERANCE`` of the best. The check runs one scale down
    (``check_volumes``), on the slab the networks never trained on; the denoising filter is
    fitted afresh to each check source, because the input's own filter is tuned to the input's
    scale (on x2 Poisson-50 filaments the input's filter made denoised cubic score 44% worse than
    cubic at the check scale while it gained 4.3 dB against the truth). The verdict and every
    score go into ``model.info["baseline"]``. ``operator`` other than "auto" forces that offer (and
    ``ensemble`` the network's size) whatever the check says; the scores are recorded all the same."""
    # the denoiser was chosen at the input's own scale (``worth_denoising``): its baseline replaces cubic
    candidates = baselines(model, denoiser)
    variants = {f"ensemble {k}": _with_ensemble(model, k) for k in ENSEMBLES}
    # back-projection needs the acquisition and a clean input (see NOISY_BP)
    projected = projected_baselines(model) if not denoiser and deg.acquisition != "mixed" and deg.noise is None else {}
    scores, per = check_scores({**candidates, **variants, **projected}, deg, v, cfg, denoiser)
    best = min(scores[f"ensemble {k}"] for k in ENSEMBLES)
    size = ensemble or min(k for k in ENSEMBLES if scores[f"ensemble {k}"] <= best * (1.0 + ENSEMBLE_TOLERANCE))
    # clean inputs: the B-spline (its flat passband wins on every clean synthetic case, by up to 7 dB)
    safe = safe_baseline(scores, list(candidates), f"{'denoised ' if denoiser else ''}B-spline")
    offers = {f"ensemble {size}": variants[f"ensemble {size}"]}
    mine = {n: m for n, m in projected.items() if n.startswith(f"{safe} + ")}
    if mine:  # the fewest iterations within ENSEMBLE_TOLERANCE of the best
        low = min(scores[n] for n in mine)
        name = next(n for n in mine if scores[n] <= low * (1.0 + ENSEMBLE_TOLERANCE))
        offers[name] = mine[name]
    pick = net = f"ensemble {size}"
    bp = next((n for n in offers if n != net), None)
    # the projected baseline replaces the network where it is clearly better, or where the network loses
    if bp and (scores[bp] < scores[net] * (1.0 - PROJECTED_MARGIN) or scores[net] >= scores[safe] * (1.0 - WIN_MARGIN)):
        pick = bp
    # it must win under every acquisition the check tried (all three when the input's is unknown), and
    # pass the harm check on the input itself; the other offer is tried where the preferred one fails it
    order = [pick, *(n for n in offers if n != pick)]
    winners = [n for n in order if all(o[n] < o[safe] * (1.0 - WIN_MARGIN) for o in per)]
    pick, contrast, refused = None, None, []
    for n in winners:
        if full_scale is None:
            pick = n
            break
        contrast = plane_contrasts(offers[n], candidates[safe], full_scale, cfg.patch)
        if not contrast["harm"]:
            pick = n
            break
        refused.append(f"{n} (plane contrast {contrast['operator']} against the baseline's {contrast['baseline']})")
    if operator == "projected" and bp is None:
        raise ValueError(
            "--operator projected: back-projection needs a clean input with a known acquisition, and "
            + (
                "noise was measured on this one (noise is never back-projected)"
                if deg.noise is not None
                else "none was estimated (give --acquisition)"
            )
            + "; use --operator baseline or network"
        )
    forced = {"network": net, "projected": bp, "baseline": None}.get(operator, "auto")
    if forced != "auto":
        pick = forced
    trained = pick is not None and pick.startswith("ensemble")
    wins = pick is not None
    if forced != "auto":
        chosen_name = pick or safe
        verdict = (
            f"{'trained operator, ensemble ' + str(size) if trained else chosen_name} (--operator {operator}; "
            f"held-aside check MSE {scores[chosen_name] / scores[safe]:.3g}x the {safe}'s, the trained "
            f"operator's {scores[net] / scores[safe]:.3g}x)"
        )
    elif trained:
        verdict = f"trained operator, ensemble {size}"
    elif wins:  # preferred over the network, or the network lost or was refused
        verdict = (
            f"{pick} (held-aside check MSE {scores[pick] / scores[safe]:.3g}x the {safe}'s, the trained "
            f"operator's {scores[net] / scores[safe]:.3g}x"
            + (f"; refused: {'; '.join(refused)}" if refused else "")
            + ")"
        )
    elif refused:  # harm the check one scale down cannot see
        verdict = f"{safe} upsampling: the plane brightness swings at the factor's period on the input: " + "; ".join(
            refused
        )
    else:
        verdict = f"{safe} upsampling: the trained operator did not beat it on held-aside crops"
    chosen = offers[pick] if wins else candidates[safe]
    chosen.info = dict(chosen.info)
    chosen.info["baseline"] = {
        "used": not trained,
        "verdict": verdict,
        "safe": safe,  # the better baseline on the check: the one the network had to beat
        "ensemble": size if trained else 1,
        "back_projection": chosen.stages[-1].bp_iters if wins and not trained else 0,
        "scores": {k: float(x) for k, x in scores.items()},
        "checks": len(per),
        "plane_contrast": contrast,  # of the last operator the harm check measured
        "refused_for_harm": refused,
        "operator": operator,  # "auto": the check chose; else the user's --operator
        "per_acquisition": {
            a: {k: float(x) for k, x in o.items()}
            for a, o in zip(ACQUISITIONS if len(per) > 1 else (deg.acquisition,), per)
        },
    }
    return chosen


# A per-plane brightness error the check one scale down cannot see: on serial two-photon data with a
# dim first optical section per physical section, the network's output planes swung from 0.66 to
# 1.51 of the truth's brightness (cubic's 0.86-1.31), alternating beside the dim planes, while the
# check approved it. Its signature is brightness that alternates between the f output planes made
# from one input plane, measured on the input itself against the safe baseline's output there.
# What this guard catches, measured (docs/fidelity.md, section 3d): gross alternation (a constructed
# +-0.05 swing; back-projection amplifying Poisson-50 noise, 0.159 against the B-spline's 0.070). What it
# does not: the reproduced dim-plane failures (matrix nuclei / texture x(2,1,1) with every 4th / 3rd
# input plane at 0.6, networks -5.48 / -2.81 dB) measured 0.099 against 0.063 and 0.075 against 0.064,
# inside the sound networks' range on the matrix (up to 3.3x and +0.074: sub-voxel beads x4 0.030 against
# 0.009; noisy filaments x(4,1,1) 0.144 against 0.070). The limit sits above the sound networks.
PLANE_CONTRAST_RATIO = 1.5  # the operator's within-cell plane contrast may be this multiple of the baseline's ...
PLANE_CONTRAST_FLOOR = 0.04  # ... plus this fraction of the mean brightness


def plane_contrast(y: torch.Tensor, factors: tuple[int, ...]) -> list[float]:
    """Per axis: the rms deviation of each output plane's mean from the mean of the ``f`` planes made
    from one input plane, over the mean magnitude (0 where the factor is 1). Plane means vary slowly
    in any volume; within one input plane's cell only an operator's alternating error moves them."""
    scale = float(y.abs().mean()) or 1.0
    out = []
    for a, f in enumerate(factors):
        if f == 1:
            out.append(0.0)
            continue
        m = y.double().mean(dim=tuple(i for i in range(y.ndim) if i != a))
        m = m[: m.shape[0] // f * f].reshape(-1, f)
        out.append(float(torch.sqrt(torch.mean((m - m.mean(dim=1, keepdim=True)) ** 2))) / scale)
    return out


def plane_contrasts(op: Model, base: Model, v: np.ndarray, patch: int) -> dict:
    """Within-cell plane contrast (``plane_contrast``) of the operator's and the baseline's outputs on
    a held-aside box of the input ``v`` itself, and whether the operator's is harm."""
    sl = held_aside_slab(v.shape, (1,) * v.ndim, 2 * patch)
    src = torch.from_numpy(np.ascontiguousarray(v[sl]))
    with torch.inference_mode():
        c_op = plane_contrast(apply_normalised(src, op.spec()), op.factors)
        c_base = plane_contrast(apply_normalised(src, base.spec()), base.factors)
    harm = any(o > PLANE_CONTRAST_RATIO * b + PLANE_CONTRAST_FLOOR for o, b in zip(c_op, c_base))
    return {
        "operator": [round(c, 4) for c in c_op],
        "baseline": [round(c, 4) for c in c_base],
        "harm": bool(harm),
    }


def _check_denoiser(src: torch.Tensor, seed: int) -> SVNet | None:
    """The blind filter fitted to a check source, or None (the input's own filter stays) where the
    source is too thin for one (x4 of a 16-slice stack leaves 4 slices)."""
    try:
        return as_network(*fit_blind_filter(src.numpy(), seed)[:2])
    except ValueError:
        return None


def check_scores(
    models: dict[str, Model], deg: Degradation, v: np.ndarray, cfg: TrainConfig, denoiser: int = 0
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Each model's MSE on the held-aside check (``check_volumes``): the mean over the check volumes,
    and per check volume. A denoiser (the first ``denoiser`` stages) is fitted afresh to each check
    source (see ``do_no_harm``)."""
    vols = check_volumes(v, deg, cfg.seed)
    scores = {k: 0.0 for k in models}
    per: list[dict[str, float]] = []
    for src, tgt in vols:
        sl = held_aside_slab(tuple(src.shape), deg.factors, 2 * cfg.patch)
        s_src = src[sl].contiguous()
        s_tgt = tgt[tuple(slice(a.start * f, a.stop * f) for a, f in zip(sl, deg.factors))].contiguous()
        swap = _check_denoiser(src, cfg.seed) if denoiser else None
        one = {}
        for name, m in models.items():
            one[name] = check_mse(m if swap is None else _swap_denoiser(m, swap), s_src, s_tgt)
            scores[name] += one[name] / len(vols)
        per.append(one)
    return scores, per


def _denoised_cubic(
    denoiser: StageRecord, norm, factors, acquisition, acq, psf_fwhm, seed, v, cfg, nm0, t_start, quiet
) -> Model:
    """The model for denoised inputs (DENOISED_SR): the blind denoising filter, then the better cubic
    (Keys or B-spline) on the held-aside check, noise-matched, under every acquisition."""
    drep = denoiser.report
    lend = Model(stages=[denoiser, denoiser], norm=norm, factors=factors)  # the second only lends its record
    cands = baselines(lend, 1)
    deg = Degradation(factors, None, (nm0.gain, nm0.offset), "mixed")
    scores, _ = check_scores(cands, deg, v, cfg, 1)
    # denoised inputs: Keys (the B-spline's stronger response near Nyquist carries the noise left)
    safe = safe_baseline(scores, list(cands), "denoised cubic")
    model = cands[safe]
    model.info = {
        "seed": seed,
        "train_shape": list(v.shape),
        "steps": 0,
        "acquisition": {
            "chosen": acquisition if acquisition != "auto" else f"auto ({AUTO_ACQUISITION})",
            "trained_with": acq,
            "psf_fwhm": None if psf_fwhm is None else list(psf_fwhm),
        },
        "noise_estimate": nm0.std(0.5),
        "denoiser": True,
        "denoise_check": drep,
        "baseline": {
            "used": True,
            "verdict": f"{safe} upsampling (noisy input: no SR network, see train.DENOISED_SR)",
            "safe": safe,
            "ensemble": 1,
            "scores": {k: float(x) for k, x in scores.items()},
        },
    }
    model.stages[-1].report["trained"] = []
    model.info["fit_seconds"] = round(time.perf_counter() - t_start, 2)
    if not quiet:
        summarise(model)
    return model


def summary(model: Model) -> tuple[str, str]:
    """(what the model computes and why, the flag that reverses it), from ``model.info``."""
    b = model.info.get("baseline") or {}
    verdict = b.get("verdict", "")
    if model.info.get("denoiser"):
        return (
            f"result: {verdict}",
            "--operator network (or --denoise off) trains the SR network on the noisy input instead",
        )
    if b.get("operator", "auto") != "auto":
        return f"result: {verdict}", "--operator auto lets the held-aside check choose"
    if b.get("used") and b.get("back_projection"):
        return (
            f"result: {verdict}",
            "--operator network forces the trained network, --operator baseline the plain cubic",
        )
    if b.get("used"):
        return (
            f"result: {verdict}",
            "--operator network forces the trained network; --acquisition and --psf-fwhm change what it learns",
        )
    return (
        f"result: {verdict}",
        "--operator baseline gives the plain cubic; --acquisition and --psf-fwhm change what the network learns",
    )


def summarise(model: Model) -> None:
    """The one closing line ``train`` and ``run`` print (and log as a ``summary`` decision record)."""
    text, reverse = summary(model)
    decision(f"{text} ({reverse})", "summary", result=text[len("result: ") :], reverse=reverse)


def choose_final_bp(
    ops: list[StageOp], norm: Normalisation, deg: Degradation, v: np.ndarray, cfg: TrainConfig
) -> tuple[int, dict]:
    """Closing full-factor back-projection against the input: keep it only if held-aside crops say so."""
    patch = patch_shape(v.shape, deg.factors, 2 * cfg.patch)
    _, val_region, _ = split_regions(v.shape, patch)
    sampler = PairSampler(
        v, val_region, patch_shape(val_region.shape, deg.factors, 2 * cfg.patch), deg, foreground_threshold(v)
    )
    val = _check_pairs(_val_pairs(sampler, max(4, cfg.n_val // 2), cfg.seed + 1), deg)
    stage1_iters = ops[0].bp_iters
    candidates = sorted({0, stage1_iters, 10 if stage1_iters else 0})
    errors = {n: [] for n in candidates}
    spec = OperatorSpec(tuple(ops), norm)
    with torch.inference_mode():
        for lr, hr in val:
            y = apply_normalised(lr, spec)
            done = 0
            for n in candidates:
                y = back_project(y, lr, deg, n - done, norm.bounds_n)
                done = n
                errors[n].append(torch.mean((y - hr) ** 2).item())
    scores = {n: float(np.mean(e)) for n, e in errors.items()}
    return _fewest_good(scores), {str(k): v for k, v in scores.items()}
