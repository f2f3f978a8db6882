"""Self-supervised training: one network per x2 stage, settings chosen on held-aside crops.

``fit`` is the whole recipe, a row of named decisions: global normalisation, the noise
(``noisecheck``), the input's acquisition and blur (``selfsim``), stage-by-stage training (the
second x2 stage learns from the first stage's output), the data-dependent inference settings
(back-projection iterations, closing full-factor back-projection) picked by how well the operator
reconstructs crops the network never trained on, and what the result is (``harmcheck``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import selfsim
from .checkpoint import Checkpoints, digest, rng_state, set_rng_state
from .degrade import ACQUISITIONS, Degradation, blur
from .harmcheck import do_no_harm, summarise
from .intensity import foreground_threshold, measure_normalisation
from .model import Model, StageRecord
from .network import NetConfig, SVNet
from .noisecheck import NoiseDecision, bounded_noise, choose_noise, decide_noise, denoised_cubic
from .operator import Normalisation, OperatorSpec, StageOp, back_project, clamp_, predict
from .passes import apply_normalised
from .progress import Progress, decision
from .sampling import PairSampler, patch_shape, split_regions
from .settings import (
    FitRequest,
    TrainConfig,
    fit_options,
    fit_request,
    split_stages,
)
from .stages import NetworkStage

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
        best, running, first = _resume(saved, net, opt, sched, rng, gen)
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
                checkpoints.save(stage, ident, _state(step, net, opt, sched, rng, gen, best, running))
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


def _state(step: int, net: SVNet, opt, sched, rng, gen, best: tuple, running: float | None) -> dict:
    """The whole training state after ``step``: what a checkpoint holds."""
    return {
        "step": step,
        "net": net.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": rng_state(rng, gen),
        "best_loss": best[0],
        "best": best[1],
        "best_step": best[2],
        "running": running,
    }


def _resume(saved: dict, net: SVNet, opt, sched, rng, gen) -> tuple[tuple, float | None, int]:
    """Load a checkpoint's state (``_state``) into the training objects: (best, running loss, first step)."""
    net.load_state_dict(saved["net"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    set_rng_state(rng, gen, saved["rng"])
    return (saved["best_loss"], saved["best"], saved["best_step"]), saved["running"], saved["step"] + 1


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
            y = clamp_(predict(stage.net, lr, stage.ensemble, zflip=stage.zflip), floor)
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


# --------------------------------------------------------------------------- fit: named decisions


@dataclass(frozen=True)
class AcquisitionDecision:
    """How the input was recorded, as ``fit`` trains for it (``decide_acquisition``)."""

    acquisition: str
    blur: tuple[float, ...]  # the input's own blur (FWHM, input voxels) that training pairs share
    found: selfsim.SelfSimilarity | None = None  # the estimate, where one was made


AUTO_NOTE = " (auto; --acquisition overrides)"


def decide_acquisition(v: np.ndarray, req: FitRequest, noisy: bool) -> AcquisitionDecision:
    """The given blur, or on a clean input the acquisition and blur cross-scale self-similarity finds
    (noise would read as sharpness: noisy inputs train with the asked model and no blur)."""
    if req.psf_fwhm is not None:
        return AcquisitionDecision(req.acq, tuple(float(q) for q in req.psf_fwhm))
    if noisy:
        return AcquisitionDecision(req.acq, (0.0,) * v.ndim)
    first = split_stages(req.factors)[0]
    found = selfsim.estimate(v, first, ACQUISITIONS if req.acquisition == "auto" else (req.acq,))
    if not req.quiet:
        decision(
            f"acquisition {found.acquisition}{AUTO_NOTE if req.acquisition == 'auto' else ''}, "
            f"input blur FWHM {tuple(round(q, 2) for q in found.psf_fwhm)} voxels (--psf-fwhm overrides; spectral "
            "mismatch " + ", ".join(f"{a} {c:.3g}" for a, c in found.scores.items()) + ")",
            "acquisition",
            acquisition=found.acquisition,
            psf_fwhm=list(found.psf_fwhm),
        )
        rivals = found.rivals() if req.acquisition == "auto" else {}
        if rivals:
            named = ", ".join(f"{a} (mismatch {r:.2f}x)" for a, r in rivals.items())
            decision(
                f"acquisition ambiguous: {named} fits the input almost as well as {found.acquisition}, and the "
                "input alone cannot tell them apart; where it is known, --acquisition gives it (integrate: camera "
                "pixels, a detector's dwell; sample: point scanning, z-steps)",
                "acquisition",
                ambiguous_with=sorted(rivals),
            )
    return AcquisitionDecision(found.acquisition, found.psf_fwhm, found)


def train_stages(
    v: np.ndarray, req: FitRequest, acq: AcquisitionDecision, noise: NoiseDecision, norm: Normalisation
) -> tuple[list[StageRecord], list[StageOp]]:
    """Train the x2 stages in turn; each after the first learns from the previous stages' output on
    the input itself, blurred as that output is."""
    stages: list[StageRecord] = []
    ops: list[StageOp] = []
    plan = split_stages(req.factors)
    stage_source, stage_blur = v, acq.blur
    for i, sf in enumerate(plan):
        stage_input = blurred(stage_source, selfsim.pair_blur(stage_blur, sf))
        nm = choose_noise(stage_input, noise.stage_mode)
        deg = Degradation(sf, None, None if nm is None else (nm.gain, nm.offset), acq.acquisition)
        label = f"stage {i + 1} {'x'.join(map(str, sf))}"
        net, val, report = train_stage(stage_input, deg, req.cfg, label=label, checkpoints=req.checkpoints, stage=i)
        bp, scores = choose_bp_iters(
            StageOp(net, deg, 0, ensemble=TRAIN_ENSEMBLE), val, norm.bounds_n, req.cfg.bp_candidates
        )
        if nm is not None:  # noisy: none, whatever the (biased) check says, see NOISY_BP
            bp = NOISY_BP
        if req.back_projection is not None:  # the user's number (--back-projection), whatever the check says
            bp = req.back_projection
        report.update(
            bp_iters=bp,
            bp_val_mse=scores,
            noise=None if nm is None else [nm.gain, nm.offset],
            noise_std_mid=None if nm is None else nm.std(0.5),
            pair_blur=list(selfsim.pair_blur(stage_blur, sf)),
        )
        if not req.quiet:
            decision(
                f"stage {i + 1}: factors {sf}, val loss {report['val_loss']:.3g}, "
                f"back-projection {bp} iterations{_bp_why(req, nm)} (val mse {scores}), "
                f"noise matching {'on' if nm else 'off'}, {report['seconds']:.0f} s",
                "stage",
                stage=i + 1,
                bp_iters=bp,
            )
        ops.append(StageOp(net, deg, bp, ensemble=TRAIN_ENSEMBLE))
        stages.append(NetworkStage(net, deg, bp, report).record())
        if i + 1 < len(plan):  # the next stage learns from this one's output on the input itself
            sub = stage_source[sample_box(stage_source.shape, stage_source, req.max_stage2_voxels)]
            spec = OperatorSpec(tuple(ops), norm)
            stage_source = apply_normalised(torch.from_numpy(np.ascontiguousarray(sub)), spec).numpy()
            stage_blur = tuple(q * f for q, f in zip(stage_blur, sf))
    return stages, ops


def _bp_why(req: FitRequest, nm) -> str:
    """Why a stage's back-projection is what it is, where the check did not choose it."""
    if req.back_projection is not None:
        return " (--back-projection)"
    return " (noisy data: none)" if nm else ""


def closing_projection(
    ops: list[StageOp], norm: Normalisation, full: Degradation, v_check: np.ndarray, req: FitRequest
) -> tuple[Degradation | None, int, dict]:
    """(degradation, iterations, check scores) of the closing full-factor back-projection: only for
    several stages on a clean input (never back-project onto a noisy input, NOISY_BP)."""
    forced = req.back_projection
    if len(ops) < 2 or (full.noise is not None and forced is None):
        return None, 0, {}
    iters, scores = choose_final_bp(ops, norm, full, v_check, req.cfg)
    if forced is not None:  # the check ran and is recorded; the user's number is used
        iters = forced
    if not req.quiet:
        why = " (--back-projection: the check's scores are beside it)" if forced is not None else ""
        decision(
            f"closing x{'x'.join(map(str, req.factors))} back-projection: {iters} iterations{why} (val mse {scores})",
            "closing back-projection",
            bp_iters=iters,
        )
    return full, iters, scores


def trained_model(
    stages: list[StageRecord],
    norm: Normalisation,
    req: FitRequest,
    v: np.ndarray,
    acq: AcquisitionDecision,
    noise: NoiseDecision,
    final: tuple[Degradation | None, int, dict],
) -> Model:
    """The trained stages as a model, with every decision recorded in ``info``."""
    return Model(
        stages=stages,
        norm=norm,
        factors=req.factors,
        final=final[0],
        final_bp_iters=final[1],
        info={
            "seed": req.seed,
            "final_bp_val_mse": final[2],
            "back_projection": {  # what the network stages and the closing projection use, and who chose it
                "chosen": "auto" if req.back_projection is None else req.back_projection,
                "stages": [s.bp_iters for s in stages],
                "closing": final[1] if final[0] is not None else None,
            },
            "train_shape": list(v.shape),
            "steps": req.cfg.steps,
            "acquisition": {
                "chosen": req.acquisition if req.acquisition != "auto" else f"auto ({acq.acquisition})",
                "trained_with": acq.acquisition,
                "psf_fwhm": list(acq.blur),
                "psf_given": req.psf_fwhm is not None,
                "self_similarity": None if acq.found is None else acq.found.record(),
            },
            "noise_estimate": None if noise.model is None else noise.model.std(0.5),
            "denoiser": False,
            "denoise_check": noise.report or None,
        },
    )


def check_degradation(
    full: Degradation, req: FitRequest, acq: AcquisitionDecision, noise: NoiseDecision
) -> Degradation:
    """What the held-aside check repeats: the input's acquisition once estimated or given (without an
    estimate, noisy data, ``auto`` must win under all three: "mixed"); noise the filter refused is
    carried, bounded by the blind error, so that a net that copies noise loses there."""
    known = req.acquisition != "auto" or acq.found is not None
    check = full if known else Degradation(full.factors, None, full.noise, "mixed")
    if noise.refused is not None:  # noise-matched sources, recorrupted targets
        capped = bounded_noise(noise.refused, noise.report)  # no more noise than the blind error allows
        check = Degradation(check.factors, None, (capped.gain, capped.offset), check.acquisition)
    return check


def fit(volume: np.ndarray, factor: int | tuple[int, ...] | str = 2, **options: Any) -> Model:
    """Train a model on ``volume`` (numpy (z, y, x) or (y, x)) for the given upsampling factor.

    The options are ``FitOptions``' fields (each with its meaning there): ``steps``, ``seed``,
    ``psf_fwhm``, ``noise``, ``quiet``, ``acquisition``, ``denoise``, ``max_train_voxels``,
    ``max_stage2_voxels``, ``config``, ``norm``, ``operator``, ``ensemble``, ``back_projection``,
    ``checkpoint_dir``, ``axial``, ``z_spacing``.
    The recipe is a row of named decisions, each recorded in ``model.info``: the noise
    (``noisecheck.decide_noise``: a denoised input gets the filter, then the better cubic), the
    acquisition and blur (``decide_acquisition``), the stages (``train_stages``), the closing
    back-projection (``closing_projection``), and what the result is (``harmcheck.do_no_harm``).
    """
    opts = fit_options(options)
    volume = np.asarray(volume)
    req = fit_request(volume, factor, opts)
    norm = opts.norm or measure_normalisation(volume)
    v_full = norm.forward_array(volume).numpy()
    v = v_full[sample_box(v_full.shape, v_full, req.max_train_voxels)]
    t_start = time.perf_counter()
    noise = decide_noise(v, req.noise, req.denoise, req.operator, req.acq, req.seed, req.quiet)
    if req.axial == "lateral":  # after the denoiser where the noise decision chose it, else noise-matched pairs
        from .lateral import fit_lateral

        return fit_lateral(v, req, norm, noise, t_start)
    if noise.denoiser is not None:
        return denoised_cubic(noise, req, norm, v, t_start)
    acq = decide_acquisition(v, req, noise.model is not None)
    stages, ops = train_stages(v, req, acq, noise, norm)
    noise_t = None if noise.model is None else (noise.model.gain, noise.model.offset)
    full = Degradation(req.factors, None, noise_t, acq.acquisition)  # check crops carry the input's noise
    v_check = blurred(v, selfsim.pair_blur(acq.blur, req.factors))  # checks one scale down, blurred as pairs are
    model = trained_model(stages, norm, req, v, acq, noise, closing_projection(ops, norm, full, v_check, req))
    check = check_degradation(full, req, acq, noise)
    model = do_no_harm(model, check, v_check, req.cfg, full_scale=v, operator=req.operator, ensemble=req.ensemble)
    model.info["fit_seconds"] = round(time.perf_counter() - t_start, 2)
    if not req.quiet:
        b = model.info["baseline"]
        decision(f"held-aside check (val mse): {b['scores']}", "check", scores=b["scores"])
        summarise(model)
    return model


# While training, stages run one variant (the back-projection choice, a second stage's input, the
# closing back-projection); ``do_no_harm`` then picks the ensemble the model keeps. Every measured
# result since the acquisition models came in ran so: ``ensemble=True`` read as one variant then.
TRAIN_ENSEMBLE = 1


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
