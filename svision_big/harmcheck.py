"""Do no harm: the held-aside check that decides what the result is.

After training, the whole training sample is degraded once more, and on the slab the networks
never trained on the check scores the safe baselines (Keys cubic and cubic B-spline, each also
back-projected where that is safe) and the trained operator with 8, 4 and 1 ensemble variants.
The operator is kept only where it beats the safe baseline under every acquisition the check
stands for, and passes the harm check on the input itself (``plane_contrasts``). Everything here
returns models the pipeline runs like any other: a baseline is a one-stage net whose correction
is exactly zero.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .degrade import ACQUISITIONS, Degradation
from .denoise import as_network, fit_blind_filter
from .model import Model, StageRecord
from .network import SVNet
from .operator import ENSEMBLES
from .passes import apply_normalised
from .progress import decision
from .sampling import patch_shape, split_regions
from .stages import BASELINE_NAMES, BaselineStage, leading_denoisers

if TYPE_CHECKING:
    from .settings import TrainConfig

ENSEMBLE_TOLERANCE = 0.005  # relative MSE a larger ensemble must beat (each halving halves the network's cost)
WIN_MARGIN = 0.02  # relative MSE an offer must beat the better cubic by (~0.09 dB): the check is a sample


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


def cubic_baseline(model: Model, interpolation: str = "keys") -> Model:
    """The safe baseline as a model: the model's denoiser, if it has one, then ``interpolation`` (Keys or
    B-spline) by the whole factor, with no ensemble and no back-projection (``stages.BaselineStage``),
    so the pipeline runs it like any model."""
    keep = leading_denoisers(model.stages)
    # the stage it replaces lends its noise model and acquisition (a denoiser alone lends its own): with
    # no back-projection nothing uses them
    first = model.stages[min(keep, len(model.stages) - 1)].degradation
    stage = BaselineStage(
        model.factors, interpolation, 0, first.noise, first.acquisition, [s.report for s in model.stages[keep:]]
    )
    return Model(
        stages=[*model.stages[:keep], stage.record()], norm=model.norm, factors=model.factors, info=dict(model.info)
    )


def baselines(model: Model) -> dict[str, Model]:
    """The safe baselines the trained operator must beat: Keys cubic and cubic B-spline upsampling,
    after the model's denoiser when it has one (the denoiser is kept)."""
    pre = "denoised " if leading_denoisers(model.stages) else ""
    return {f"{pre}{name}": cubic_baseline(model, i) for i, name in BASELINE_NAMES.items()}


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
    for interp in BASELINE_NAMES:
        for n in PROJECTED_ITERS:
            stage = BaselineStage(model.factors, interp, n, None, acq, [s.report for s in model.stages])
            out[stage.label] = Model(
                stages=[stage.record()], norm=model.norm, factors=model.factors, info=dict(model.info)
            )
    return out


def default_baseline(deg: Degradation, denoised: bool) -> str:
    """The cubic the check keeps unless the other beats it by ``BASELINE_MARGIN``: the B-spline after
    the filter and on clean inputs (its flatter passband), Keys on point-sampled inputs that keep
    their noise. Point samples keep the noise at its full variance, and the B-spline carries more of
    it: summed squared weights 0.871 per upsampled axis against Keys' 0.809 (x2; x4 0.874 / 0.814).
    Measured against the truth (docs/fidelity.md, section 3b): Keys is better on 8 of the 9 noisy
    point-sampled cases (4 real, by 0.13-0.28 dB; 4 synthetic, by 0.04-0.30), the B-spline on the
    ninth (anisotropic beads, Poisson 200, by 0.23) and on all 8 clean ones (by 0.10-7.13 dB)."""
    if denoised:
        return f"denoised {BASELINE_NAMES['bspline']}"
    keys = deg.acquisition == "sample" and deg.noise is not None
    return BASELINE_NAMES["keys" if keys else "bspline"]


def safe_baseline(scores: dict[str, float], names: list[str], default: str) -> str:
    """``default`` unless another baseline beats it on the check by ``BASELINE_MARGIN``."""
    other = min((n for n in names if n != default), key=scores.get)
    return other if scores[other] < scores[default] * (1.0 - BASELINE_MARGIN) else default


def beats_every_baseline(name: str, per: list[dict[str, float]], baselines: list[str]) -> bool:
    """Whether offer ``name`` beats the better baseline by ``WIN_MARGIN`` on every check in ``per``.
    The better one, not the safe one: where Keys is the default and the B-spline scores between them,
    an offer that beats only Keys would lose to a baseline the check itself ranked above it."""
    return all(o[name] < min(o[b] for b in baselines) * (1.0 - WIN_MARGIN) for o in per)


def _with_ensemble(model: Model, size: int) -> Model:
    return _with_stages(model, [replace(s, ensemble=size) for s in model.stages])


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
    """``model`` with the filter ``net`` (fitted to a check source) in place of its own denoiser's."""
    s = model.stages[0]
    return _with_stages(model, [replace(s, config=net.config, state=net.state_dict()), *model.stages[1:]])


def do_no_harm(
    model: Model,
    deg: Degradation,
    v: np.ndarray,
    cfg: TrainConfig,
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
    candidates = baselines(model)
    variants = {f"ensemble {k}": _with_ensemble(model, k) for k in ENSEMBLES}
    # back-projection needs the acquisition and a clean input (see train.NOISY_BP)
    denoised = leading_denoisers(model.stages) > 0
    projected = projected_baselines(model) if not denoised and deg.acquisition != "mixed" and deg.noise is None else {}
    scores, per = check_scores({**candidates, **variants, **projected}, deg, v, cfg)
    best = min(scores[f"ensemble {k}"] for k in ENSEMBLES)
    size = ensemble or min(k for k in ENSEMBLES if scores[f"ensemble {k}"] <= best * (1.0 + ENSEMBLE_TOLERANCE))
    safe = safe_baseline(scores, list(candidates), default_baseline(deg, denoised))
    net = f"ensemble {size}"
    offers = {net: variants[net], **_projected_offer(projected, scores, safe)}
    bp = next((n for n in offers if n != net), None)
    order = _preference(offers, scores, net, bp, safe)
    # it must beat every baseline (not only the safe one) under every acquisition the check tried (all
    # three when the input's is unknown), and pass the harm check on the input itself; the other offer
    # is tried where the preferred one fails it
    winners = [n for n in order if beats_every_baseline(n, per, list(candidates))]
    pick, contrast, refused = _harmless(winners, offers, candidates[safe], full_scale, cfg.patch)
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
    if operator != "auto":
        pick = {"network": net, "projected": bp, "baseline": None}[operator]
    trained = pick is not None and pick.startswith("ensemble")
    chosen = offers[pick] if pick is not None else candidates[safe]
    chosen.info = dict(chosen.info)
    chosen.info["baseline"] = {
        "used": not trained,
        "verdict": _verdict(pick, operator, size, scores, net, safe, refused),
        "safe": safe,  # the baseline kept where no offer wins (the default cubic unless the other is clearly better)
        "ensemble": size if trained else 1,
        "back_projection": chosen.stages[-1].bp_iters if pick is not None and not trained else 0,
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


def _projected_offer(projected: dict[str, Model], scores: dict[str, float], safe: str) -> dict[str, Model]:
    """The safe baseline's back-projected variant with the fewest iterations within
    ``ENSEMBLE_TOLERANCE`` of the best, or nothing where none was offered."""
    mine = {n: m for n, m in projected.items() if n.startswith(f"{safe} + ")}
    if not mine:
        return {}
    low = min(scores[n] for n in mine)
    name = next(n for n in mine if scores[n] <= low * (1.0 + ENSEMBLE_TOLERANCE))
    return {name: mine[name]}


def _preference(offers: dict[str, Model], scores: dict[str, float], net: str, bp: str | None, safe: str) -> list[str]:
    """The offers, preferred first: the projected baseline replaces the network where it is clearly
    better (``PROJECTED_MARGIN``), or where the network loses to the safe baseline."""
    pick = net
    if bp and (scores[bp] < scores[net] * (1.0 - PROJECTED_MARGIN) or scores[net] >= scores[safe] * (1.0 - WIN_MARGIN)):
        pick = bp
    return [pick, *(n for n in offers if n != pick)]


def _harmless(
    winners: list[str], offers: dict[str, Model], base: Model, full_scale: np.ndarray | None, patch: int
) -> tuple[str | None, dict | None, list[str]]:
    """The first winner that passes the plane-brightness harm check on the input itself (every winner
    passes without ``full_scale``): (its name or None, the last contrast measured, the refusals)."""
    contrast, refused = None, []
    for n in winners:
        if full_scale is None:
            return n, contrast, refused
        contrast = plane_contrasts(offers[n], base, full_scale, patch)
        if not contrast["harm"]:
            return n, contrast, refused
        refused.append(f"{n} (plane contrast {contrast['operator']} against the baseline's {contrast['baseline']})")
    return None, contrast, refused


def _verdict(
    pick: str | None, operator: str, size: int, scores: dict[str, float], net: str, safe: str, refused: list[str]
) -> str:
    """What the result is and why, in one line, from the check's figures."""
    trained = pick is not None and pick.startswith("ensemble")
    if operator != "auto":
        name = pick or safe
        return (
            f"{'trained operator, ensemble ' + str(size) if trained else name} (--operator {operator}; "
            f"held-aside check MSE {scores[name] / scores[safe]:.3g}x the {safe}'s, the trained "
            f"operator's {scores[net] / scores[safe]:.3g}x)"
        )
    if trained:
        return f"trained operator, ensemble {size}"
    if pick is not None:  # preferred over the network, or the network lost or was refused
        return (
            f"{pick} (held-aside check MSE {scores[pick] / scores[safe]:.3g}x the {safe}'s, the trained "
            f"operator's {scores[net] / scores[safe]:.3g}x"
            + (f"; refused: {'; '.join(refused)}" if refused else "")
            + ")"
        )
    if refused:  # harm the check one scale down cannot see
        return f"{safe} upsampling: the plane brightness swings at the factor's period on the input: " + "; ".join(
            refused
        )
    return f"{safe} upsampling: the trained operator did not beat it on held-aside crops"


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
    models: dict[str, Model], deg: Degradation, v: np.ndarray, cfg: TrainConfig
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Each model's MSE on the held-aside check (``check_volumes``): the mean over the check volumes,
    and per check volume. A model's denoiser (a first stage of kind "denoiser") is fitted afresh to
    each check source (see ``do_no_harm``)."""
    vols = check_volumes(v, deg, cfg.seed)
    denoised = {k: leading_denoisers(m.stages) > 0 for k, m in models.items()}
    scores = {k: 0.0 for k in models}
    per: list[dict[str, float]] = []
    for src, tgt in vols:
        sl = held_aside_slab(tuple(src.shape), deg.factors, 2 * cfg.patch)
        s_src = src[sl].contiguous()
        s_tgt = tgt[tuple(slice(a.start * f, a.stop * f) for a, f in zip(sl, deg.factors))].contiguous()
        swap = _check_denoiser(src, cfg.seed) if any(denoised.values()) else None
        one = {}
        for name, m in models.items():
            one[name] = check_mse(_swap_denoiser(m, swap) if swap is not None and denoised[name] else m, s_src, s_tgt)
            scores[name] += one[name] / len(vols)
        per.append(one)
    return scores, per


def summary(model: Model) -> tuple[str, str]:
    """(what the model computes and why, the flag that reverses it), from ``model.info`` and its stages' kinds."""
    b = model.info.get("baseline") or {}
    verdict = b.get("verdict", "")
    if leading_denoisers(model.stages):
        return (
            f"result: {verdict}",
            "--operator network (or --denoise off) trains the SR network on the noisy input instead",
        )
    if b.get("operator", "auto") != "auto":
        return f"result: {verdict}", "--operator auto lets the held-aside check choose" + _bp_flag(model, b)
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
        "--operator baseline gives the plain cubic; --acquisition and --psf-fwhm change what the network learns"
        + _bp_flag(model, b),
    )


def _bp_flag(model: Model, b: dict) -> str:
    """Where the result is the trained network: the flag that sets its back-projection iterations
    (issue 28.1: the one automatic choice that had none), with what was used and who chose it."""
    bp = model.info.get("back_projection")
    if not bp or b.get("used"):
        return ""
    used = "/".join(map(str, bp["stages"])) + ("" if bp.get("closing") is None else f", closing {bp['closing']}")
    if bp["chosen"] == "auto":
        return f"; --back-projection N sets the network's back-projection iterations (the check chose {used})"
    return f"; --back-projection auto lets the check choose the back-projection iterations (now {used})"


def summarise(model: Model) -> None:
    """The one closing line ``train`` and ``run`` print (and log as a ``summary`` decision record)."""
    text, reverse = summary(model)
    decision(f"{text} ({reverse})", "summary", result=text[len("result: ") :], reverse=reverse)


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
