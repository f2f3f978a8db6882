"""Pipeline benchmark, profile: one interior block of the operator timed phase by phase (read,
normalise, network ensemble, back-projection, cast, compress + write, done-record; inside the
ensemble torch's own op timings grouped by kind), plus measured levers on one block's read region
(channels-last, grouped convolutions as dense, batched variants, bfloat16, strided views instead
of gathers). Not in the default ``benchmarks/pipeline.py`` run: it is how the levers were found.

    python benchmarks/pipeline_profile.py --quick
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gc
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import FACTORS, _set_threads, build_model, make_input, run_child, section_main


def _phase_kernels(f: int, up: bool):
    """The shipped cubic tap table's interior rows as per-phase kernels: (weights[phase, K], left, right)."""
    from svision_big.degrade import resize_table

    if up:
        n = 64
        idx, w = resize_table(n, n * f, float(f))
        k0 = n // 2
        rows, base = [f * k0 + p for p in range(f)], k0
    else:
        n = 64 * f
        idx, w = resize_table(n, n // f, 1.0 / f)
        rows, base = [32], f * 32
    lo = min(int((idx[r] - base).min()) for r in rows)
    hi = max(int((idx[r] - base).max()) for r in rows)
    ker = np.zeros((len(rows), hi - lo + 1))
    for p, r in enumerate(rows):
        for o, ww in zip(idx[r] - base, w[r]):
            ker[p, o - lo] += ww
    return ker, -lo, hi


def _resize_views(x, factors, up: bool):
    """Cubic resize as the shipped ``degrade.resize`` computes it, but with strided views of a
    symmetric-padded copy (``out += w * view``) instead of one ``index_select`` gather per tap.
    Benchmark-only sketch: assumes every axis is longer than the padding (the tables handle any size)."""
    import torch

    for axis, f in enumerate(factors):
        if f == 1:
            continue
        ker, left, right = _phase_kernels(f, up)
        n = x.shape[axis]
        xp = torch.cat([x.narrow(axis, 0, left).flip(axis), x, x.narrow(axis, n - right, right).flip(axis)], axis)
        if up:
            shape = list(x.shape)
            shape.insert(axis + 1, f)
            out = torch.empty(shape, dtype=x.dtype)
            for p in range(f):
                o = out.select(axis + 1, p)
                first = True
                for j in range(ker.shape[1]):
                    if ker[p, j] == 0.0:
                        continue
                    v = xp.narrow(axis, j, n)
                    if first:
                        torch.mul(v, float(ker[p, j]), out=o)
                        first = False
                    else:
                        o.add_(v, alpha=float(ker[p, j]))
            shape = list(x.shape)
            shape[axis] *= f
            x = out.reshape(shape)
        else:
            m = n // f
            out = None
            for j in range(ker.shape[1]):
                if ker[0, j] == 0.0:
                    continue
                sl = [slice(None)] * x.ndim
                sl[axis] = slice(j, j + f * m, f)
                v = xp[tuple(sl)]
                out = v * float(ker[0, j]) if out is None else out.add_(v, alpha=float(ker[0, j]))
            x = out
    return x


def _op_category(name: str) -> str:
    if "conv" in name:
        return "convolutions (oneDNN)"
    if "prelu" in name:
        return "PReLU"
    if name in ("aten::index_select", "aten::mul", "aten::add_", "aten::mul_"):
        return "tap-table gathers (cubic resize: index_select, mul, add_)"
    if name in (
        "aten::flip",
        "aten::rot90",
        "aten::copy_",
        "aten::clone",
        "aten::contiguous",
        "aten::permute",
        "aten::reshape",
        "aten::_to_copy",
        "aten::to",
    ):
        return "layout copies (flip, rot90, channels-last, pixel shuffle)"
    return "other elementwise (add, div, clamp, sub, ...)"


def child_profile(spec: dict) -> dict:
    """One interior block, as ``execute.run_block`` does it, timed phase by phase (one thread, alone).

    Calls the shipped functions (``predict``, ``back_project``, ``cast_output``) and, inside the
    ensemble, groups torch's own op timings (``torch.profiler``) by kind."""
    import tempfile

    import numcodecs
    import torch
    from torch.profiler import ProfilerActivity, profile

    from svision_big.ngff import format_for, open_image, open_output_group
    from svision_big.operator import back_project, predict
    from svision_big.plan import BlockPlan, default_block
    from svision_big.state import DoneRecords
    from svision_big.values import cast_output

    _set_threads(1)
    model = build_model(spec["bp"])
    opspec = model.spec()
    img = open_image(spec["input"])
    src = img.level(0)
    in_shape = tuple(src.shape)
    out_shape = tuple(n * f for n, f in zip(in_shape, FACTORS))
    block = default_block(out_shape, FACTORS, 128)
    halo = model.halo()
    plan = BlockPlan(in_shape, FACTORS, block, halo)
    grid = plan.grid
    idx = int(np.ravel_multi_index(tuple(g // 2 for g in grid), grid))  # the most interior block
    b = plan[idx]
    times = {}

    def timed(name, f, reps=1):
        best = float("inf")
        r = None
        for _ in range(reps):
            t = time.perf_counter()
            r = f()
            best = min(best, time.perf_counter() - t)
        times[name] = times.get(name, 0.0) + best
        return r

    x_np = timed("read + decode input (zarr, blosc)", lambda: np.asarray(src[b.read]), reps=3)
    st = opspec.stages[0]
    floor = opspec.norm.floor_n
    with torch.inference_mode():
        predict(st.net, torch.rand(8, 8, 8), st.ensemble)  # warm-up
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        x = timed(
            "to tensor + normalise",
            lambda: opspec.norm.forward(torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))),
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = timed("network ensemble (predict)", lambda: predict(st.net, x, st.ensemble).clamp_(min=floor))
        cats: dict[str, float] = {}
        for ev in prof.key_averages():
            if ev.key.startswith("aten::") or "conv" in ev.key:
                cats[_op_category(ev.key)] = cats.get(_op_category(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
        if st.bp_iters:
            y = timed(
                f"back-projection ({st.bp_iters} it)", lambda: back_project(y, x, st.degradation, st.bp_iters, floor)
            )
        out = timed("denormalise + cast to uint16", lambda: cast_output(opspec.norm.inverse(y).numpy(), np.uint16))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tmp = tempfile.mkdtemp(prefix="svb-prof-")
    try:
        fmt = format_for("0.5")
        g = open_output_group(os.path.join(tmp, "o.zarr"), fmt, mode="a")
        dst = fmt.create_array(g, "0", out_shape, block, "uint16", ["z", "y", "x"])
        crop = np.ascontiguousarray(out[b.crop])
        codec = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
        enc = timed("(of which: blosc zstd-5 bitshuffle encode)", lambda: codec.encode(crop), reps=3)
        nbytes = len(enc)

        def write():
            dst[b.write] = crop

        timed("crop + compress + write chunk", write, reps=3)
        rec = DoneRecords(os.path.join(tmp, "done"))
        rec.create()
        timed("done-record", lambda: rec.mark(idx), reps=3)
        zarr_ok = bool(np.array_equal(dst[b.write], crop))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(v for k, v in times.items() if not k.startswith("(of which"))
    return {
        "block": list(block),
        "halo": list(halo),
        "read_shape": list(x_np.shape),
        "write_voxels": b.write_voxels,
        "times": times,
        "ensemble_ops": cats,
        "total": total,
        "compressed_ratio": crop.nbytes / nbytes,
        "roundtrip_ok": zarr_ok,
        "operator_output_voxels": int(out.size),
        "operator_peak_rss_delta_bytes": peak - rss0,
        "bytes_per_read_voxel": (peak - rss0) / x_np.size,
    }


def child_levers(spec: dict) -> dict:
    """Measured alternatives for one network variant on one block's read region (same arithmetic)."""
    import copy

    import torch

    from svision_big.degrade import resize
    from svision_big.network import pixel_shuffle_nd

    _set_threads(1)
    model = build_model(0)
    net = model.spec().stages[0].net
    r = spec["read"]
    x = torch.rand(1, 1, *r)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    reps = spec.get("reps", 2)

    def bench(f):
        f()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return best

    def learned(n, z):
        return pixel_shuffle_nd(n.expand(n.body(z)), n.config.factors)

    out = {}
    with torch.inference_mode():
        ref = learned(net, x)
        out["learned part, channels-last input (as predict runs it)"] = bench(lambda: learned(net, xc))
        out["learned part, default (NCDHW) layout"] = bench(lambda: learned(net, x))
        x3 = x[0, 0]
        fac = net.config.factors
        out["residual cubic upsample (once per block)"] = bench(lambda: resize(x3, fac, up=True))
        out["residual cubic upsample, strided views instead of gathers"] = bench(
            lambda: _resize_views(x3, fac, up=True)
        )
        d_views = float((resize(x3, fac, up=True) - _resize_views(x3, fac, up=True)).abs().max())
        from svision_big.degrade import Degradation

        deg = Degradation(fac)
        yy = resize(x3, fac, up=True)
        d_views = max(d_views, float((deg.down(yy) - _resize_views(yy, fac, up=False)).abs().max()))
        out["one back-projection iteration (shipped tap-table gathers)"] = bench(
            lambda: (yy + deg.up(x3 - deg.down(yy))).clamp_(min=0.0)
        )
        out["one back-projection iteration, strided views"] = bench(
            lambda: (yy + _resize_views(x3 - _resize_views(yy, fac, up=False), fac, up=True)).clamp_(min=0.0)
        )
        # grouped mapping convs as dense convs with block-diagonal weights (2x the MACs, better kernels)
        net_d = copy.deepcopy(net)
        for i, layer in enumerate(net_d.body):
            if isinstance(layer, torch.nn.Conv3d) and layer.groups > 1:
                g = layer.groups
                ci, co = layer.in_channels, layer.out_channels
                dense = torch.nn.Conv3d(ci, co, layer.kernel_size, padding=layer.padding)
                w = torch.zeros_like(dense.weight)
                cig, cog = ci // g, co // g
                for gi in range(g):
                    w[gi * cog : (gi + 1) * cog, gi * cig : (gi + 1) * cig] = layer.weight[gi * cog : (gi + 1) * cog]
                dense.weight.copy_(w)
                dense.bias.copy_(layer.bias)
                net_d.body[i] = dense
        d_dense = float((learned(net_d, xc) - ref).abs().max())
        out["learned part, grouped convs as dense, channels-last"] = bench(lambda: learned(net_d, xc))
        xb = x.repeat(2, 1, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
        out["learned part, 2 variants batched (per variant)"] = bench(lambda: learned(net, xb)) / 2
        net_bf = copy.deepcopy(net).to(torch.bfloat16)
        try:
            xbf = xc.to(torch.bfloat16)
            d_bf = float((learned(net_bf, xbf).float() - ref).abs().max())
            out["learned part, bfloat16, channels-last"] = bench(lambda: learned(net_bf, xbf))
        except (RuntimeError, NotImplementedError) as exc:  # not every CPU/oneDNN build has bf16 convs
            d_bf = f"unavailable: {type(exc).__name__}"
    return {
        "read": list(r),
        "seconds": out,
        "max_abs_diff_dense": d_dense,
        "max_abs_diff_bf16": d_bf,
        "max_abs_diff_views": d_views,
        "output_range": float(ref.abs().max()),
    }


def section_profile(cfg: dict, workdir: Path, log) -> dict:
    res = {}
    shape = tuple(cfg["profile_in"])
    inp, _ = make_input(workdir, shape)
    for bp in cfg["profile_bps"]:
        log(f"profile of one block, bp={bp}")
        res[f"bp{bp}"] = run_child({"mode": "profile", "input": inp, "bp": bp})
    log("levers on one block's read region (bp=0)")
    halo0 = res["bp0"]["halo"]
    read = [64 + 2 * h for h in halo0]
    res["levers"] = run_child({"mode": "levers", "read": read, "reps": cfg["lever_reps"]})
    return res


def report_profile(res: dict) -> list[str]:
    L = []
    pr = res["profile"]
    L.append("### Profile of one interior block (1 thread, alone)")
    L.append("")
    keys = []
    for v in pr.values():
        if isinstance(v, dict) and "times" in v:
            keys += [k for k in v["times"] if k not in keys]
    cols = [k for k in pr if k.startswith("bp")]
    L.append("| phase | " + " | ".join(f"{c}: read {'x'.join(map(str, pr[c]['read_shape']))}" for c in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for k in keys:
        cells = []
        for c in cols:
            t = pr[c]["times"].get(k)
            cells.append("-" if t is None else f"{t:.3f} s ({100 * t / pr[c]['total']:.1f}%)")
        L.append(f"| {k} | " + " | ".join(cells) + " |")
    L.append(
        "| **total** | "
        + " | ".join(
            f"{pr[c]['total']:.2f} s = {pr[c]['write_voxels'] / pr[c]['total'] / 1e6:.3f} M written voxels/s "
            f"(compression {pr[c]['compressed_ratio']:.1f}x)"
            for c in cols
        )
        + " |"
    )
    L.append("")
    for c in cols:
        ops = pr[c].get("ensemble_ops") or {}
        tot = sum(ops.values()) or 1.0
        L.append(
            f"Inside the ensemble ({c}, torch profiler, self time): "
            + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
            + "."
        )
    L.append("")
    lv = pr["levers"]
    sec = lv["seconds"]
    base = "learned part, channels-last input (as predict runs it)"
    bf = lv["max_abs_diff_bf16"]
    pairs = [
        (
            "learned part of one ensemble variant: NCDHW layout instead of channels-last",
            base,
            "learned part, default (NCDHW) layout",
            "exact",
        ),
        (
            "... grouped 6->6 convs rewritten as dense block-diagonal convs (2x the MACs)",
            base,
            "learned part, grouped convs as dense, channels-last",
            f"{lv['max_abs_diff_dense']:.0e}",
        ),
        (
            "... 2 ensemble variants batched in one call",
            base,
            "learned part, 2 variants batched (per variant)",
            "exact",
        ),
        (
            "... bfloat16 weights and activations",
            base,
            "learned part, bfloat16, channels-last",
            bf if isinstance(bf, str) else f"{bf:.0e} (outputs up to {lv['output_range']:.2f})",
        ),
        (
            "residual cubic upsample: strided views of a padded copy instead of index_select gathers",
            "residual cubic upsample (once per block)",
            "residual cubic upsample, strided views instead of gathers",
            f"{lv.get('max_abs_diff_views', float('nan')):.0e}",
        ),
        (
            "one back-projection iteration: same, for the down- and up-resize",
            "one back-projection iteration (shipped tap-table gathers)",
            "one back-projection iteration, strided views",
            f"{lv.get('max_abs_diff_views', float('nan')):.0e}",
        ),
    ]
    L.append(f"Levers measured on one block's {'x'.join(map(str, lv['read']))} read region (1 thread; bp 0 model):")
    L.append("")
    L.append("| lever | shipped | alternative | speed-up | max abs difference |")
    L.append("|---|---|---|---|---|")
    for label, k0, k1, diff in pairs:
        if k0 in sec and k1 in sec:
            L.append(f"| {label} | {sec[k0]:.3f} s | {sec[k1]:.3f} s | {sec[k0] / sec[k1]:.2f}x | {diff} |")
    L.append("")
    return L


if __name__ == "__main__":
    sys.exit(
        section_main(
            "Pipeline benchmark: one block phase by phase, and levers measured on it.",
            "profile",
            section_profile,
            report_profile,
        )
    )
