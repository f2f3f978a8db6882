"""Look at an enhanced result beside its input: a figure, a table and JSON numbers.

``compare(result, input, truth=None)``:

- with ``truth`` (a high-resolution reference on the result's grid): PSNR and SSIM of the result
  and of cubic upsampling of the input, against the truth (``metrics.psnr`` / ``metrics.ssim``,
  data range = the truth's);
- without: self-consistency, the result degraded back to the input's grid (``degrade``, with the
  acquisition the model recorded, else antialiased cubic) against the input, and the same for
  cubic upsampling. It says whether the result is explained by the input; it cannot say whether
  the detail added is right.

The figure has lateral and axial slices of input, cubic, result (and truth) at their physical size,
and a line profile across two close objects, as in the Self-Vision paper's Fig. 2. Big volumes are
compared on a central region of at most ``max_voxels`` result voxels (reported in the JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .figure import SATURATED_FRACTION, busiest_planes, display_window, draw_figure, figure_info, saturated
from .metrics import psnr, ssim, ssim_many
from .ngff import Image, NgffError, open_image
from .options import keywords
from .progress import Progress

__all__ = [
    "compare",
    "CompareOptions",
    "line_profile_points",
    "format_table",
    # the figure's (svision_big.figure), named here as before
    "SATURATED_FRACTION",
    "busiest_planes",
    "display_window",
    "saturated",
]

DEFAULT_MAX_VOXELS = 1 << 24
MARGIN = 4  # input voxels read around the region, so the region's cubic upsampling sees its context


def _select(image: Image, channel: int, time_index: int) -> list:
    """Level-0 index for every non-spatial axis (channel, time, others at 0)."""
    sel: list[Any] = []
    for a in image.axes:
        kind, name = a.get("type"), str(a["name"]).lower()
        if kind == "space":
            sel.append(None)
        elif kind == "channel" or name == "c":
            sel.append(channel)
        elif kind == "time" or name == "t":
            sel.append(time_index)
        else:
            sel.append(0)
    return sel


def _channel(image: Image, channel: int) -> int:
    """``channel``, or 0 where the image holds one channel (an output of ``enhance --channel``)."""
    for i, a in enumerate(image.axes):
        if a.get("type") == "channel" or str(a["name"]).lower() == "c":
            if image.shape[i] == 1:
                return 0
            if not 0 <= channel < image.shape[i]:
                raise NgffError(f"channel {channel} is out of range: the image has {image.shape[i]}")
            return channel
    return 0


def _check_outer(image: Image, channel: int, time_index: int, where: str) -> None:
    """``--channel``/``--time`` that the input cannot have are refused (they were ignored on images
    without that axis)."""
    for flag, value, kinds in (("--channel", channel, ("channel", "c")), ("--time", time_index, ("time", "t"))):
        axis = next(
            (i for i, a in enumerate(image.axes) if a.get("type") in kinds or str(a["name"]).lower() in kinds), None
        )
        if axis is None and value != 0:
            raise NgffError(f"{flag} {value}: {where} has no {kinds[0]} axis")
        if axis is not None and not 0 <= value < image.shape[axis]:
            raise NgffError(f"{flag} {value} is out of range: {where} has {image.shape[axis]}")


def _read(image: Image, sel: list, box: Sequence[tuple[int, int]]) -> np.ndarray:
    it = iter(box)
    key = tuple(slice(*next(it)) if s is None else int(s) for s in sel)
    return np.asarray(image.read(0, key), dtype=np.float32)  # no copy where it is float32 already (the result)


def _region(in_shape, factors, max_voxels: int) -> list[tuple[int, int]]:
    """A central input box whose result is at most ``max_voxels`` voxels."""
    n = list(in_shape)
    while math.prod(v * f for v, f in zip(n, factors)) > max_voxels:
        i = int(np.argmax([v * f for v, f in zip(n, factors)]))
        n[i] = max(1, int(n[i] * 0.8))
    return [((s - k) // 2, (s - k) // 2 + k) for s, k in zip(in_shape, n)]


def _acquisition(result: Image) -> tuple[str, tuple | None]:
    """The acquisition and PSF the result's model recorded (provenance), else cubic and none."""
    prov = result.group.attrs.get("svision_big") or {}
    settings = (prov.get("settings") or [{}])[0] or {}
    acq = settings.get("acquisition") or "cubic"
    if acq not in ("cubic", "integrate", "sample"):
        acq = "cubic"  # "mixed" trains on all three: judge against the default one
    stages = settings.get("stages") or []
    psf = stages[0].get("psf_fwhm") if len(stages) == 1 else None
    return acq, (tuple(float(v) for v in psf) if psf else None)


def _up(x: np.ndarray, factors) -> np.ndarray:
    import torch

    from .degrade import resize

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))[None, None]
    return resize(t, tuple(factors), up=True, acquisition="cubic")[0, 0].numpy().astype(np.float32)


def _down(y: np.ndarray, factors, acquisition: str, psf) -> np.ndarray:
    import torch

    from .degrade import Degradation

    t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))[None, None]
    return Degradation(tuple(factors), psf, None, acquisition).down(t)[0, 0].numpy().astype(np.float32)


def _finite(v: float) -> float | None:
    """JSON has no infinity: identical images (PSNR inf) are written as null."""
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def line_profile_points(
    ref: np.ndarray,
    min_sep: float = 3.0,
    max_sep: float = 16.0,
    top: int = 200,
    border: int = 2,
    min_peak: float = 0.15,
):
    """Two close, separate bright objects in ``ref``: local maxima ``min_sep``..``max_sep`` voxels
    apart in the lateral plane (and in about the same plane), at least ``border`` voxels from the
    edges, whose dimmer peak is at least ``min_peak`` of the brightest and with a dip between them
    (below 80% of the dimmer peak). Of those pairs, the closest. Returns (p1, p2) or None."""
    ref = np.asarray(ref, dtype=np.float32)
    if ref.size == 0 or not np.isfinite(ref).any():
        return None
    med = float(np.median(ref))
    ceiling = saturated(ref)
    peak_max = float(ref.max()) if ceiling is None else float(ref[ref < ceiling].max(initial=med))
    thresh = med + 0.2 * (peak_max - med)
    # a saturated plateau is one object, not thousands of tied peaks: its voxels are not candidates
    is_peak = (_max3(ref) == ref) & (ref > thresh)
    if ceiling is not None:
        is_peak &= ref < ceiling
    peaks = np.argwhere(is_peak)
    shape = np.array(ref.shape)
    edge = np.where(shape > 2 * border + 2, border, 0)  # a thin volume still has planes to look at
    peaks = peaks[np.all((peaks >= edge) & (peaks < shape - edge), axis=1)]
    if len(peaks) < 2:
        return None
    vals = ref[tuple(peaks.T)]
    order = np.argsort(vals)[::-1][:top]
    peaks, vals = peaks[order].astype(float), vals[order]
    lat = peaks[:, -2:]
    d = np.sqrt(((lat[:, None, :] - lat[None, :, :]) ** 2).sum(-1))
    ok = (d >= min_sep) & (d <= max_sep)
    if ref.ndim == 3:
        ok &= np.abs(peaks[:, None, 0] - peaks[None, :, 0]) <= 1
    ok &= np.minimum(vals[:, None], vals[None, :]) >= min_peak * vals.max()
    # closest first (a stable sort keeps the scan order among equal distances): the first pair with a
    # dip is the answer, so a saturated object's thousands of tied peaks cost a sort, not a profile each
    # (a 50x256x256 neuron: 9,746 profiles, each copying the volume to float64, 20 of compare's 22 s)
    ii, jj = np.nonzero(np.triu(ok, 1))
    for k in np.argsort(d[ii, jj], kind="stable"):
        i, j = ii[k], jj[k]
        n = int(d[i, j] * 4) + 2
        seg = peaks[i][None, :] + np.linspace(0, 1, n)[:, None] * (peaks[j] - peaks[i])[None, :]
        if float(_profile(ref, seg).min()) < 0.8 * min(vals[i], vals[j]):
            return peaks[i], peaks[j]
    return None


def _max3(vol: np.ndarray) -> np.ndarray:
    """``ndimage.maximum_filter(vol, size=3, mode="nearest")``, the same array where ``vol`` has no NaN: each axis
    as two shifted ``np.maximum`` (an edge voxel is its own outside neighbour), 0.07 s where scipy took 0.29-0.36 s
    on a 100x408x408 float32 volume (issue 28). With NaN, scipy's (its comparisons order NaN differently)."""
    if np.isnan(vol).any():
        return ndimage.maximum_filter(vol, size=3, mode="nearest")
    src, out = vol, np.empty_like(vol)
    for axis in range(vol.ndim):
        lo = (slice(None),) * axis + (slice(None, -1),)
        hi = (slice(None),) * axis + (slice(1, None),)
        np.copyto(out, src)
        np.maximum(out[hi], src[lo], out=out[hi])
        np.maximum(out[lo], src[hi], out=out[lo])
        src, out = out, (np.empty_like(vol) if src is vol else src)
    return src


def _profile(vol: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Linear interpolation at ``pts``, computed in float64 without copying the volume."""
    return ndimage.map_coordinates(np.asarray(vol), pts.T, order=1, mode="nearest", output=np.float64)


def _dip(profile: np.ndarray, i1: int, i2: int) -> float | None:
    """Minimum between the two objects relative to their mean height (lower: better separated)."""
    lo, hi = sorted((i1, i2))
    if hi - lo < 2:
        return None
    base = float(min(profile.min(), 0.0))
    top = 0.5 * (profile[lo] + profile[hi]) - base
    return None if top <= 0 else round(float((profile[lo : hi + 1].min() - base) / top), 4)


def format_table(report: dict) -> str:
    """The numbers of a :func:`compare` report as a small text table."""
    mode = report["mode"]
    head = ("PSNR vs truth", "SSIM vs truth") if mode == "truth" else ("self PSNR", "self SSIM")
    rows = [f"{'':8s} {head[0]:>14s} {head[1]:>14s} {'profile dip':>12s}"]
    for key in ("cubic", "result"):
        r = report[key]

        def f(v, d=2):
            return "inf" if v is None else f"{v:.{d}f}"

        dip = report.get("profile", {}).get("dip", {}).get(key)
        rows.append(
            f"{key:8s} {f(r['psnr']):>14s} {f(r['ssim'], 4):>14s} {('-' if dip is None else f'{dip:.3f}'):>12s}"
        )
    if mode == "self-consistency":
        rows.append(f"(the result degraded back with '{report['acquisition']}' against the input; no truth given)")
        rows.append(SELF_CONSISTENCY_MEANING)
    return "\n".join(rows)


# What the self-consistency PSNR can and cannot say (issue 28.2: it read 82.20 dB for the result
# against cubic's 52.02 where the truth gave the result +0.96 dB, and 45.92 against cubic's 50.04 on
# a denoised result): any operator that back-projects onto the input scores near infinity, and one
# that removes noise scores low, whatever its quality.
SELF_CONSISTENCY_MEANING = (
    "self PSNR says how well the result, degraded back, reproduces the input (noise included): "
    "not its quality. Back-projection makes it very high, denoising makes it low; only a truth "
    "(--truth) scores the result"
)


@dataclass(frozen=True)
class CompareOptions:
    """``compare``'s settings, each declared once: ``compare(result, input, truth, **options)`` takes these names."""

    out_png: str | os.PathLike | None = field(
        default="compare.png", metadata={"help": "the figure to write (None: no figure)"}
    )
    out_json: str | os.PathLike | None = field(
        default=None,
        metadata={"help": "the numbers as JSON (default: beside the PNG, .json; None without a PNG: none)"},
    )
    channel: int = field(default=0, metadata={"help": "the channel to compare"})
    time_index: int = field(default=0, metadata={"help": "the time point to compare"})
    acquisition: str | None = field(
        default=None,
        metadata={
            "help": "how to degrade the result back for self-consistency (default: what the result's model "
            'recorded, else "cubic")'
        },
    )
    max_voxels: int = field(
        default=DEFAULT_MAX_VOXELS, metadata={"help": "result voxels of the central region compared, at most"}
    )
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options of the images"})
    quiet: bool = field(default=False, metadata={"help": "no progress lines and no table printed"})
    gamma: float = field(
        default=1.0,
        metadata={
            "help": "the display's gamma (below 1 lifts dim structure beside bright objects); the window leaves "
            "out voxels at a saturated ceiling"
        },
    )


def compare_options(options: dict) -> CompareOptions:
    """``options`` as ``CompareOptions``, or the TypeError Python gives for an unknown keyword."""
    return keywords("compare", CompareOptions, options)


@dataclass(frozen=True)
class _Views:
    """What is compared, as float32 arrays: the input region ``x``, its cubic upsampling, the result
    ``y`` and the truth ``ref`` (None without one), the last three on the result's grid."""

    x: np.ndarray
    cubic: np.ndarray
    y: np.ndarray
    ref: np.ndarray | None
    factors: list[int]
    scale: list[float]  # the result's voxel size per spatial axis
    box: list[tuple[int, int]]  # the region, in input voxels
    rbox: list[tuple[int, int]]  # ... and in result voxels
    whole: bool


@dataclass(frozen=True)
class _Line:
    """The line profile: its ends ``a``..``b``, the two objects ``p1``, ``p2`` it crosses (result
    voxels), its sample points, their distance along it (physical) and each curve."""

    a: np.ndarray
    b: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    found_pair: bool
    pts: np.ndarray
    dist: np.ndarray
    curves: dict
    marks: tuple[int, int]  # the samples nearest p1 and p2

    def summary(self) -> dict:
        return {
            "from": [round(float(v), 3) for v in self.a],
            "to": [round(float(v), 3) for v in self.b],
            "objects": [[round(float(v), 3) for v in self.p1], [round(float(v), 3) for v in self.p2]],
            "found_pair": self.found_pair,
            "dip": {k: _dip(v, *self.marks) for k, v in self.curves.items()},
        }


def compare(
    result: str | os.PathLike,
    input: str | os.PathLike,
    truth: str | os.PathLike | np.ndarray | None = None,
    **options: Any,
) -> dict:
    """Compare an enhanced ``result`` (OME-Zarr) with its ``input`` (OME-Zarr) and, when given, a
    ``truth`` (OME-Zarr or array on the result's grid). Writes ``out_png`` (None: no figure) and
    ``out_json`` (default: beside the PNG, ``.json``; None without a PNG: none), prints a table
    unless ``quiet``, and returns the report dict.

    The options are ``CompareOptions``' fields (each with its meaning there): ``out_png``
    ("compare.png"), ``out_json``, ``channel``, ``time_index``, ``acquisition``, ``max_voxels``,
    ``storage_options``, ``quiet``, ``gamma`` (1.0).
    ``acquisition``: how to degrade the result back for self-consistency (default: what the
    result's model recorded, else "cubic"). ``gamma``: the display's gamma (below 1 lifts dim
    structure beside bright objects); the window leaves out voxels at a saturated ceiling."""
    opts = compare_options(options)
    gamma = opts.gamma
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma {gamma!r}: use a positive number (1: linear; 0.5 lifts dim structure)")
    res_img, in_img, factors = _open_pair(result, input, opts)
    # the slow phases on a progress line (issue 28.2: minutes with no sign of life); --quiet silences it
    steps = _Steps(Progress(6 if opts.out_png is not None else 5, "compare", unit="step", quiet=opts.quiet))
    steps("read the region and upsample the input (cubic)")
    views = _read_views(res_img, in_img, factors, truth, opts)
    report = _report_head(views, result, input, truth, opts)
    with ThreadPoolExecutor(max_workers=1) as beside:
        if views.ref is not None:
            report.update(_truth_psnr(views, steps))
            # SSIM runs beside the profile and the figure, which need only PSNR: its threads release the GIL, and
            # the other core idled through those single-threaded steps (issue 28: 1-1.2 s less wall on 2 cores)
            steps("SSIM against the truth (result and cubic), beside the next steps")
            ssim_job = beside.submit(_truth_ssim, views)
        else:
            report.update(_self_scores(views, res_img, opts.acquisition, steps))
            ssim_job = None
        steps("the line profile: two close objects")
        line = _line(views)
        report["profile"] = line.summary()
        steps("display window, planes and inset")
        report["figure"] = figure_info(views, gamma)
        if opts.out_png is not None:
            steps("the figure")
            draw_figure(
                os.fspath(opts.out_png), views, line, report, res_img.axes[res_img.spatial_axes[-1]].get("unit")
            )
        if ssim_job is not None:
            for key, v in ssim_job.result().items():
                report[key]["ssim"] = v
    _write_outputs(report, opts)
    steps.close()
    if not opts.quiet:
        print(format_table(report), flush=True)
    return report


def _open_pair(result, input, opts: CompareOptions) -> tuple[Image, Image, list[int]]:
    """The result and input images, checked to share 2 or 3 spatial axes, and the factors between them."""
    res_img = open_image(result, opts.storage_options)
    in_img = open_image(input, opts.storage_options)
    _check_outer(in_img, opts.channel, opts.time_index, str(input))
    rs, ins = res_img.spatial_axes, in_img.spatial_axes
    if len(rs) != len(ins) or len(rs) not in (2, 3):
        raise NgffError(f"{result} and {input} need the same 2 or 3 spatial axes")
    r_shape = [res_img.shape[a] for a in rs]
    i_shape = [in_img.shape[a] for a in ins]
    if any(r % i for r, i in zip(r_shape, i_shape)):
        raise NgffError(f"the result's shape {tuple(r_shape)} is not a whole multiple of the input's {tuple(i_shape)}")
    return res_img, in_img, [r // i for r, i in zip(r_shape, i_shape)]


def _read_views(res_img: Image, in_img: Image, factors: list[int], truth, opts: CompareOptions) -> _Views:
    """Read the compared region (a central box of at most ``max_voxels`` result voxels) of the
    input, with ``MARGIN`` voxels of context for its cubic upsampling, of the result and of the truth."""
    i_shape = [in_img.shape[a] for a in in_img.spatial_axes]
    box = _region(i_shape, factors, opts.max_voxels)
    whole = all(b == (0, n) for b, n in zip(box, i_shape))
    ctx = [(max(0, a - MARGIN), min(n, b + MARGIN)) for (a, b), n in zip(box, i_shape)]
    inner = tuple(slice((a - c) * f, (b - c) * f) for (a, b), (c, _), f in zip(box, ctx, factors))
    sel_in = _select(in_img, _channel(in_img, opts.channel), opts.time_index)
    sel_res = _select(res_img, _channel(res_img, opts.channel), opts.time_index)
    x_ctx = _read(in_img, sel_in, ctx)
    x = x_ctx[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, ctx))]
    cubic = _up(x_ctx, factors)[inner]
    rbox = [(a * f, b * f) for (a, b), f in zip(box, factors)]
    y = _read(res_img, sel_res, rbox)
    r_shape = [res_img.shape[a] for a in res_img.spatial_axes]
    ref = _read_truth(truth, r_shape, rbox, opts)
    scale = [res_img.scales[0][a] for a in res_img.spatial_axes]
    return _Views(x, cubic, y, ref, factors, scale, box, rbox, whole)


def _read_truth(truth, r_shape: list[int], rbox, opts: CompareOptions) -> np.ndarray | None:
    """The truth's region ``rbox`` (None without a truth); its shape must be the result's."""
    if truth is None:
        return None
    if isinstance(truth, np.ndarray):
        full = np.asarray(truth, dtype=np.float32)
        if list(full.shape) != r_shape:
            raise NgffError(f"the truth's shape {full.shape} is not the result's {tuple(r_shape)}")
        return full[tuple(slice(a, b) for a, b in rbox)]
    t_img = open_image(truth, opts.storage_options)
    t_shape = [t_img.shape[a] for a in t_img.spatial_axes]
    if t_shape != r_shape:
        raise NgffError(f"the truth's shape {tuple(t_shape)} is not the result's {tuple(r_shape)}")
    return _read(t_img, _select(t_img, _channel(t_img, opts.channel), opts.time_index), rbox)


def _report_head(views: _Views, result, input, truth, opts: CompareOptions) -> dict[str, Any]:
    """The report's first entries: what was compared, and where (the scores fill in ``result`` and ``cubic``)."""
    return {
        "result": {},
        "cubic": {},
        "factors": views.factors,
        "region": {
            "input": [list(b) for b in views.box],
            "result": [list(b) for b in views.rbox],
            "whole": views.whole,
        },
        "channel": opts.channel,
        "time_index": opts.time_index,
        "inputs": {
            "result": os.fspath(result),
            "input": os.fspath(input),
            "truth": None if truth is None or isinstance(truth, np.ndarray) else os.fspath(truth),
        },
    }


class _Steps:
    """compare's phases on a ``Progress`` line: each call starts the next one (named in the line)."""

    def __init__(self, progress: Progress):
        self.progress, self.started = progress, 0

    def __call__(self, phase: str) -> None:
        self.progress.update(self.started, phase=phase)
        self.started += 1

    def close(self) -> None:
        self.progress.done = self.progress.total
        self.progress.values["phase"] = "done"
        self.progress.close()  # the closing line, once


def _truth_range(views: _Views) -> float:
    """The data range of PSNR and SSIM against the truth: the truth's (1 for a constant truth)."""
    return float(views.ref.max() - views.ref.min()) or 1.0


def _truth_psnr(views: _Views, steps) -> dict[str, Any]:
    """PSNR of the result and of cubic upsampling against the truth (their SSIM: ``_truth_ssim``)."""
    dr = _truth_range(views)
    steps("PSNR against the truth")
    out: dict[str, Any] = {"mode": "truth", "data_range": dr}
    for key, v in (("result", views.y), ("cubic", views.cubic)):
        out[key] = {"psnr": _finite(psnr(views.ref, v, dr))}
    return out


def _truth_ssim(views: _Views) -> dict[str, float | None]:
    """SSIM of the result and of cubic upsampling against the truth, the truth filtered once for both."""
    values = ssim_many(views.ref, [views.y, views.cubic], _truth_range(views))
    return {key: _finite(v) for key, v in zip(("result", "cubic"), values)}


def _self_scores(views: _Views, res_img: Image, acquisition: str | None, steps) -> dict[str, Any]:
    """Self-consistency: PSNR and SSIM of the result and of cubic upsampling, each degraded back onto the
    input's grid, against the input."""
    x = views.x
    out: dict[str, Any] = {"mode": "self-consistency"}
    acq, psf = _acquisition(res_img)
    if acquisition is not None:
        acq, psf = acquisition, None
    out["acquisition"] = acq
    out["psf_fwhm"] = None if psf is None else list(psf)
    dr = float(x.max() - x.min()) or 1.0
    out["data_range"] = dr
    for key, v in (("result", views.y), ("cubic", views.cubic)):
        steps(f"self-consistency: the {key} degraded back, PSNR and SSIM")
        back = _down(v, views.factors, acq, psf)
        out[key] = {"psnr": _finite(psnr(x, back, dr)), "ssim": _finite(ssim(x, back, dr))}
    return out


def _line_objects(show: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The two objects the line profile crosses: two close objects of ``show``, else (no such pair)
    half a line through the brightest voxel below any ceiling, along x, on either side."""
    pair = line_profile_points(show)
    if pair is not None:
        return pair[0], pair[1], True
    top = saturated(show)
    c = np.array(
        np.unravel_index(int(np.argmax(show if top is None else np.where(show < top, show, -np.inf))), show.shape),
        dtype=float,
    )
    half = min(16.0, (show.shape[-1] - 1) / 2)
    p1, p2 = c.copy(), c.copy()
    p1[-1], p2[-1] = max(0.0, c[-1] - half / 2), min(show.shape[-1] - 1.0, c[-1] + half / 2)
    return p1, p2, False


def _line(views: _Views) -> _Line:
    """The line profile across two close objects of the reference (the truth, else the result),
    extended past them, sampled on every view (the input at its own grid's positions)."""
    show = views.ref if views.ref is not None else views.y
    p1, p2, found = _line_objects(show)
    d = p2 - p1
    length = float(np.linalg.norm(d)) or 1.0
    ext = max(3.0, 0.5 * length)
    a = p1 - d / length * ext
    b = p2 + d / length * ext
    n = max(16, int(round(np.linalg.norm(b - a) * 4)) + 1)
    t = np.linspace(0.0, 1.0, n)
    pts = a[None, :] + t[:, None] * (b - a)[None, :]
    pts = np.clip(pts, 0, np.array(show.shape) - 1)
    i1 = int(np.argmin(np.linalg.norm(pts - p1, axis=1)))
    i2 = int(np.argmin(np.linalg.norm(pts - p2, axis=1)))
    dist = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0) * np.array(views.scale), axis=1))])
    # the input on the result's grid: result index o is input index (o + 0.5)/f - 0.5
    in_pts = (pts + 0.5) / np.array(views.factors, dtype=float) - 0.5
    curves = {
        "input": _profile(views.x, np.clip(in_pts, 0, np.array(views.x.shape) - 1)),
        "cubic": _profile(views.cubic, pts),
        "result": _profile(views.y, pts),
    }
    if views.ref is not None:
        curves["truth"] = _profile(views.ref, pts)
    return _Line(a, b, p1, p2, found, pts, dist, curves, (i1, i2))


def _write_outputs(report: dict, opts: CompareOptions) -> None:
    """The figure's path in the report (``out_png``, drawn already), then the JSON (``out_json``, by default
    beside the figure)."""
    out_json = opts.out_json
    if opts.out_png is not None:
        report["png"] = os.fspath(opts.out_png)
        if out_json is None:
            out_json = os.path.splitext(os.fspath(opts.out_png))[0] + ".json"
    if out_json is not None:
        report["json"] = os.fspath(out_json)
        with open(out_json, "w") as fh:
            json.dump(report, fh, indent=1, allow_nan=False)
