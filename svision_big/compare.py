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
from typing import Any

import numpy as np
from scipy import ndimage

from .metrics import psnr, ssim
from .ngff import Image, NgffError, open_image

__all__ = ["compare", "line_profile_points", "format_table"]

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
    return image.read(0, key).astype(np.float32)


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
    is_peak = (ndimage.maximum_filter(ref, size=3, mode="nearest") == ref) & (ref > thresh)
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


SATURATED_FRACTION = 1e-3  # voxels tied at the maximum, as a fraction, that mark a detector's ceiling


def saturated(vol: np.ndarray) -> float | None:
    """The maximum, where at least ``SATURATED_FRACTION`` of the voxels sit at it (a ceiling), else None."""
    top = float(vol.max())
    return top if np.count_nonzero(vol == top) >= SATURATED_FRACTION * vol.size else None


def display_window(vol: np.ndarray) -> tuple[float, float]:
    """(low, high) of the display: the 0.5th and 99.5th percentiles, taken without the voxels at a
    saturated ceiling. A saturated soma set the old window (0.1-99.9th percentiles) at its own
    value, and the dim dendrites beside it were black."""
    top = saturated(vol)
    v = vol[vol < top] if top is not None else vol
    if v.size == 0:
        v = vol
    lo, hi = (float(q) for q in np.percentile(v, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def busiest_planes(y: np.ndarray, cubic: np.ndarray) -> tuple[int, int]:
    """(z, y) of the lateral and axial planes where the result differs most from cubic upsampling
    (sum of squared differences): where there is something to see. Slices through the middle of
    the profile crossed a saturated soma twice, where both are the same."""
    d = (np.asarray(y, np.float64) - np.asarray(cubic, np.float64)) ** 2
    if d.ndim == 2:
        return 0, int(np.argmax(d.sum(axis=1)))
    return int(np.argmax(d.sum(axis=(1, 2)))), int(np.argmax(d.sum(axis=(0, 2))))


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


def compare(
    result: str | os.PathLike,
    input: str | os.PathLike,
    truth: str | os.PathLike | np.ndarray | None = None,
    out_png: str | os.PathLike | None = "compare.png",
    out_json: str | os.PathLike | None = None,
    channel: int = 0,
    time_index: int = 0,
    acquisition: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    storage_options: dict | None = None,
    quiet: bool = False,
    gamma: float = 1.0,
) -> dict:
    """Compare an enhanced ``result`` (OME-Zarr) with its ``input`` (OME-Zarr) and, when given, a
    ``truth`` (OME-Zarr or array on the result's grid). Writes ``out_png`` (None: no figure) and
    ``out_json`` (default: beside the PNG, ``.json``; None without a PNG: none), prints a table
    unless ``quiet``, and returns the report dict.

    ``acquisition``: how to degrade the result back for self-consistency (default: what the
    result's model recorded, else "cubic"). ``gamma``: the display's gamma (below 1 lifts dim
    structure beside bright objects); the window leaves out voxels at a saturated ceiling."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma {gamma!r}: use a positive number (1: linear; 0.5 lifts dim structure)")
    res_img = open_image(result, storage_options)
    in_img = open_image(input, storage_options)
    _check_outer(in_img, channel, time_index, str(input))
    rs, ins = res_img.spatial_axes, in_img.spatial_axes
    if len(rs) != len(ins) or len(rs) not in (2, 3):
        raise NgffError(f"{result} and {input} need the same 2 or 3 spatial axes")
    r_shape = [res_img.shape[a] for a in rs]
    i_shape = [in_img.shape[a] for a in ins]
    if any(r % i for r, i in zip(r_shape, i_shape)):
        raise NgffError(f"the result's shape {tuple(r_shape)} is not a whole multiple of the input's {tuple(i_shape)}")
    factors = [r // i for r, i in zip(r_shape, i_shape)]
    box = _region(i_shape, factors, max_voxels)
    whole = all(b == (0, n) for b, n in zip(box, i_shape))
    ctx = [(max(0, a - MARGIN), min(n, b + MARGIN)) for (a, b), n in zip(box, i_shape)]
    inner = tuple(slice((a - c) * f, (b - c) * f) for (a, b), (c, _), f in zip(box, ctx, factors))
    sel_in = _select(in_img, _channel(in_img, channel), time_index)
    sel_res = _select(res_img, _channel(res_img, channel), time_index)
    x_ctx = _read(in_img, sel_in, ctx)
    x = x_ctx[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, ctx))]
    cubic = _up(x_ctx, factors)[inner]
    rbox = [(a * f, b * f) for (a, b), f in zip(box, factors)]
    y = _read(res_img, sel_res, rbox)

    ref = None
    if truth is not None:
        if isinstance(truth, np.ndarray):
            full = np.asarray(truth, dtype=np.float32)
            if list(full.shape) != r_shape:
                raise NgffError(f"the truth's shape {full.shape} is not the result's {tuple(r_shape)}")
            ref = full[tuple(slice(a, b) for a, b in rbox)]
        else:
            t_img = open_image(truth, storage_options)
            t_shape = [t_img.shape[a] for a in t_img.spatial_axes]
            if t_shape != r_shape:
                raise NgffError(f"the truth's shape {tuple(t_shape)} is not the result's {tuple(r_shape)}")
            ref = _read(t_img, _select(t_img, _channel(t_img, channel), time_index), rbox)

    report: dict[str, Any] = {
        "result": {},
        "cubic": {},
        "factors": factors,
        "region": {"input": [list(b) for b in box], "result": [list(b) for b in rbox], "whole": whole},
        "channel": channel,
        "time_index": time_index,
        "inputs": {
            "result": os.fspath(result),
            "input": os.fspath(input),
            "truth": None if truth is None or isinstance(truth, np.ndarray) else os.fspath(truth),
        },
    }
    if ref is not None:
        report["mode"] = "truth"
        dr = float(ref.max() - ref.min()) or 1.0
        report["data_range"] = dr
        for key, v in (("result", y), ("cubic", cubic)):
            report[key] = {"psnr": _finite(psnr(ref, v, dr)), "ssim": _finite(ssim(ref, v, dr))}
    else:
        report["mode"] = "self-consistency"
        acq, psf = _acquisition(res_img)
        if acquisition is not None:
            acq, psf = acquisition, None
        report["acquisition"] = acq
        report["psf_fwhm"] = None if psf is None else list(psf)
        dr = float(x.max() - x.min()) or 1.0
        report["data_range"] = dr
        for key, v in (("result", y), ("cubic", cubic)):
            back = _down(v, factors, acq, psf)
            report[key] = {"psnr": _finite(psnr(x, back, dr)), "ssim": _finite(ssim(x, back, dr))}

    # line profile across two close objects of the reference (truth, else result)
    show = ref if ref is not None else y
    pair = line_profile_points(show)
    scale = [res_img.scales[0][a] for a in rs]
    if pair is None:  # no two close objects: a line through the brightest voxel (below a ceiling), along x
        top = saturated(show)
        c = np.array(
            np.unravel_index(int(np.argmax(show if top is None else np.where(show < top, show, -np.inf))), show.shape),
            dtype=float,
        )
        half = min(16.0, (show.shape[-1] - 1) / 2)
        p1, p2 = c.copy(), c.copy()
        p1[-1], p2[-1] = max(0.0, c[-1] - half / 2), min(show.shape[-1] - 1.0, c[-1] + half / 2)
    else:
        p1, p2 = pair
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
    dist = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0) * np.array(scale), axis=1))])
    # the input on the result's grid: result index o is input index (o + 0.5)/f - 0.5
    in_pts = (pts + 0.5) / np.array(factors, dtype=float) - 0.5
    curves = {
        "input": _profile(x, np.clip(in_pts, 0, np.array(x.shape) - 1)),
        "cubic": _profile(cubic, pts),
        "result": _profile(y, pts),
    }
    if ref is not None:
        curves["truth"] = _profile(ref, pts)
    report["profile"] = {
        "from": [round(float(v), 3) for v in a],
        "to": [round(float(v), 3) for v in b],
        "objects": [[round(float(v), 3) for v in p1], [round(float(v), 3) for v in p2]],
        "found_pair": pair is not None,
        "dip": {k: _dip(v, i1, i2) for k, v in curves.items()},
    }

    shown = ref if ref is not None else y
    zc, yc = busiest_planes(y, cubic)
    report["figure"] = {
        "window": list(display_window(shown)),
        "gamma": float(gamma),
        "saturated": saturated(shown),
        "lateral_z": zc,
        "axial_y": yc,
        "planes": "where the result differs most from cubic upsampling",
    }
    if out_png is not None:
        _figure(
            os.fspath(out_png),
            x,
            cubic,
            y,
            ref,
            factors,
            scale,
            pts,
            dist,
            curves,
            (i1, i2),
            report,
            res_img.axes[rs[-1]].get("unit"),
        )
        report["png"] = os.fspath(out_png)
        if out_json is None:
            out_json = os.path.splitext(os.fspath(out_png))[0] + ".json"
    if out_json is not None:
        report["json"] = os.fspath(out_json)
        with open(out_json, "w") as fh:
            json.dump(report, fh, indent=1, allow_nan=False)
    if not quiet:
        print(format_table(report), flush=True)
    return report


def _figure(path, x, cubic, y, ref, factors, scale, pts, dist, curves, marks, report, unit) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig_info = report["figure"]
    panels = [("input", x, True), ("cubic", cubic, False), ("result", y, False)]
    if ref is not None:
        panels.append(("truth", ref, False))
    lo, hi = fig_info["window"]
    gamma = fig_info["gamma"]
    three = y.ndim == 3
    rows = 4 if three else 2  # lateral slice, axial slice, maximum projection; the profile
    ncol = len(panels)
    fig = plt.figure(figsize=(3.2 * ncol, 3.0 * rows), dpi=100)
    gs = fig.add_gridspec(rows, ncol)
    zc, yc = fig_info["lateral_z"], fig_info["axial_y"]
    in_scale = [s * f for s, f in zip(scale, factors)]

    def extent(n0, n1, s0, s1):  # physical: voxel centres at index*scale, edges half a voxel out
        return (-0.5 * s1, (n1 - 0.5) * s1, (n0 - 0.5) * s0, -0.5 * s0)

    def show(ax, plane, s0, s1, title):
        shown = np.clip((np.asarray(plane, np.float64) - lo) / (hi - lo), 0.0, 1.0) ** gamma
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=extent(*plane.shape, s0, s1), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)

    for j, (name, vol, coarse) in enumerate(panels):
        sc = in_scale if coarse else scale
        f = factors if coarse else [1] * len(factors)
        ax = fig.add_subplot(gs[0, j])
        plane = vol[min(vol.shape[0] - 1, zc // f[0])] if three else vol
        show(ax, plane, sc[-2], sc[-1], f"{name} (lateral{f', z={zc}' if three else ''})")
        if name == "result":
            ax.plot(pts[:, -1] * scale[-1], pts[:, -2] * scale[-2], "-", color="orange", lw=1)
        if three:
            plane = vol[:, min(vol.shape[1] - 1, yc // f[1]), :]
            show(fig.add_subplot(gs[1, j]), plane, sc[0], sc[-1], f"{name} (axial, y={yc})")
            show(fig.add_subplot(gs[2, j]), vol.max(axis=0), sc[-2], sc[-1], f"{name} (max projection along z)")
    ax = fig.add_subplot(gs[rows - 1, :])
    styles = {"input": ("0.6", "--"), "cubic": ("tab:blue", "-"), "result": ("tab:red", "-"), "truth": ("k", ":")}
    for k, v in curves.items():
        c, ls = styles[k]
        dip = report["profile"]["dip"].get(k)
        ax.plot(dist, v, ls, color=c, lw=1.5, label=k + ("" if dip is None else f" (dip {dip:.2f})"))
    for m in marks:
        ax.axvline(dist[m], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel(f"distance along the line ({unit or 'physical units'})", fontsize=8)
    ax.set_ylabel("intensity", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    ax.tick_params(labelsize=7)
    mode = report["mode"]

    def f(v):
        return "inf" if v is None else f"{v:.2f}"

    what = (
        "line profile across two close objects"
        if report["profile"]["found_pair"]
        else "no two close objects found: line profile through the brightest voxel below any ceiling, along x"
    )
    ax.set_title(
        f"{what}; {'PSNR vs truth' if mode == 'truth' else 'self-consistency PSNR'}:"
        f" cubic {f(report['cubic']['psnr'])} dB, result {f(report['result']['psnr'])} dB",
        fontsize=9,
    )
    window = f"display {lo:.4g}..{hi:.4g}" + (f", gamma {gamma:g}" if gamma != 1 else "")
    if fig_info["saturated"] is not None:
        window += f" (voxels at the ceiling {fig_info['saturated']:.4g} left out of the window)"
    fig.suptitle(
        f"svision-big x{'x'.join(map(str, factors)) if len(set(factors)) > 1 else factors[0]}; {window}; "
        "slices where the result differs most from cubic",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
