"""Pipeline performance benchmark: throughput, memory, planning and halo overhead of ``enhance``.

One command, no downloads, synthetic data. Everything that is compared is measured in the same
run, side by side, and reported as a ratio, because the machine is shared and noisy:

1. **Throughput** at factor 2 with the full operator (default architecture, 8-variant ensemble,
   back-projection): end-to-end ``svision_big.pipeline.enhance`` (local cluster of 2
   single-thread workers; read, infer, write, pyramid) next to
   - the in-memory operator on the same voxels (``enhance_array`` on whole slabs, no halo
     recomputation, no I/O, 2 processes at once),
   - the obvious hand-written alternative: ``dask.array.map_overlap`` (depth = the model's
     halo, ``boundary='none'``) with the same operator, written with ``to_zarr`` into an array of
     the same chunks and codec,
   - the physical limit: floating-point operations per output voxel (counted from the
     architecture and the tap tables) over the convolution rate this machine reaches (a large
     dense ``conv3d``, measured alone and in 2 processes at once),
   plus a profile of one block (read / network / back-projection / cast / compress+write /
   done-record) and a few measured levers.
2. **Memory**: peak resident memory of the whole process tree (client + scheduler + nannies +
   workers, psutil RSS sampled every 0.1 s) of ``enhance`` for volumes 1x, 8x, 64x in voxels.
3. **Planning**: time and client memory to plan 10^5 and 10^6 blocks (``BlockPlan``, iterating
   every block, and ``enhance`` itself up to its first block on a metadata-only input).
4. **Halo overhead**: ``BlockPlan.overhead()`` at the default block for bp 0/2/5/10, and against
   block size, with the operator's measured memory per read voxel.

    python benchmarks/pipeline.py                 # default (< 15 min on 2 cores)
    python benchmarks/pipeline.py --quick         # smoke run (< 2 min)

Prints a markdown report; writes JSON (machine description + every number) to ``--out``.
Random-weight models with the real operator structure are used (speed does not depend on the
weights); the noisy-data setting bp=0 is the main one, bp=10 (what training picks on clean
data) is measured on fewer blocks. Each torch process uses one thread (two 2-thread processes on
2 cores oversubscribe badly).
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as _dt
import gc
import json
import math
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np
import psutil

FACTORS = (2, 2, 2)
TARGETS = {
    "throughput_mvox_s": 2.6,
    "e2e_over_inmem": 0.8,
    "memory_gb": 2.0,
    "memory_flat": 0.15,
    "plan_1e6_s": 10.0,
    "plan_1e6_gb": 1.0,
    "halo_overhead": 0.25,
}
# Synthetic input: uint16, background ~100, structures up to ~2100, Gaussian noise; the models'
# normalisation is set to this range so outputs are realistic values (and compress realistically).
DATA_LO, DATA_HI = 100.0, 2100.0


# =========================================================================== helpers


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def machine() -> dict:
    import dask
    import distributed
    import numcodecs
    import torch
    import zarr

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "torch": torch.__version__, "dask": dask.__version__,
        "distributed": distributed.__version__, "zarr": zarr.__version__, "numpy": np.__version__,
        "numcodecs": numcodecs.__version__, "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "platform": platform.platform(), "date": _now(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def build_model(bp: int, light: bool = False, seed: int = 0):
    """Random-weight model with the real operator structure.

    ``light``: a stand-in operator (1x1 convolutions, 1 feature, no mapping layers, no ensemble,
    no residual: halo 0; identity weights, so it writes the input nearest-upsampled) used only to push large volumes through the pipeline quickly: it
    isolates the pipeline's own memory growth with volume size (read, write, scheduling, pyramid).
    """
    import torch
    from conftest import make_model

    from svision_big.degrade import Degradation
    from svision_big.model import Model, StageRecord
    from svision_big.network import NetConfig, SVNet
    from svision_big.operator import Normalisation

    if not light:
        return make_model(FACTORS, bp=bp, mapping=4, final_bp=0, seed=seed, lo=DATA_LO, hi=DATA_HI)
    torch.manual_seed(seed)
    cfg = NetConfig(FACTORS, features=1, shrink=1, mapping=0, groups=1, extract_kernel=1, kernel=1, residual=False)
    net = SVNet(cfg)
    with torch.no_grad():  # identity weights: output = input, nearest-upsampled (realistic data to compress)
        for prm_name, prm in net.named_parameters():
            prm.fill_(0.0 if prm_name.endswith("bias") else 1.0)
    st = StageRecord(cfg, net.state_dict(), Degradation(FACTORS), bp, ensemble=False)
    return Model(stages=[st], norm=Normalisation(DATA_LO, DATA_HI, 0.0), factors=FACTORS)


def synth_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Deterministic uint16 volume: a smooth, sparse-ish structure field plus noise, made slab by slab."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = shape
    c = 8
    coarse = ndimage.gaussian_filter(rng.random((z // c + 2, y // c + 2, x // c + 2)), 1.0)
    coarse = (coarse - coarse.min()) / max(1e-12, coarse.max() - coarse.min())
    coarse = coarse ** 4  # bright structures on a dim background
    out = np.empty(shape, np.uint16)
    slab = 32
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        cz0 = z0 // c
        cz1 = -(-z1 // c) + 1
        f = ndimage.zoom(coarse[cz0:cz1 + 1].astype(np.float32), c, order=1)
        off = z0 - cz0 * c
        f = f[off:off + (z1 - z0), :y, :x]
        noise = rng.standard_normal(f.shape, dtype=np.float32)
        v = DATA_LO + (DATA_HI - DATA_LO) * f
        v += noise * np.sqrt(np.maximum(v, 1.0)) * 1.5
        out[z0:z1] = np.clip(v, 0, 65535).astype(np.uint16)
    return out


def make_input(workdir: Path, shape: tuple[int, int, int]) -> tuple[str, float]:
    """An OME-Zarr (NGFF 0.5) input of ``shape``; cached in ``workdir`` between runs (deterministic)."""
    from svision_big.convert import write_ome_zarr

    path = workdir / f"input_{shape[0]}x{shape[1]}x{shape[2]}.ome.zarr"
    marker = path / ".complete-v1"
    if marker.exists():
        return str(path), 0.0
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    vol = synth_volume(shape)
    write_ome_zarr(vol, path, axes="zyx")
    del vol
    marker.write_text("ok")
    gc.collect()
    return str(path), time.perf_counter() - t0


class TreeSampler(threading.Thread):
    """Peak RSS of process trees (the roots and all their descendants), sampled every ``interval`` s."""

    def __init__(self, pids: list[int], interval: float = 0.1):
        super().__init__(daemon=True)
        self.roots = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak_total = 0
        self.peak_proc: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        total = 0
        for r in self.roots:
            try:
                procs = [r] + r.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak_proc.get(p.pid, 0):
                    self.peak_proc[p.pid] = rss
                    if p.pid not in self.names:
                        try:
                            self.names[p.pid] = " ".join(p.cmdline()[:3])[-60:]
                        except psutil.Error:
                            self.names[p.pid] = "?"
        self.peak_total = max(self.peak_total, total)
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        procs = sorted(self.peak_proc.items(), key=lambda kv: -kv[1])
        return {"peak_total_bytes": self.peak_total, "samples": self.samples, "processes": len(procs),
                "peak_per_process_bytes": [int(v) for _, v in procs],
                "largest_process": self.names.get(procs[0][0], "?") if procs else None}


def run_children(specs: list[dict], timeout: float = 3600) -> list[dict]:
    """Run child modes of this script at once (each its own process tree); sample memory of all."""
    procs = []
    for spec in specs:
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO)))
    load0 = os.getloadavg()[0]
    sampler = TreeSampler([p.pid for p in procs])
    sampler.start()
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append((p.returncode, out, err))
    mem = sampler.stop()
    mem["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # at start, at end (other tenants)
    results = []
    for (rc, out, err), spec in zip(outs, specs):
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if rc != 0 or not line:
            raise RuntimeError(f"child {spec['mode']} failed (rc {rc}):\n{out[-3000:]}\n{err[-5000:]}")
        res = json.loads(line[-1][len("RESULT "):])
        results.append(res)
    if len(results) == 1:
        results[0]["memory"] = mem
    else:
        for r in results:
            r["memory_all_children"] = mem
    return results


def run_child(spec: dict) -> dict:
    return run_children([spec])[0]


def _gb(b: float) -> float:
    return b / 2**30


def _mv(v: float) -> str:
    return f"{v / 1e6:.3f}"


# =========================================================================== FLOP count


def flops_per_output_voxel(model) -> dict:
    """Floating-point operations per output voxel of the whole operator (multiply-add = 2).

    Network: every convolution (weights per output = in/groups * k^d) at low resolution, per
    ensemble variant; plus the residual cubic upsampling per variant, the PReLUs, and the
    ensemble average. Back-projection: per iteration, the separable down- and up-resize (taps
    from the operator's own tables, interior rows) and the elementwise update and clamp.
    """
    from svision_big.degrade import gaussian_table, resize_table
    from svision_big.operator import _variants

    total = 0.0
    parts = {}
    f_all = math.prod(FACTORS)
    for si, st in enumerate(model.stages):
        cfg = st.config
        fs = cfg.factors
        fprod = math.prod(fs)
        k, ke, d = cfg.kernel, cfg.extract_kernel, cfg.ndim
        convs = [(1, cfg.features, ke, 1), (cfg.features, cfg.shrink, k, 1)]
        convs += [(cfg.shrink, cfg.shrink, k, cfg.groups)] * cfg.mapping
        convs += [(cfg.shrink, fprod, k, 1)]
        per_in = sum(2 * (ci // g) * co * kk ** d for ci, co, kk, g in convs)  # per low-res voxel
        prelu = 2 * (cfg.features + cfg.shrink * (1 + cfg.mapping))
        bias = sum(co for _, co, _, _ in convs)
        net_per_out = (per_in + prelu + bias) / fprod

        def resize_flops(factors, up):
            # separable passes in axis order; cost per *high-res* voxel
            cur = [1.0 / f if up else 1.0 for f in factors]
            fl = 0.0
            for a, f in enumerate(factors):
                if f == 1:
                    continue
                n = 64 * f
                tab = resize_table(n // f, n, float(f)) if up else resize_table(n, n // f, 1.0 / f)
                taps = tab[0].shape[1]
                cur[a] = 1.0 if up else 1.0 / f
                fl += 2 * taps * math.prod(cur)
            return fl

        residual = resize_flops(fs, up=True) if cfg.residual else 0.0
        nv = len(_variants(fs[-2] == fs[-1])) if st.ensemble else 1
        # the residual cubic upsampling commutes with the flips/rotations: counted once, not per variant
        ens = nv * (net_per_out + 1) + 1 + residual
        deg = st.degradation
        blur = 0.0
        if deg.psf_fwhm is not None:
            for fw in deg.psf_fwhm:
                if fw:
                    blur += 2 * gaussian_table(256, float(fw))[0].shape[1]
        bp_iter = resize_flops(fs, up=False) + blur + 1.0 / fprod + resize_flops(fs, up=True) + 2 + 1
        bp = st.bp_iters * bp_iter
        # stage output voxels relative to the final output
        scale = fprod / f_all
        parts[f"stage{si}"] = {"conv_flops_per_lowres_voxel": per_in, "network_per_output_voxel": round(net_per_out, 1),
                               "variants": nv, "residual_cubic_per_output_voxel": round(residual, 1),
                               "ensemble_per_output_voxel": round(ens, 1), "bp_iters": st.bp_iters,
                               "bp_per_iteration_per_output_voxel": round(bp_iter, 1)}
        total += (ens + bp + 2) * scale  # + normalise/clamp
    parts["total_per_output_voxel"] = round(total, 1)
    return parts


# =========================================================================== child modes


def _set_threads(n: int = 1) -> None:
    import torch

    torch.set_num_threads(n)


def child_convrate(spec: dict) -> dict:
    """Dense conv3d rate (GFLOP/s) on one thread: a large well-shaped layer, and the model's own layers."""
    import torch

    _set_threads(1)
    def bench(f, min_seconds=None):
        if min_seconds is None:
            min_seconds = spec.get("min_seconds", 1.0)
        f()
        best = float("inf")
        t_end = time.perf_counter() + min_seconds
        reps = 0
        while reps < 3 or time.perf_counter() < t_end:
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
            reps += 1
        return best

    out = {}
    with torch.inference_mode():
        c, n = 16, spec.get("n", 64)
        conv = torch.nn.Conv3d(c, c, 3, padding=1)
        x = torch.randn(1, c, n, n, n)
        t = bench(lambda: conv(x))
        out["large_conv_gflops"] = 2 * c * c * 27 * n ** 3 / t / 1e9
        if spec.get("layers"):
            model = build_model(0)
            net = model.spec().stages[0].net
            r = spec.get("layer_n", 64)
            h = torch.randn(1, 1, r, r, r)
            flops = secs = 0.0
            per = []
            for layer in list(net.body) + [net.expand]:
                if isinstance(layer, torch.nn.Conv3d):
                    fl = 2 * layer.in_channels // layer.groups * layer.out_channels * math.prod(layer.kernel_size) * r ** 3
                    hh = h
                    tt = bench(lambda layer=layer, hh=hh: layer(hh), min_seconds=spec.get("min_seconds", 1.0) / 4)
                    per.append({"layer": f"{layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} g{layer.groups}",
                                "gflops": round(fl / tt / 1e9, 1), "ms": round(tt * 1e3, 1)})
                    flops += fl
                    secs += tt
                h = layer(h)
            out["model_layers"] = per
            out["model_layers_gflops"] = flops / secs / 1e9
    return out


# --------------------------------------------------------------- lever: resize without gathers


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


def child_inmem(spec: dict) -> dict:
    """The in-memory operator on a slab of the input (no halo recomputation, no I/O in the timing)."""
    from svision_big.ngff import open_image
    from svision_big.operator import enhance_array

    _set_threads(1)
    model = build_model(spec["bp"], spec.get("light", False))
    opspec = model.spec()
    img = open_image(spec["input"])
    sel = tuple(slice(a, b) for a, b in spec["region"])
    x = np.asarray(img.level(0)[sel])
    enhance_array(x[:8, :8, :8], opspec, np.uint16)  # warm-up (allocator, oneDNN primitives)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    y = enhance_array(x, opspec, np.uint16)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"in_shape": list(x.shape), "out_voxels": int(y.size), "seconds": secs,
            "voxels_per_second": y.size / secs, "rss_before": rss0, "peak_rss": peak,
            "bytes_per_input_voxel": (peak - rss0) / x.size}


def _op_category(name: str) -> str:
    if "conv" in name:
        return "convolutions (oneDNN)"
    if "prelu" in name:
        return "PReLU"
    if name in ("aten::index_select", "aten::mul", "aten::add_", "aten::mul_"):
        return "tap-table gathers (cubic resize: index_select, mul, add_)"
    if name in ("aten::flip", "aten::rot90", "aten::copy_", "aten::clone", "aten::contiguous", "aten::permute",
                "aten::reshape", "aten::_to_copy", "aten::to"):
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

    from svision_big.execute import DoneRecords
    from svision_big.ngff import format_for, open_image, open_output_group
    from svision_big.operator import back_project, cast_output, predict
    from svision_big.plan import BlockPlan, default_block

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
        x = timed("to tensor + normalise", lambda: opspec.norm.forward(torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = timed("network ensemble (predict)", lambda: predict(st.net, x, st.ensemble).clamp_(min=floor))
        cats: dict[str, float] = {}
        for ev in prof.key_averages():
            if ev.key.startswith("aten::") or "conv" in ev.key:
                cats[_op_category(ev.key)] = cats.get(_op_category(ev.key), 0.0) + ev.self_cpu_time_total / 1e6
        if st.bp_iters:
            y = timed(f"back-projection ({st.bp_iters} it)", lambda: back_project(y, x, st.degradation, st.bp_iters, floor))
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
    return {"block": list(block), "halo": list(halo), "read_shape": list(x_np.shape), "write_voxels": b.write_voxels,
            "times": times, "ensemble_ops": cats, "total": total, "compressed_ratio": crop.nbytes / nbytes,
            "roundtrip_ok": zarr_ok, "operator_output_voxels": int(out.size),
            "operator_peak_rss_delta_bytes": peak - rss0, "bytes_per_read_voxel": (peak - rss0) / x_np.size}


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
        out["residual cubic upsample, strided views instead of gathers"] = bench(lambda: _resize_views(x3, fac, up=True))
        d_views = float((resize(x3, fac, up=True) - _resize_views(x3, fac, up=True)).abs().max())
        from svision_big.degrade import Degradation

        deg = Degradation(fac)
        yy = resize(x3, fac, up=True)
        d_views = max(d_views, float((deg.down(yy) - _resize_views(yy, fac, up=False)).abs().max()))
        out["one back-projection iteration (shipped tap-table gathers)"] = bench(
            lambda: (yy + deg.up(x3 - deg.down(yy))).clamp_(min=0.0))
        out["one back-projection iteration, strided views"] = bench(
            lambda: (yy + _resize_views(x3 - _resize_views(yy, fac, up=False), fac, up=True)).clamp_(min=0.0))
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
                    w[gi * cog:(gi + 1) * cog, gi * cig:(gi + 1) * cig] = layer.weight[gi * cog:(gi + 1) * cog]
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
    return {"read": list(r), "seconds": out, "max_abs_diff_dense": d_dense, "max_abs_diff_bf16": d_bf,
            "max_abs_diff_views": d_views,
            "output_range": float(ref.abs().max())}


def child_enhance(spec: dict) -> dict:
    from svision_big.model import load_model
    from svision_big.pipeline import enhance

    model = load_model(spec["model"])
    t = time.perf_counter()
    client = cluster = None
    if spec.get("no_malloc_trim"):
        # distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker; that disables glibc's
        # dynamic mmap threshold, so every tensor > 128 KiB is a fresh mmap (page faults, zeroing).
        import dask
        from distributed import Client, LocalCluster

        env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            cluster = LocalCluster(n_workers=spec.get("workers", 2), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
    try:
        if spec.get("scheduler") == "sync":
            import torch

            torch.set_num_threads(1)
        stats = enhance(spec["input"], spec["output"], model, workers=spec.get("workers", 2), block=spec.get("block"),
                        progress=False, dtype="uint16", client=client, scheduler=spec.get("scheduler"),
                        precision=spec.get("precision", "float32"))
        if client is not None:
            stats["worker_env"] = list(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values())
    finally:
        if client is not None:
            client.close()
            cluster.close()
    wall = time.perf_counter() - t
    out_bytes = 0
    for root, _, files in os.walk(spec["output"]):
        out_bytes += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    keep = {k: stats.get(k) for k in ("seconds", "voxels_per_second", "pyramid_seconds", "blocks", "computed",
                                      "output_voxels", "halo", "block", "levels", "worker_env")}
    keep.update(wall=wall, stored_bytes=out_bytes)
    return keep


def child_map_overlap(spec: dict) -> dict:
    """What a user would write: map_overlap(depth=halo, boundary='none') + to_zarr (same chunks and codec)."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from svision_big.model import load_model
    from svision_big.ngff import format_for, open_image, open_output_group

    model = load_model(spec["model"])
    halo = model.halo()
    img = open_image(spec["input"])
    in_block = tuple(b // f for b, f in zip(spec["block"], FACTORS))
    cluster = LocalCluster(n_workers=spec.get("workers", 2), threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        t0 = time.perf_counter()
        x = da.from_zarr(img.level(0), chunks=in_block)
        f = FACTORS

        def run(b, block_info=None):
            import torch

            torch.set_num_threads(1)
            info = block_info[None]
            loc, nch = info["chunk-location"], info["num-chunks"]
            y = model.enhance(b, dtype=np.uint16)
            sl = tuple(slice(0 if l == 0 else fi * h, None if l == n - 1 else -fi * h)
                       for l, n, fi, h in zip(loc, nch, f, halo))
            return y[sl]

        out_chunks = tuple(tuple(c * fi for c in cs) for cs, fi in zip(x.chunks, f))
        y = x.map_overlap(run, depth=dict(enumerate(halo)), boundary="none", trim=False, chunks=out_chunks,
                          dtype=np.uint16)
        n_tasks = len(dict(y.__dask_graph__()))
        fmt = format_for("0.5")
        g = open_output_group(spec["output"], fmt, mode="a")
        arr = fmt.create_array(g, "0", y.shape, spec["block"], "uint16", ["z", "y", "x"])
        y.to_zarr(arr, compute=True)
        secs = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    nblocks = x.npartitions
    return {"seconds": secs, "output_voxels": int(math.prod(y.shape)), "voxels_per_second": math.prod(y.shape) / secs,
            "graph_tasks": n_tasks, "blocks": nblocks, "tasks_per_block": n_tasks / nblocks, "halo": list(halo)}


def child_plan(spec: dict) -> dict:
    """Client-side planning cost for n blocks: BlockPlan, every block, task payload, and enhance() to block 1."""
    import tempfile

    import zarr

    from svision_big.execute import Job
    from svision_big.ngff import format_for, multiscales_metadata
    from svision_big.plan import BlockPlan, default_block

    _set_threads(1)
    n_side = spec["n_side"]
    light = build_model(0, light=True)
    real_halo = tuple(spec["halo"])
    block = (128, 128, 128)
    in_shape = tuple(n_side * b // f for b, f in zip(block, FACTORS))
    proc = psutil.Process()
    res = {"in_shape": list(in_shape), "block": list(block)}

    out_shape = tuple(n * f for n, f in zip(in_shape, FACTORS))

    def make_plan():
        return BlockPlan(in_shape, FACTORS, default_block(out_shape, FACTORS, 128), real_halo)

    def walk(plan, limit=None):
        # what execute's client-side generator yields (indices not done), plus the block
        # geometry each task computes from its index on the worker
        done: set[int] = set()
        todo = (i for i in range(len(plan)) if i not in done)
        cnt = vox = 0
        for i in todo:
            vox += plan[i].write_voxels
            cnt += 1
            if limit and cnt >= limit:
                break
        return cnt, vox

    # timings (no tracing: tracemalloc slows Python ~10x)
    t = time.perf_counter()
    plan = make_plan()
    n = len(plan)
    res["blocks"] = n
    res["plan_seconds"] = time.perf_counter() - t
    if spec.get("iterate", True):
        t = time.perf_counter()
        cnt, vox = walk(plan)
        res["iterate_all_blocks_seconds"] = time.perf_counter() - t
        res["iterate_per_block_us"] = res["iterate_all_blocks_seconds"] / n * 1e6
        assert cnt == n and vox == math.prod(plan.out_shape)
    t = time.perf_counter()
    res["overhead"] = plan.overhead()
    res["overhead_seconds"] = time.perf_counter() - t
    job = Job(in_url="/x.zarr", in_path="0", out_url="/y.zarr", out_path="0", plan=plan, spatial_axes=(0, 1, 2),
              outer_axes=(), outer_offsets=(), models=("0" * 16,), model_axis=None, out_dtype="uint16",
              done_url="/y.zarr/svision_state/done-0123456789abcdef")
    res["task_payload_bytes"] = len(pickle.dumps((job, n - 1)))
    # memory: Python allocations of planning + walking the first 10^4 blocks (walking keeps nothing)
    del plan
    gc.collect()
    rss0 = proc.memory_info().rss
    tracemalloc.start()
    plan = make_plan()
    walk(plan, limit=10_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res["tracemalloc_peak_bytes"] = peak
    res["rss_delta_bytes"] = proc.memory_info().rss - rss0

    # enhance() itself on a metadata-only input of this shape, up to the first finished block
    if spec.get("enhance", True):
        from svision_big.pipeline import enhance

        tmp = Path(tempfile.mkdtemp(prefix="svb-plan-", dir=spec.get("workdir")))
        try:
            inp = tmp / "in.ome.zarr"
            fmt = format_for("0.5")
            grp = zarr.open_group(str(inp), mode="w", zarr_format=3)
            fmt.create_array(grp, "0", in_shape, (64, 256, 256), "uint16", ["z", "y", "x"])  # no chunk written
            axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
            ds = [("0", [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])]
            fmt.write_ome_attrs(grp, multiscales_metadata(axes, ds, name="meta-only", version="0.5"))

            class Stop(Exception):
                pass

            first = {}

            def on_block(i):
                first["t"] = time.perf_counter()
                raise Stop

            gc.collect()
            rss0 = proc.memory_info().rss
            tracemalloc.start()
            t = time.perf_counter()
            try:
                enhance(str(inp), str(tmp / "out.ome.zarr"), light, scheduler="sync", progress=False, on_block=on_block)
            except Stop:
                pass
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            res["enhance_to_first_block_seconds"] = first["t"] - t
            res["enhance_tracemalloc_peak_bytes"] = peak
            res["enhance_rss_delta_bytes"] = proc.memory_info().rss - rss0
            res["enhance_light_halo"] = list(light.halo())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # resume: listing the done-records of a run (one empty file per finished block)
    n_rec = spec.get("records", 0)
    if n_rec:
        from svision_big.execute import DoneRecords

        tmp = Path(tempfile.mkdtemp(prefix="svb-rec-", dir=spec.get("workdir")))
        try:
            rec = DoneRecords(str(tmp / "done"))
            rec.create()
            t = time.perf_counter()
            for i in range(n_rec):
                rec.mark(i)
            res["records_write_seconds"] = time.perf_counter() - t
            gc.collect()
            rss0 = proc.memory_info().rss
            t = time.perf_counter()
            done = DoneRecords(str(tmp / "done")).load()
            res["records_load_seconds"] = time.perf_counter() - t
            res["records_load_rss_delta_bytes"] = proc.memory_info().rss - rss0
            tracemalloc.start()
            done = DoneRecords(str(tmp / "done")).load()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert len(done) == n_rec
            res["records"] = n_rec
            res["records_load_tracemalloc_peak_bytes"] = peak
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def child_blocks(spec: dict) -> dict:
    """One pass of the operator on one interior block of output side ``size`` (read region = block + the
    pass's own halo), one thread: seconds, output voxels/s counted on the *write* region (so the halo's
    recomputation is charged), and the process's peak RSS (the parent samples it)."""
    _set_threads(1)
    import torch

    from svision_big.operator import pass_halo, plan_passes, run_pass

    model = build_model(spec["bp"])
    mspec = model.spec()
    p = [q for q in plan_passes(mspec) if q.kind == spec["kind"]][0]
    halo = pass_halo(mspec, p)
    size = spec["size"]
    read = [size // f + 2 * h for f, h in zip(p.factors, halo)]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(read, generator=g) * 0.3
    comp = torch.rand([n * f for n, f in zip(read, p.factors)], generator=g) * 0.3 if p.companion else None
    run_pass(mspec, p, x[:20, :20, :20], comp[:40, :40, :40] if comp is not None else None)  # warm up
    from svision_big.operator import cast_output

    from svision_big.operator import output_offset

    faces = ((False, False),) * 3  # an interior block: every side is halo
    off = output_offset(mspec, p, faces)
    crop = tuple(slice(h * f - o, h * f - o + size) for h, o, f in zip(halo, off, p.factors))
    reps, t0 = 0, time.perf_counter()
    while True:  # as execute.run_block: the pass, then crop to the owned region and cast
        y = run_pass(mspec, p, x, comp, faces)[crop].contiguous()
        cast_output(mspec.norm.inverse(y).numpy(), "uint16")
        del y
        reps += 1
        if time.perf_counter() - t0 >= spec.get("min_seconds", 0.0):
            break
    sec = (time.perf_counter() - t0) / reps
    write = size ** 3
    return {"kind": p.kind, "bp": spec["bp"], "size": size, "halo": list(halo), "read": read, "seconds": sec,
            "write_voxels_per_second": write / sec,
            "read_voxels_per_second": math.prod(n * f for n, f in zip(read, p.factors)) / sec}


CHILDREN = {"convrate": child_convrate, "inmem": child_inmem, "profile": child_profile, "levers": child_levers,
            "enhance": child_enhance, "map_overlap": child_map_overlap, "plan": child_plan,
            "blocks": child_blocks}


# =========================================================================== sections (parent)


def fresh(path: Path) -> str:
    if path.exists():
        shutil.rmtree(path)
    return str(path)


def section_throughput(cfg: dict, workdir: Path, log) -> dict:
    from svision_big.plan import default_block

    res = {}
    shape = tuple(cfg["throughput_in"])
    _, gen = make_input(workdir, shape)
    res["input_shape"] = list(shape)
    res["output_shape"] = [n * f for n, f in zip(shape, FACTORS)]
    res["input_generation_seconds"] = round(gen, 1)
    res["block"] = list(default_block(tuple(res["output_shape"]), FACTORS, 256))

    # physical limit: conv rate alone and in 2 processes at once
    log("conv rate: 1 process")
    one = run_child({"mode": "convrate", "layers": True, "n": 64, "min_seconds": cfg["conv_seconds"]})
    log("conv rate: 2 processes at once")
    two = run_children([{"mode": "convrate", "n": 64, "min_seconds": cfg["conv_seconds"]}] * 2)
    res["conv"] = {"one_process_gflops": one["large_conv_gflops"], "model_layers": one["model_layers"],
                   "model_layers_gflops": one["model_layers_gflops"],
                   "two_processes_gflops": [r["large_conv_gflops"] for r in two],
                   # the best the machine showed: 2 processes at once, or twice the lone process (shared machine)
                   "machine_gflops": max(sum(r["large_conv_gflops"] for r in two), 2 * one["large_conv_gflops"])}

    rows = []
    for bp, in_shape, slab in cfg["throughput_bps"]:
        model = build_model(bp)
        mpath = workdir / f"model_bp{bp}.svb"
        model.save(mpath)
        fl = flops_per_output_voxel(model)
        limit = res["conv"]["machine_gflops"] * 1e9 / fl["total_per_output_voxel"]
        row = {"bp": bp, "halo": list(model.halo()), "flops": fl, "physical_limit_voxels_per_second": limit,
               # enhance's own default (block None); map_overlap gets the same block
               "block": list(default_block(tuple(n * f for n, f in zip(in_shape, FACTORS)), FACTORS, 256))}
        src, _ = make_input(workdir, tuple(in_shape))
        row["input_shape"] = list(in_shape)
        row["output_voxels"] = math.prod(in_shape) * math.prod(FACTORS)
        block = tuple(row["block"])
        # in-memory operator: 2 processes at once, each on a slab of whole input (no halo)
        zs, ys, xs = slab
        assert zs <= in_shape[0] and ys <= in_shape[1] and 2 * xs <= in_shape[2], "in-memory slabs must fit the volume"
        regions = [[[0, zs], [0, ys], [k * xs, (k + 1) * xs]] for k in range(2)]

        def inmem(bp=bp, src=src, regions=regions, zs=zs, ys=ys, xs=xs):
            log(f"bp={bp}: in-memory operator, 2 processes, slabs {zs}x{ys}x{xs}")
            im = run_children([{"mode": "inmem", "input": src, "bp": bp, "region": r} for r in regions])
            return {"per_process": [{k: r[k] for k in ("seconds", "out_voxels", "voxels_per_second", "bytes_per_input_voxel")}
                                    for r in im],
                    "voxels_per_second": sum(r["voxels_per_second"] for r in im),
                    "load_avg_1min": im[0]["memory_all_children"]["load_avg_1min"]}

        def enhance_run(tag, *, bp=bp, src=src, in_shape=in_shape, mpath=mpath, block=block, **extra):
            log(f"bp={bp}: enhance end to end{tag}, input {in_shape}")
            out = fresh(workdir / f"out_bp{bp}.ome.zarr")
            e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), "block": None, **extra})
            shutil.rmtree(out, ignore_errors=True)
            return {**{k: e[k] for k in ("seconds", "pyramid_seconds", "wall", "blocks", "output_voxels", "stored_bytes",
                                         "worker_env") if k in e},
                    "level0_voxels_per_second": e["voxels_per_second"],
                    "voxels_per_second": e["output_voxels"] / (e["seconds"] + e["pyramid_seconds"]),
                    "peak_rss_total_bytes": e["memory"]["peak_total_bytes"],
                    "peak_rss_largest_process_bytes": e["memory"]["peak_per_process_bytes"][0],
                    "processes": e["memory"]["processes"], "load_avg_1min": e["memory"]["load_avg_1min"]}

        # A-B-A order (in-memory, enhance, alternatives, enhance, in-memory): other tenants' load drifts
        runs_im = [inmem()]
        runs_e = [enhance_run("")]
        if bp in cfg["bf16_bps"]:
            row["enhance_bf16"] = enhance_run(", networks in bfloat16", precision="bfloat16")
        if bp in cfg["malloc_bps"]:
            row["enhance_no_malloc_trim"] = enhance_run(", workers without MALLOC_TRIM_THRESHOLD_", no_malloc_trim=True)
        if bp in cfg["map_overlap_bps"]:
            log(f"bp={bp}: dask map_overlap + to_zarr")
            out = fresh(workdir / f"mo_bp{bp}.zarr")
            m = run_child({"mode": "map_overlap", "input": src, "output": out, "model": str(mpath), "block": list(block)})
            row["map_overlap"] = {k: m[k] for k in ("seconds", "voxels_per_second", "graph_tasks", "blocks", "tasks_per_block")}
            row["map_overlap"]["peak_rss_total_bytes"] = m["memory"]["peak_total_bytes"]
            row["map_overlap"]["load_avg_1min"] = m["memory"]["load_avg_1min"]
            shutil.rmtree(out, ignore_errors=True)
        if bp in cfg["aba"]:
            if bp in cfg["malloc_bps"] or bp in cfg["map_overlap_bps"] or bp in cfg["bf16_bps"]:
                runs_e.append(enhance_run(" (again)"))
            runs_im.append(inmem())
        row["inmem"] = {**runs_im[0], "runs": runs_im,
                        "voxels_per_second": float(np.mean([r["voxels_per_second"] for r in runs_im]))}
        row["enhance"] = {**runs_e[0], "runs": runs_e,
                          "voxels_per_second": float(np.mean([r["voxels_per_second"] for r in runs_e])),
                          "level0_voxels_per_second": float(np.mean([r["level0_voxels_per_second"] for r in runs_e]))}
        rows.append(row)
    res["rows"] = rows
    return res


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


def section_memory(cfg: dict, workdir: Path, log, throughput: dict) -> dict:
    from svision_big.plan import default_block

    rows = []
    for label, mult, in_shape, light in cfg["memory_runs"]:
        src, gen = make_input(workdir, tuple(in_shape))
        model = build_model(0, light=light)
        mpath = workdir / f"model_{'light' if light else 'bp0'}.svb"
        model.save(mpath)
        out_shape = [n * f for n, f in zip(in_shape, FACTORS)]
        block = None  # enhance's default
        log(f"memory: {label} {'stand-in' if light else 'real'} operator, input {in_shape} -> output {out_shape}")
        out = fresh(workdir / f"mem_{label}_{'light' if light else 'real'}.ome.zarr")
        e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), "block": block})
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"volume": label, "multiple": mult, "operator": "stand-in (light)" if light else "real (bp 0)",
                     "input_shape": list(in_shape), "output_shape": out_shape,
                     "output_gb_uint16": math.prod(out_shape) * 2 / 1e9, "blocks": e["blocks"],
                     "seconds": e["seconds"], "pyramid_seconds": e["pyramid_seconds"], "wall": e["wall"],
                     "stored_gb": e["stored_bytes"] / 1e9, "input_generation_seconds": round(gen, 1),
                     "peak_rss_total_bytes": e["memory"]["peak_total_bytes"],
                     "peak_rss_largest_process_bytes": e["memory"]["peak_per_process_bytes"][0],
                     "peak_rss_per_process_bytes": e["memory"]["peak_per_process_bytes"],
                     "processes": e["memory"]["processes"], "load_avg_1min": e["memory"]["load_avg_1min"],
                     "voxels_per_second": e["output_voxels"] / (e["seconds"] + e["pyramid_seconds"])})
    over = []
    for r in rows:  # the stand-in runs above, as shipped
        if r["operator"].startswith("stand-in") and any(o[0] == r["volume"] for o in cfg.get("overhead_runs", [])):
            over.append({"volume": r["volume"], "how": "2 workers (as shipped; the memory run above)", "blocks": r["blocks"],
                         "seconds": r["seconds"], "pyramid_seconds": r["pyramid_seconds"],
                         "blocks_per_second": r["blocks"] / r["seconds"], "load_avg_1min": r["load_avg_1min"]})
    for label, in_shape, how in cfg.get("overhead_runs", []):
        src, _ = make_input(workdir, tuple(in_shape))
        mpath = workdir / "model_light.svb"
        build_model(0, light=True).save(mpath)
        log(f"pipeline overhead: stand-in operator, {label}, {how}")
        out = fresh(workdir / "overhead.ome.zarr")
        extra = {"scheduler": "sync"} if how == "in-process (scheduler='sync'), 1 thread" else (
            {"no_malloc_trim": True} if how.startswith("2 workers without") else {})
        e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), **extra})
        shutil.rmtree(out, ignore_errors=True)
        over.append({"volume": label, "how": how, "blocks": e["blocks"], "seconds": e["seconds"],
                     "pyramid_seconds": e["pyramid_seconds"], "blocks_per_second": e["blocks"] / e["seconds"],
                     "load_avg_1min": e["memory"]["load_avg_1min"]})
    return {"rows": rows, "overhead": over}


def section_planning(cfg: dict, workdir: Path, log) -> dict:
    rows = []
    halo = list(build_model(0).halo())
    for i, n_side in enumerate(cfg["plan_sides"]):
        log(f"planning {n_side ** 3:,} blocks")
        last = i == len(cfg["plan_sides"]) - 1
        r = run_child({"mode": "plan", "n_side": n_side, "halo": halo, "workdir": str(workdir),
                       "records": cfg["records"] if last else 0, "iterate": n_side ** 3 <= cfg["iterate_max"]})
        r.pop("memory", None)
        rows.append(r)
    return {"rows": rows, "halo": halo}


def section_blocks(cfg: dict, log) -> dict:
    """Each pass's speed and memory against block size, to choose the default blocks from numbers:
    bigger blocks repeat less halo but run slower per voxel on this CPU (caches) and need more memory."""
    rows = []
    for kind, bp in (("net", 0), ("bp", 2), ("bp", 10)):
        for size in cfg["block_sizes"][kind if kind == "net" else f"bp{bp}"]:
            log(f"blocks: {kind} pass (bp {bp}), block {size}^3")
            r = run_child({"mode": "blocks", "kind": kind, "bp": bp, "size": size, "min_seconds": cfg["block_seconds"]})
            r["peak_rss_bytes"] = r.pop("memory")["peak_total_bytes"]
            rows.append(r)
    return {"rows": rows}


def section_halo(cfg: dict, blocks: dict | None = None) -> dict:
    """Per pass (network, back-projection): halo and ``BlockPlan.overhead()`` at the default block and
    against block size, on a 34 G-voxel output, with the peak RSS measured in the blocks section."""
    from svision_big.operator import pass_halo, plan_passes
    from svision_big.pipeline import _default_pass_block
    from svision_big.plan import BlockPlan

    big_in = (1024, 4096, 4096)
    out_shape = tuple(n * f for n, f in zip(big_in, FACTORS))
    rows = []
    sizes = (128, 192, 256, 320, 384, 512)
    for bp in (0, 2, 5, 10):
        spec = build_model(bp).spec()
        for p in plan_passes(spec):
            halo = pass_halo(spec, p)
            d = min(_default_pass_block(p.kind, halo), min(out_shape))
            row = {"bp": bp, "pass": p.kind, "halo": list(halo), "default_block": d,
                   "default_overhead": BlockPlan(big_in, FACTORS, (d,) * 3, halo).overhead(),
                   "by_block": [BlockPlan(big_in, FACTORS, (s,) * 3, halo).overhead() for s in sizes]}
            rows.append(row)
    # the network pass runs unpadded convolutions on halo sides: layer l computes only the write
    # region plus the radius the layers after it still need. Work-weighted by each layer's FLOPs:
    net = build_model(0).spec().stages[0].net
    layers, cum = [], 0
    for conv, _ in net.layers():
        r = conv.padding[0]
        cum += r
        flops = 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 3
        layers.append((flops, net.conv_radius() - cum))
    def valid_overhead(size):
        w = size // FACTORS[0]
        work = sum(fl * (w + 2 * rest) ** 3 for fl, rest in layers)
        return work / sum(fl * w ** 3 for fl, _ in layers) - 1.0
    for row in rows:
        if row["pass"] == "net":
            row["valid_conv_by_block"] = [valid_overhead(s) for s in sizes]
            row["valid_conv_default"] = valid_overhead(row["default_block"])
    fused = {bp: list(build_model(bp).halo()) for bp in (0, 10)}
    single = {bp: BlockPlan(big_in, FACTORS, (128,) * 3, fused[bp]).overhead() for bp in fused}
    return {"volume_input": list(big_in), "rows": rows, "sizes": list(sizes),
            "single_pass_halo": fused, "single_pass_overhead_128": single}


# =========================================================================== report


def report(res: dict) -> str:
    L = []
    m = res["machine"]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}, dask {m['dask']}, "
             f"distributed {m['distributed']}, zarr {m['zarr']}, numcodecs {m['numcodecs']}; "
             f"load average at start {m['load_avg_at_start']}; {m['date']}; mode `{res['mode']}`, "
             f"total {res['total_seconds']:.0f} s.")
    L.append("")
    tp = res["throughput"]
    conv = tp["conv"]
    L.append("### 1. Throughput (factor 2, full operator, default architecture, random weights; output voxels/s)")
    L.append("")
    L.append(f"Conv rate reached (dense 16->16 k3 conv3d on 64^3, 1 thread): {conv['one_process_gflops']:.1f} GFLOP/s "
             f"alone; {' + '.join(f'{g:.1f}' for g in conv['two_processes_gflops'])} = {conv['machine_gflops']:.1f} GFLOP/s "
             f"in 2 processes at once; the physical limit below uses the larger of that and twice the lone rate: "
             f"{conv['machine_gflops']:.1f} GFLOP/s. The model's own layers reach {conv['model_layers_gflops']:.1f} GFLOP/s "
             f"(1 thread): " + ", ".join(f"{l['layer']} {l['gflops']}" for l in conv["model_layers"]) + ".")
    L.append("")
    rows = tp["rows"]
    L.append("| output voxels/s (M/s) | " + " | ".join(
        f"bp {r['bp']} (halo {r['halo'][0]}): {'x'.join(map(str, r['input_shape']))} -> "
        f"{'x'.join(str(n * 2) for n in r['input_shape'])}, {r['enhance']['blocks']} blocks of {'x'.join(map(str, r['block']))}"
        for r in rows) + " |")
    L.append("|---|" + "---|" * len(rows))

    def line(label, f):
        cells = []
        for r in rows:
            try:
                cells.append(f(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("not run")
        L.append(f"| {label} | " + " | ".join(cells) + " |")

    line("physical limit: FLOP/voxel over the machine's measured conv rate",
         lambda r: f"{_mv(r['physical_limit_voxels_per_second'])} ({r['flops']['total_per_output_voxel']:,.0f} FLOP/voxel)")
    def runs(r, k):
        rr = r[k].get("runs") or [r[k]]
        return "" if len(rr) < 2 else " (runs " + ", ".join(_mv(x["voxels_per_second"]) for x in rr) + ")"

    line("in-memory operator, whole slabs, 2 processes x 1 thread (before and after)",
         lambda r: f"{_mv(r['inmem']['voxels_per_second'])}{runs(r, 'inmem')}")
    line("**`enhance` end to end** (read, infer, write, pyramid)",
         lambda r: f"**{_mv(r['enhance']['voxels_per_second'])}**{runs(r, 'enhance')}; "
                   f"{r['enhance']['seconds']:.0f} s + pyramid {r['enhance']['pyramid_seconds']:.1f} s")
    line("`enhance` level 0 only", lambda r: _mv(r["enhance"]["level0_voxels_per_second"]))
    line("`enhance --precision bfloat16` end to end (networks in bfloat16; opt-in)",
         lambda r: f"{_mv(r['enhance_bf16']['voxels_per_second'])} ({r['enhance_bf16']['seconds']:.0f} s + "
                   f"{r['enhance_bf16']['pyramid_seconds']:.1f} s); {r['enhance_bf16']['voxels_per_second'] / r['enhance']['voxels_per_second']:.2f}x float32")
    line("`enhance` end to end, workers without MALLOC_TRIM_THRESHOLD_",
         lambda r: f"{_mv(r['enhance_no_malloc_trim']['voxels_per_second'])} ({r['enhance_no_malloc_trim']['seconds']:.0f} s + "
                   f"{r['enhance_no_malloc_trim']['pyramid_seconds']:.1f} s)")
    line("`map_overlap` + `to_zarr` (level 0 only)",
         lambda r: f"{_mv(r['map_overlap']['voxels_per_second'])} ({r['map_overlap']['seconds']:.0f} s, "
                   f"{r['map_overlap']['tasks_per_block']:.1f} tasks/block)")
    line("end to end / in-memory (target >= 0.8)",
         lambda r: f"{r['enhance']['voxels_per_second'] / r['inmem']['voxels_per_second']:.2f}")
    line("level 0 / map_overlap (target > 1)",
         lambda r: f"{r['enhance']['level0_voxels_per_second'] / r['map_overlap']['voxels_per_second']:.2f}")
    line("end to end (with pyramid) / map_overlap (without)",
         lambda r: f"{r['enhance']['voxels_per_second'] / r['map_overlap']['voxels_per_second']:.2f}")
    line("without / with MALLOC_TRIM_THRESHOLD_",
         lambda r: f"{r['enhance_no_malloc_trim']['voxels_per_second'] / r['enhance']['voxels_per_second']:.2f}")
    line("end to end / physical limit",
         lambda r: f"{r['enhance']['voxels_per_second'] / r['physical_limit_voxels_per_second']:.3f}")
    line("end to end / target 2.6 M/s",
         lambda r: f"{r['enhance']['voxels_per_second'] / 2.6e6:.3f} ({'met' if r['enhance']['voxels_per_second'] >= 2.6e6 else 'missed'})")
    def loads(r):
        parts = []
        for k in ("inmem", "enhance", "enhance_bf16", "enhance_no_malloc_trim", "map_overlap"):
            if k in r:
                for x in r[k].get("runs") or [r[k]]:
                    parts.append(f"{k} {'/'.join(f'{v:.1f}' for v in x['load_avg_1min'])}")
        return "; ".join(parts)

    line("1-min load average (other tenants) at start/end of each run", loads)
    L.append("")
    fl = tp["rows"][0]["flops"]["stage0"]
    L.append(f"FLOP count (per output voxel): network {fl['network_per_output_voxel']:,.0f} per variant "
             f"(convolutions {fl['conv_flops_per_lowres_voxel']:,} per low-res voxel / 8), x {fl['variants']} variants, + residual cubic "
             f"upsample {fl['residual_cubic_per_output_voxel']:.0f} once = {fl['ensemble_per_output_voxel']:,.0f}; "
             f"back-projection {fl['bp_per_iteration_per_output_voxel']:.0f} per iteration.")
    L.append("")
    if "profile" in res:
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
        L.append("| **total** | " + " | ".join(f"{pr[c]['total']:.2f} s = {pr[c]['write_voxels'] / pr[c]['total'] / 1e6:.3f} M written voxels/s "
                                                  f"(compression {pr[c]['compressed_ratio']:.1f}x)" for c in cols) + " |")
        L.append("")
        for c in cols:
            ops = pr[c].get("ensemble_ops") or {}
            tot = sum(ops.values()) or 1.0
            L.append(f"Inside the ensemble ({c}, torch profiler, self time): " + ", ".join(
                f"{k} {100 * v / tot:.0f}%" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])) + ".")
        L.append("")
        lv = pr["levers"]
        sec = lv["seconds"]
        base = "learned part, channels-last input (as predict runs it)"
        bf = lv["max_abs_diff_bf16"]
        pairs = [
            ("learned part of one ensemble variant: NCDHW layout instead of channels-last", base,
             "learned part, default (NCDHW) layout", "exact"),
            ("... grouped 6->6 convs rewritten as dense block-diagonal convs (2x the MACs)", base,
             "learned part, grouped convs as dense, channels-last", f"{lv['max_abs_diff_dense']:.0e}"),
            ("... 2 ensemble variants batched in one call", base, "learned part, 2 variants batched (per variant)", "exact"),
            ("... bfloat16 weights and activations", base, "learned part, bfloat16, channels-last",
             bf if isinstance(bf, str) else f"{bf:.0e} (outputs up to {lv['output_range']:.2f})"),
            ("residual cubic upsample: strided views of a padded copy instead of index_select gathers",
             "residual cubic upsample (once per block)", "residual cubic upsample, strided views instead of gathers",
             f"{lv.get('max_abs_diff_views', float('nan')):.0e}"),
            ("one back-projection iteration: same, for the down- and up-resize",
             "one back-projection iteration (shipped tap-table gathers)", "one back-projection iteration, strided views",
             f"{lv.get('max_abs_diff_views', float('nan')):.0e}"),
        ]
        L.append(f"Levers measured on one block's {'x'.join(map(str, lv['read']))} read region (1 thread; bp 0 model):")
        L.append("")
        L.append("| lever | shipped | alternative | speed-up | max abs difference |")
        L.append("|---|---|---|---|---|")
        for label, k0, k1, diff in pairs:
            if k0 in sec and k1 in sec:
                L.append(f"| {label} | {sec[k0]:.3f} s | {sec[k1]:.3f} s | {sec[k0] / sec[k1]:.2f}x | {diff} |")
        L.append("")
    mem = res["memory"]
    L.append("### 2. Memory: peak RSS of the whole process tree (client + scheduler + 2 nannies + 2 workers), default block")
    L.append("")
    L.append("| volume | operator | input -> output (uint16) | blocks | peak RSS, sum of processes | largest process | level 0 + pyramid | throughput |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in mem["rows"]:
        L.append(f"| {r['volume']} | {r['operator']} | {'x'.join(map(str, r['input_shape']))} -> {'x'.join(map(str, r['output_shape']))} "
                 f"({r['output_gb_uint16']:.2f} GB) | {r['blocks']} | {_gb(r['peak_rss_total_bytes']):.2f} GB | "
                 f"{_gb(r['peak_rss_largest_process_bytes']):.2f} GB | {r['seconds']:.0f} s + {r['pyramid_seconds']:.0f} s | "
                 f"{_mv(r['voxels_per_second'])} M/s |")
    for k, v in mem.get("flatness", {}).items():
        L.append(f"\nFlatness ({k}): largest / smallest peak = {v:.3f}")
    L.append("")
    if mem.get("overhead"):
        L.append("Per-block pipeline cost with the stand-in operator (almost no compute: read, cast, compress, write, "
                 "done-record, scheduling):")
        L.append("")
        L.append("| volume | how | blocks | level 0 | blocks/s | 1-min load start/end |")
        L.append("|---|---|---|---|---|---|")
        for r in mem["overhead"]:
            L.append(f"| {r['volume']} | {r['how']} | {r['blocks']} | {r['seconds']:.1f} s | {r['blocks_per_second']:.1f} | "
                     f"{'/'.join(str(v) for v in r['load_avg_1min'])} |")
        L.append("")
    pl = res["planning"]
    L.append("### 3. Planning (client side; halo of the real bp=0 model)")
    L.append("")
    L.append("| blocks | input shape | BlockPlan | iterate every block (plan[i]) | overhead() | task payload | Python peak (tracemalloc) | RSS delta | `enhance` to first block (metadata-only input) | its Python peak |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in pl["rows"]:
        L.append(f"| {r['blocks']:,} | {'x'.join(map(str, r['in_shape']))} | {r['plan_seconds'] * 1e6:.0f} us | "
                 + (f"{r['iterate_all_blocks_seconds']:.2f} s ({r['iterate_per_block_us']:.1f} us/block)" if "iterate_all_blocks_seconds" in r
                    else "not run (--quick)") + f" | {r['overhead_seconds'] * 1e3:.1f} ms | "
                 f"{r['task_payload_bytes']} B | {r['tracemalloc_peak_bytes'] / 1e6:.2f} MB | {r['rss_delta_bytes'] / 1e6:.1f} MB | "
                 f"{r.get('enhance_to_first_block_seconds', float('nan')):.2f} s | {r.get('enhance_tracemalloc_peak_bytes', 0) / 1e6:.1f} MB |")
    L.append("")
    for r in pl["rows"]:
        if r.get("records"):
            L.append(f"Resume: listing {r['records']:,} done-records (one empty file per block, local disk) takes "
                     f"{r['records_load_seconds']:.2f} s and {r['records_load_tracemalloc_peak_bytes'] / 1e6:.1f} MB of Python memory "
                     f"(writing them took {r['records_write_seconds']:.1f} s); per million blocks that is "
                     f"{r['records_load_seconds'] * 1e6 / r['records']:.0f} s and "
                     f"{r['records_load_tracemalloc_peak_bytes'] * 1e6 / r['records'] / 1e9:.2f} GB.")
    L.append("")
    if "blocks" in res:
        L.append("### Each pass against block size (one thread, one interior block, cropped and cast as a task does)")
        L.append("")
        L.append("| pass | output block | halo | read side | seconds | output voxels/s per core | peak RSS |")
        L.append("|---|---|---|---|---|---|---|")
        for r in res["blocks"]["rows"]:
            L.append(f"| {r['kind']} (bp {r['bp']}) | {r['size']}^3 | {r['halo'][0]} | {r['read'][0]} | {r['seconds']:.2f} | "
                     f"{_mv(r['write_voxels_per_second'])} | {r['peak_rss_bytes'] / 2**30:.2f} GB |")
        L.append("")
    if "halo" in res:
        h = res["halo"]
        L.append("### 4. Halo overhead per pass (input voxels run through the pass more than once, fraction), "
                 f"input {'x'.join(map(str, h['volume_input']))}")
        L.append("")
        L.append("| model | pass | halo | " + " | ".join(f"{s}^3" for s in h["sizes"]) + " | at its default block |")
        L.append("|---|---|---|" + "---|" * (len(h["sizes"]) + 1))
        for r in h["rows"]:
            L.append(f"| bp {r['bp']} | {r['pass']} (input voxels read) | {r['halo'][0]} | "
                     + " | ".join(f"{100 * o:.0f}%" for o in r["by_block"])
                     + f" | {100 * r['default_overhead']:.0f}% ({r['default_block']}^3) |")
            if "valid_conv_by_block" in r:
                L.append(f"| bp {r['bp']} | net, work computed (unpadded convolutions on halo sides, FLOP-weighted) | "
                         f"{r['halo'][0]} | " + " | ".join(f"{100 * o:.0f}%" for o in r["valid_conv_by_block"])
                         + f" | **{100 * r['valid_conv_default']:.0f}%** ({r['default_block']}^3) |")
        L.append("")
        L.append("Before passes (one sweep, network recomputed over back-projection's halo) at 128^3: "
                 + ", ".join(f"bp {bp} halo {h['single_pass_halo'][bp][0]}: {100 * o:.0f}%"
                             for bp, o in h["single_pass_overhead_128"].items()) + ".")
        L.append("")
    return "\n".join(L)


# =========================================================================== main

QUICK = {
    "throughput_in": (32, 128, 128),
    "throughput_bps": [(0, (32, 128, 128), (32, 64, 64))],  # bp, input volume, in-memory slab (x2 processes)
    "map_overlap_bps": (0,),
    "malloc_bps": (),
    "bf16_bps": (0,),
    "aba": (),
    "conv_seconds": 0.3,
    "profile_in": (192, 192, 192),
    "profile_bps": (0,),
    "lever_reps": 1,
    "memory_runs": [("1x", 1, (32, 128, 128), True), ("8x", 8, (64, 256, 256), True)],
    "plan_sides": (46, 100),  # 97,336 and 10^6 blocks
    "iterate_max": 200_000,
    "block_sizes": {"net": (64, 128), "bp2": (64, 128), "bp10": (64, 128)},
    "block_seconds": 0.0,
    "records": 10_000,
    "overhead_runs": [("8x", (64, 256, 256), "in-process (scheduler='sync'), 1 thread")],
}
DEFAULT = {
    # 12 blocks of 256^3 (1 x 3 x 4): 2 workers finish together (9 blocks left one worker alone
    # with the last block, 10% of the run)
    "throughput_in": (128, 384, 512),
    # bp 2: what clean x2 data choose (benchmarks/quality.py), so the full operator as users run it
    "throughput_bps": [(0, (128, 384, 512), (128, 384, 256)), (2, (128, 384, 512), (128, 384, 256)),
                       (10, (128, 384, 512), (128, 384, 256))],
    "map_overlap_bps": (0,),
    "malloc_bps": (),
    "bf16_bps": (0, 2, 10),
    "aba": (0, 2),
    "conv_seconds": 1.0,
    "profile_in": (192, 192, 192),
    "profile_bps": (0, 10),
    "lever_reps": 2,
    # volumes whose blocks are all full 256^3 (the default): 4, 32 and 256 blocks
    "memory_runs": [("1x", 1, (128, 256, 256), True), ("8x", 8, (256, 512, 512), True),
                    ("64x", 64, (512, 1024, 1024), True)],
    "plan_sides": (47, 100),  # 103,823 and 10^6 blocks
    "block_sizes": {"net": (128, 192, 256, 320), "bp2": (128, 192, 256, 320), "bp10": (128, 192, 256, 320)},
    "block_seconds": 2.0,
    "iterate_max": 10**6,
    "records": 100_000,
    "overhead_runs": [("8x", (128, 512, 512), "2 workers without MALLOC_TRIM_THRESHOLD_"),
                      ("8x", (128, 512, 512), "in-process (scheduler='sync'), 1 thread")],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 2 min)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--workdir", default=os.environ.get("SVB_BENCH_DIR", "/tmp/svb-pipeline-bench"),
                    help="scratch space for inputs (cached) and outputs (removed after each run)")
    ap.add_argument("--only", default=None, help="comma list of sections: throughput,profile,memory,planning,halo,blocks")
    ap.add_argument("--report", default=None, metavar="JSON", help="print the report of an earlier run's JSON and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            print(report(json.load(fh)))
        return 0
    if args.child:
        spec = json.loads(args.child)
        out = CHILDREN[spec["mode"]](spec)
        print("RESULT " + json.dumps(out, default=float), flush=True)
        return 0

    t_start = time.perf_counter()
    cfg = QUICK if args.quick else DEFAULT
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # "profile" (one block of the single-sweep operator, phase by phase, and the levers measured on it) is
    # kept for the record of how the levers were found; run it with --only profile
    ALL = {"throughput", "memory", "planning", "halo", "blocks"}
    only = set(args.only.split(",")) if args.only else ALL

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    res = {"mode": "quick" if args.quick else "default", "machine": machine(), "targets": TARGETS, "config": cfg}
    if "throughput" in only:
        res["throughput"] = section_throughput(cfg, workdir, log)
    if "profile" in only:
        res["profile"] = section_profile(cfg, workdir, log)
    if "memory" in only:
        res["memory"] = section_memory(cfg, workdir, log, res.get("throughput"))
        # the real-operator 1x point comes from the throughput run itself (same settings)
        if "throughput" in only:
            r0 = res["throughput"]["rows"][0]
            e = r0["enhance"]
            res["memory"]["rows"].insert(0, {
                "volume": "1x (throughput run)", "multiple": 1, "operator": "real (bp 0)",
                "input_shape": r0["input_shape"], "output_shape": [n * 2 for n in r0["input_shape"]],
                "output_gb_uint16": r0["output_voxels"] * 2 / 1e9, "blocks": e["blocks"], "seconds": e["seconds"],
                "pyramid_seconds": e["pyramid_seconds"], "wall": e["wall"],
                "peak_rss_total_bytes": e["peak_rss_total_bytes"],
                "peak_rss_largest_process_bytes": e["peak_rss_largest_process_bytes"], "processes": e["processes"],
                "voxels_per_second": e["voxels_per_second"]})
        flat = {}
        for op in {r["operator"] for r in res["memory"]["rows"]}:
            peaks = [r["peak_rss_total_bytes"] for r in res["memory"]["rows"] if r["operator"] == op]
            if len(peaks) > 1:
                flat[op] = max(peaks) / min(peaks)
        res["memory"]["flatness"] = flat
    if "planning" in only:
        res["planning"] = section_planning(cfg, workdir, log)
    if "blocks" in only:
        res["blocks"] = section_blocks(cfg, log)
    if "halo" in only:
        res["halo"] = section_halo(cfg, res.get("blocks"))
    res["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    if only == ALL:
        print(report(res))
    else:
        print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "config")}, indent=1, default=float))
    log(f"done; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
