"""The figure of ``compare``: the display window (without a saturated ceiling), the planes shown and
the zoomed inset (where the result differs most from cubic upsampling), one column of slices per view at their
physical size, and the line profile with its scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .compare import _Line, _Views

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
    d = np.subtract(
        y, cubic, dtype=np.float64
    )  # the same numbers as converting each first, one float64 volume not three
    np.square(d, out=d)
    if d.ndim == 2:
        return 0, int(np.argmax(d.sum(axis=1)))
    return int(np.argmax(d.sum(axis=(1, 2)))), int(np.argmax(d.sum(axis=(0, 2))))


INSET_SIZE = 32  # result voxels across the zoomed inset, laterally
INSET_WINDOW = (3, 9, 9)  # the window |result - cubic| is summed over to place the inset (z, y, x)


def inset_box(
    y: np.ndarray, cubic: np.ndarray, window: tuple[float, float] | None = None, size: int = INSET_SIZE
) -> dict:
    """The zoomed inset: ``size`` x ``size`` result voxels of one lateral plane, centred (as far as the
    volume allows) on the voxel where |result - cubic| summed over an ``INSET_WINDOW`` window is
    largest: where the result and the baseline differ most (issue 28.2). With a display ``window``
    (low, high) both are clipped to it first, so the inset is where they differ as shown (around a
    saturated soma both are white whatever their values)."""
    from scipy import ndimage

    y, cubic = np.asarray(y, np.float32), np.asarray(cubic, np.float32)
    if window is not None:
        y, cubic = np.clip(y, *window), np.clip(cubic, *window)
    d = np.abs(y - cubic)
    win = INSET_WINDOW[-d.ndim :]
    centre = [
        int(v) for v in np.unravel_index(int(np.argmax(ndimage.uniform_filter(d, win, mode="constant"))), d.shape)
    ]
    box = []
    for c, n in zip(centre[-2:], d.shape[-2:]):
        k = min(size, n)
        a = min(max(0, c - k // 2), n - k)
        box.append([a, a + k])
    return {
        "centre": centre,
        "z": centre[0] if d.ndim == 3 else 0,
        "box": box,  # [[y0, y1], [x0, x1]] in result voxels, ends excluded
        "window": list(win),
        "why": "where |result - cubic| (both clipped to the display window) summed over the window is largest",
    }


def figure_info(views: _Views, gamma: float) -> dict:
    """The figure's display window, gamma, ceiling, the planes it shows and its zoomed inset."""
    shown = views.ref if views.ref is not None else views.y
    zc, yc = busiest_planes(views.y, views.cubic)
    window = display_window(shown)
    return {
        "window": list(window),
        "gamma": float(gamma),
        "saturated": saturated(shown),
        "lateral_z": zc,
        "axial_y": yc,
        "planes": "where the result differs most from cubic upsampling",
        "inset": inset_box(views.y, views.cubic, window),
    }


def draw_figure(path: str, views: _Views, line: _Line, report: dict, unit: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # lateral slice, axial slice, maximum projection, zoomed inset; the profile
    rows = 5 if views.y.ndim == 3 else 3
    ncol = 4 if views.ref is not None else 3
    fig = plt.figure(figsize=(3.2 * ncol, 3.0 * rows), dpi=100)
    gs = fig.add_gridspec(rows, ncol)
    _slice_panels(fig, gs, views, line, report["figure"])
    _profile_panel(fig.add_subplot(gs[rows - 1, :]), line, report, unit)
    fig_info = report["figure"]
    lo, hi = fig_info["window"]
    gamma = fig_info["gamma"]
    factors = views.factors
    window = f"display {lo:.4g}..{hi:.4g}" + (f", gamma {gamma:g}" if gamma != 1 else "")
    if fig_info["saturated"] is not None:
        window += f" (voxels at the ceiling {fig_info['saturated']:.4g} left out of the window)"
    fig.suptitle(
        f"svision-big x{'x'.join(map(str, factors)) if len(set(factors)) > 1 else factors[0]}; {window};\n"
        "slices and the inset (outlined in orange) where the result differs most from cubic",  # one line was too wide
        fontsize=10,
    )
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine, for which savefig draws the whole figure once more before
    # the draw it saves (0.4-0.5 s of text layout here); the layout is done, so none is needed: the same pixels
    fig.set_layout_engine(None)
    fig.savefig(path)
    plt.close(fig)


def _slice_panels(fig, gs, views: _Views, line: _Line, fig_info: dict) -> None:
    """One column per view (input, cubic, result, truth): a lateral slice and, in 3D, an axial slice
    and the maximum projection along z, each at its physical size, then the zoomed inset (its region
    outlined on the projection, and on the lateral slice when it lies in that plane)."""
    panels = [("input", views.x, True), ("cubic", views.cubic, False), ("result", views.y, False)]
    if views.ref is not None:
        panels.append(("truth", views.ref, False))
    lo, hi = fig_info["window"]
    gamma = fig_info["gamma"]
    three = views.y.ndim == 3
    zc, yc = fig_info["lateral_z"], fig_info["axial_y"]
    inset = fig_info["inset"]
    scale, factors, pts = views.scale, views.factors, line.pts
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
        if not three or inset["z"] == zc:
            _outline(ax, inset["box"], scale)
        if three:
            plane = vol[:, min(vol.shape[1] - 1, yc // f[1]), :]
            show(fig.add_subplot(gs[1, j]), plane, sc[0], sc[-1], f"{name} (axial, y={yc})")
            ax = fig.add_subplot(gs[2, j])
            show(ax, vol.max(axis=0), sc[-2], sc[-1], f"{name} (max projection along z)")
            _outline(ax, inset["box"], scale)
        # the inset: the same window, the region of the result's grid (the input's voxels that cover it)
        (y0, y1), (x0, x1) = inset["box"]
        r0, r1, c0, c1 = y0 // f[-2], -(-y1 // f[-2]), x0 // f[-1], -(-x1 // f[-1])
        plane = vol[min(vol.shape[0] - 1, inset["z"] // f[0])] if three else vol
        ax = fig.add_subplot(gs[3 if three else 1, j])
        shown = np.clip((np.asarray(plane[r0:r1, c0:c1], np.float64) - lo) / (hi - lo), 0.0, 1.0) ** gamma
        # input voxel i covers result voxels i*f .. (i+1)*f - 1: its edges on the result's grid
        ext = tuple(
            (v * k - 0.5) * s
            for v, k, s in (
                (c0, f[-1], scale[-1]),
                (c1, f[-1], scale[-1]),
                (r1, f[-2], scale[-2]),
                (r0, f[-2], scale[-2]),
            )
        )
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=ext, interpolation="nearest")
        ax.set_xlim((x0 - 0.5) * scale[-1], (x1 - 0.5) * scale[-1])
        ax.set_ylim((y1 - 0.5) * scale[-2], (y0 - 0.5) * scale[-2])
        where = f", z={inset['z']}" if three else ""
        ax.set_title(f"{name} (inset{where}: differs most)", fontsize=9)
        ax.tick_params(labelsize=7)


def _outline(ax, box, scale) -> None:
    """The inset's region, outlined on a full slice (physical coordinates)."""
    from matplotlib.patches import Rectangle

    (y0, y1), (x0, x1) = box
    ax.add_patch(
        Rectangle(
            ((x0 - 0.5) * scale[-1], (y0 - 0.5) * scale[-2]),
            (x1 - x0) * scale[-1],
            (y1 - y0) * scale[-2],
            fill=False,
            edgecolor="orange",
            lw=1,
        )
    )


def _profile_panel(ax, line: _Line, report: dict, unit: str | None) -> None:
    """The line profile's curves, the two objects marked, and the scores in the title."""
    styles = {"input": ("0.6", "--"), "cubic": ("tab:blue", "-"), "result": ("tab:red", "-"), "truth": ("k", ":")}
    for k, v in line.curves.items():
        c, ls = styles[k]
        dip = report["profile"]["dip"].get(k)
        ax.plot(line.dist, v, ls, color=c, lw=1.5, label=k + ("" if dip is None else f" (dip {dip:.2f})"))
    for m in line.marks:
        ax.axvline(line.dist[m], color="0.85", lw=0.8, zorder=0)
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
        f"{what}; {'PSNR vs truth' if mode == 'truth' else 'self-consistency PSNR (not a quality score)'}:"
        f" cubic {f(report['cubic']['psnr'])} dB, result {f(report['result']['psnr'])} dB",
        fontsize=9,
    )
