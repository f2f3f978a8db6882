"""Whether to denoise, decided from the input alone, and what the result is when it is denoised.

The noise model (``noise.py``) and the blind filter (``denoise.py``) measure; the decisions here
use them: whether the noise is material (``choose_noise``), whether removing it pays at the
input's own scale (``worth_denoising``), whether what it would remove is noise alone
(``residual_whiteness``), how much of each voxel to keep (``blend_centre``), and
how much noise the check may assume where the filter refused it (``bounded_noise``). A denoised
input gets the filter, then the better cubic, and no SR network (``DENOISED_SR``,
``denoised_cubic``). ``decide_noise`` runs them in order and returns one ``NoiseDecision``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .degrade import Degradation
from .denoise import fit_blind_filter
from .harmcheck import baselines, check_scores, safe_baseline, summarise
from .model import Model, StageRecord
from .noise import NoiseModel, noise_bins
from .progress import decision
from .stages import DenoiserStage

if TYPE_CHECKING:
    from .operator import Normalisation
    from .settings import FitRequest

# background noise std (normalised): clean synthetic data (0.2% read noise) 0.0011-0.0014, 1% read noise 0.0045-0.0062
BACKGROUND_STD_THRESHOLD = 0.003
NOISE_STD_THRESHOLD = 0.02  # noise std at mid intensity (normalised): Poisson-1000 data measure 0.023-0.030 and are worth denoising (+0.6 to +7.5 dB); clean data with a PSF measure up to 0.025 (signal leak), which `worth_denoising` then refuses (their blind error is far below it)

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


# DENOISED_SR: noisy data that the blind filter denoises get the filter, then cubic upsampling, and no
# SR network (``fit`` returns ``denoised_cubic``). Measured against the truth (x2, integrate
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
    why = f"filter error {err:.3g} {verb} {DENOISE_MARGIN:g} x noise variance {nv:.3g}"
    white = report.get("residual_whiteness")
    if white is not None and err < DENOISE_MARGIN * nv:
        verb = ">=" if white >= MIN_RESIDUAL_WHITENESS else "<"
        why += f"; residual whiteness {white:.3g} {verb} {MIN_RESIDUAL_WHITENESS:g}"
        if white < MIN_RESIDUAL_WHITENESS:
            why += " (the filter would remove structure, not only noise)"
    return why


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


# The residual the filter leaves (input minus filtered) is the noise it removes, plus any signal it removes.
# Independent noise through the residual's filter (identity minus the blended filter) has a known lag-1
# autocorrelation; removed signal is smoother than that and pulls the measured one towards zero.
# ``residual_whiteness`` is the measured over the predicted, summed over axes: 1 for a residual of pure
# noise. Measured on every input the filter denoised at defaults (the quality matrix, the anisotropic
# z-stacks and the real volumes, docs/fidelity.md 2b): 0.754-0.859 on the 11 where denoising gained
# (+0.90 to +7.61 dB) and 0.769 on one at +0.02, 0.603-0.677 on the 4 where it lost (-0.88 to -2.45 dB),
# 0.697 on cells3d x2 (+0.10, -0.28 dB refused: the B-spline where Keys is better): kept, hence 0.69.
MIN_RESIDUAL_WHITENESS = 0.69
WHITENESS_VOXELS = 1_000_000  # voxels of the central crop the residual's autocorrelation is measured on
MIN_PREDICTED_CORRELATION = 0.1  # |predicted lag-1 autocorrelation| (summed over axes) below which nothing is said


def residual_whiteness(v: np.ndarray, w: np.ndarray, off: float) -> float:
    """The lag-1 autocorrelation of ``v - (w * v + off)`` along each axis, summed, over what independent
    noise through the same residual filter would give (1: the residual is noise; lower: it holds
    structure, so the filter removes signal). No noise level is assumed: only that noise is independent
    from voxel to voxel, which correlated noise would break towards refusing the filter, the safe side."""
    from scipy import ndimage

    from .selfsim import central_crop

    x = central_crop(np.asarray(v, np.float64), WHITENESS_VOXELS)
    r = x - ndimage.correlate(x, w, mode="mirror") - off
    reach = w.shape[0] // 2
    r = r[tuple(slice(reach, n - reach) for n in r.shape)]
    h = -np.asarray(w, np.float64)
    h[(reach,) * h.ndim] += 1.0
    measured = predicted = 0.0
    for axis in range(r.ndim):
        a = np.moveaxis(r, axis, 0)
        if a.shape[0] < 2 or a[0].size == 0:  # too thin after the filter's margin: this axis says nothing
            continue
        a0, a1 = a[:-1] - a[:-1].mean(), a[1:] - a[1:].mean()
        measured += float(np.mean(a0 * a1) / np.sqrt(np.mean(a0 * a0) * np.mean(a1 * a1)))
        g = np.moveaxis(h, axis, 0)
        predicted += float(np.sum(g[:-1] * g[1:]) / np.sum(h * h))
    # a broad, weak filter predicts almost no correlation, and the ratio is then sampling noise (white noise
    # through a 5^3 mean filter: predicted -0.029 over the axes, 0.64-0.74 measured on 48^3 voxels); the blind
    # filters fitted on the matrix's inputs predicted -0.26 to -2.5
    return measured / predicted if predicted < -MIN_PREDICTED_CORRELATION else 1.0


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


@dataclass
class NoiseDecision:
    """What ``fit`` found about the input's noise and what it does about it (``decide_noise``)."""

    model: NoiseModel | None  # the noise the SR stages match and the check carries (None: clean)
    stage_mode: str | bool  # the ``noise`` mode each stage's own noise estimate runs with
    refused: NoiseModel | None = None  # noise the filter would not remove: the check still carries it
    report: dict = field(default_factory=dict)  # the blind filter's figures (``worth_denoising``)
    denoiser: StageRecord | None = None  # the denoising stage, when the input is denoised


def decide_noise(
    v: np.ndarray, noise: str | bool, denoise: str | bool, operator: str, acq: str, seed: int, quiet: bool
) -> NoiseDecision:
    """Measure the noise of the normalised training sample ``v``, try the blind filter where there is
    noise, and decide: denoise (the filter as a first stage, ``denoiser``), refuse (the noise is taken
    for structure, ``refused``), or train with noise-matched pairs (``model``). ``operator`` "network"
    trains on the input as it is; "projected" cannot follow a denoiser (one-line ValueError)."""
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
    if worth:  # the residual of the filter as it would run (blended): noise only, or signal too?
        wb, offb = blend_centre(w.copy(), off, dict(drep))
        drep["residual_whiteness"] = round(residual_whiteness(v, wb, offb), 4)
        worth = drep["residual_whiteness"] >= MIN_RESIDUAL_WHITENESS
        drep["used"] = bool(worth)
    if w is not None:
        drep.update(mode=mode, forced=mode == "on" and not worth)
        if not quiet and not worth:
            decision(
                f"noise measured, not removed: {denoise_reason(drep)}{_HOW_TO_DENOISE[mode]}", "denoise", used=False
            )
    if w is not None and (worth or mode == "on"):  # the filter, then the better cubic: no SR network (DENOISED_SR)
        return NoiseDecision(nm_any, noise, None, drep, _denoiser(w, off, drep, nm_any, acq, mode, quiet))
    if REFUSED_NOISE_AS_CLEAN and nm0 is not None and drep and not drep.get("used"):
        return NoiseDecision(None, False, nm0, drep)  # see REFUSED_NOISE_AS_CLEAN
    return NoiseDecision(nm0, noise, None, drep)


def _denoiser(w: np.ndarray, off: float, drep: dict, nm: NoiseModel, acq: str, mode: str, quiet: bool) -> StageRecord:
    """The blind filter, blended with the voxel itself (``blend_centre``), as a factor-1 first stage."""
    w, off = blend_centre(w, off, drep)
    drep.update(noise=[nm.gain, nm.offset], noise_std_mid=nm.std(0.5))
    if not quiet:
        decision(
            f"noise found (std {nm.std(0.5):.3g} at mid range): denoising first with a {drep['kind']} "
            f"({denoise_reason(drep)}){_HOW_TO_DENOISE[mode]}",
            "denoise",
            used=True,
        )
    return DenoiserStage(w, off, acq, drep).record()


def denoised_cubic(dec: NoiseDecision, req: FitRequest, norm: Normalisation, v: np.ndarray, t_start: float) -> Model:
    """The model for denoised inputs (DENOISED_SR): the blind denoising filter, then the better cubic
    (Keys or B-spline) on the held-aside check, noise-matched, under every acquisition."""
    if req.operator == "projected":
        raise ValueError(
            "--operator projected: back-projection needs a clean input, and this one is denoised "
            "(noise is never back-projected); use --operator baseline or network"
        )
    nm0, denoiser = dec.model, dec.denoiser
    cands = baselines(Model(stages=[denoiser], norm=norm, factors=req.factors))  # what the baselines follow
    deg = Degradation(req.factors, None, (nm0.gain, nm0.offset), "mixed")
    scores, _ = check_scores(cands, deg, v, req.cfg)
    # denoised inputs: the B-spline, as on clean ones. Measured on the 14 matrix cases the filter denoises
    # (docs/fidelity.md, 3b; ``python benchmarks/denoised_cubics.py``): better than Keys after the filter on
    # 13, by 0.004-1.20 dB, worse on one by 0.12; the check cannot rank them (B-spline/Keys 0.83-1.002)
    safe = safe_baseline(scores, list(cands), "denoised B-spline")
    model = cands[safe]
    model.info = {
        "seed": req.seed,
        "train_shape": list(v.shape),
        "steps": 0,
        "acquisition": {
            "chosen": req.acquisition if req.acquisition != "auto" else f"auto ({req.acq})",
            "trained_with": req.acq,
            "psf_fwhm": None if req.psf_fwhm is None else list(req.psf_fwhm),
        },
        "noise_estimate": nm0.std(0.5),
        "denoiser": True,
        "denoise_check": denoiser.report,
        "baseline": {
            "used": True,
            "verdict": f"{safe} upsampling (noisy input: no SR network, see noisecheck.DENOISED_SR)",
            "safe": safe,
            "ensemble": 1,
            "scores": {k: float(x) for k, x in scores.items()},
        },
    }
    model.info["fit_seconds"] = round(time.perf_counter() - t_start, 2)
    if not req.quiet:
        summarise(model)
    return model
