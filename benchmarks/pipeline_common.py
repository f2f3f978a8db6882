"""Shared parts of the pipeline benchmarks (``benchmarks/pipeline*.py``).

Machine description, random-weight models (``svision_big.testing``), cached synthetic inputs,
child processes with whole-tree peak-RSS sampling, the FLOP count of the operator, the run
configurations (``QUICK``, ``DEFAULT``) and the command line every section script shares.

A section script measures in child processes (``python benchmarks/pipeline_common.py --child
SPEC``), one per measurement, so that each has its own memory and thread settings;
``CHILD_MODULES`` says which script holds each child mode.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as _dt
import gc
import importlib
import json
import math
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
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


# child mode -> the script (module in benchmarks/) that defines child_<mode>
CHILD_MODULES = {
    "convrate": "pipeline_throughput",
    "inmem": "pipeline_throughput",
    "map_overlap": "pipeline_throughput",
    "enhance": "pipeline_common",
    "profile": "pipeline_profile",
    "levers": "pipeline_profile",
    "plan": "pipeline_planning",
    "blocks": "pipeline_blocks",
}

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
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "numcodecs": numcodecs.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "platform": platform.platform(),
        "date": _now(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def build_model(bp: int, light: bool = False, seed: int = 0, ensemble: int = 8, interpolation: str = "keys"):
    """Random-weight model with the real operator structure (``svision_big.testing.make_model``:
    default architecture, mapping=4, factor 2, 8-variant ensemble, no closing back-projection).

    ``light``: the stand-in operator (``svision_big.testing.stand_in_model``: 1x1 convolutions,
    halo 0, identity weights, so it writes the input nearest-upsampled) used only to push large
    volumes through the pipeline quickly: it isolates the pipeline's own memory growth with volume
    size (read, write, scheduling, pyramid).
    """
    from svision_big.testing import make_model, stand_in_model

    if light:
        return stand_in_model(FACTORS, bp=bp, lo=DATA_LO, hi=DATA_HI, seed=seed)
    # 8, 4 or 1 variants: what the held-aside check picks; the residual's interpolation sets the halo
    return make_model(
        FACTORS,
        bp=bp,
        mapping=4,
        final_bp=0,
        seed=seed,
        lo=DATA_LO,
        hi=DATA_HI,
        ensemble=ensemble,
        interpolation=interpolation,
    )


def synth_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Deterministic uint16 volume: a smooth, sparse-ish structure field plus noise, made slab by slab."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = shape
    c = 8
    coarse = ndimage.gaussian_filter(rng.random((z // c + 2, y // c + 2, x // c + 2)), 1.0)
    coarse = (coarse - coarse.min()) / max(1e-12, coarse.max() - coarse.min())
    coarse = coarse**4  # bright structures on a dim background
    out = np.empty(shape, np.uint16)
    slab = 32
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        cz0 = z0 // c
        cz1 = -(-z1 // c) + 1
        f = ndimage.zoom(coarse[cz0 : cz1 + 1].astype(np.float32), c, order=1)
        off = z0 - cz0 * c
        f = f[off : off + (z1 - z0), :y, :x]
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
        return {
            "peak_total_bytes": self.peak_total,
            "samples": self.samples,
            "processes": len(procs),
            "peak_per_process_bytes": [int(v) for _, v in procs],
            "largest_process": self.names.get(procs[0][0], "?") if procs else None,
        }


def run_children(specs: list[dict], timeout: float = 3600) -> list[dict]:
    """Run child modes at once (each its own process tree: ``pipeline_common.py --child``); sample
    the memory of all of them."""
    procs = []
    for spec in specs:
        procs.append(
            subprocess.Popen(
                [sys.executable, str(BENCH / "pipeline_common.py"), "--child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
            )
        )
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
        res = json.loads(line[-1][len("RESULT ") :])
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
        per_in = sum(2 * (ci // g) * co * kk**d for ci, co, kk, g in convs)  # per low-res voxel
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
        nv = len(_variants(fs[-2] == fs[-1], st.ensemble, st.zflip))
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
        parts[f"stage{si}"] = {
            "conv_flops_per_lowres_voxel": per_in,
            "network_per_output_voxel": round(net_per_out, 1),
            "variants": nv,
            "residual_cubic_per_output_voxel": round(residual, 1),
            "ensemble_per_output_voxel": round(ens, 1),
            "bp_iters": st.bp_iters,
            "bp_per_iteration_per_output_voxel": round(bp_iter, 1),
        }
        total += (ens + bp + 2) * scale  # + normalise/clamp
    parts["total_per_output_voxel"] = round(total, 1)
    return parts


# =========================================================================== child modes


def _set_threads(n: int = 1) -> None:
    import torch

    torch.set_num_threads(n)


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
            cluster = LocalCluster(
                n_workers=spec.get("workers", 2), threads_per_worker=1, processes=True, dashboard_address=None
            )
            client = Client(cluster)
    try:
        if spec.get("scheduler") == "sync":
            import torch

            torch.set_num_threads(1)
        stats = enhance(
            spec["input"],
            spec["output"],
            model,
            workers=spec.get("workers", 2),
            block=spec.get("block"),
            progress=False,
            dtype="uint16",
            client=client,
            scheduler=spec.get("scheduler"),
            precision=spec.get("precision", "float32"),
        )
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
    keep = {
        k: stats.get(k)
        for k in (
            "seconds",
            "voxels_per_second",
            "pyramid_seconds",
            "blocks",
            "computed",
            "output_voxels",
            "halo",
            "block",
            "levels",
            "worker_env",
        )
    }
    keep.update(wall=wall, stored_bytes=out_bytes)
    return keep


def fresh(path: Path) -> str:
    if path.exists():
        shutil.rmtree(path)
    return str(path)


def machine_line(res: dict) -> str:
    m = res["machine"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {m['torch']}, dask {m['dask']}, "
        f"distributed {m['distributed']}, zarr {m['zarr']}, numcodecs {m['numcodecs']}; "
        f"load average at start {m['load_avg_at_start']}; {m['date']}; mode `{res['mode']}`, "
        f"total {res['total_seconds']:.0f} s."
    )


# =========================================================================== configurations

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
    "throughput_bps": [
        (0, (128, 384, 512), (128, 384, 256)),
        (2, (128, 384, 512), (128, 384, 256)),
        (10, (128, 384, 512), (128, 384, 256)),
    ],
    "map_overlap_bps": (0,),
    "malloc_bps": (),
    "bf16_bps": (0, 2, 10),
    "aba": (0, 2),
    "conv_seconds": 1.0,
    "profile_in": (192, 192, 192),
    "profile_bps": (0, 10),
    "lever_reps": 2,
    # volumes whose blocks are all full 256^3 (the default): 4, 32 and 256 blocks
    "memory_runs": [
        ("1x", 1, (128, 256, 256), True),
        ("8x", 8, (256, 512, 512), True),
        ("64x", 64, (512, 1024, 1024), True),
    ],
    "plan_sides": (47, 100),  # 103,823 and 10^6 blocks
    "block_sizes": {"net": (128, 192, 256, 320), "bp2": (128, 192, 256, 320), "bp10": (128, 192, 256, 320)},
    "block_seconds": 2.0,
    "iterate_max": 10**6,
    "records": 100_000,
    "overhead_runs": [
        ("8x", (128, 512, 512), "2 workers without MALLOC_TRIM_THRESHOLD_"),
        ("8x", (128, 512, 512), "in-process (scheduler='sync'), 1 thread"),
    ],
}


# =========================================================================== command line


def run_child_mode(spec: dict) -> dict:
    mod = importlib.import_module(CHILD_MODULES[spec["mode"]])
    return getattr(mod, "child_" + spec["mode"])(spec)


def parse_args(description: str, name: str, argv=None, extra=None):
    """The options every pipeline benchmark script takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smoke run (small volumes, short timings)")
    ap.add_argument(
        "--out", default=str(BENCH / "results" / f"{name}.json"), help="where the JSON goes (git ignores it)"
    )
    ap.add_argument(
        "--workdir",
        default=os.environ.get("SVB_BENCH_DIR", "/tmp/svb-pipeline-bench"),
        help="scratch space for inputs (cached) and outputs (removed after each run)",
    )
    ap.add_argument("--report", default=None, metavar="JSON", help="print the report of an earlier run's JSON and exit")
    if extra:
        extra(ap)
    return ap.parse_args(argv)


def start(args) -> tuple[dict, dict, Path, object, float]:
    """(result skeleton, configuration, work folder, log function, start time) of a run."""
    t_start = time.perf_counter()
    cfg = QUICK if args.quick else DEFAULT
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    res = {"mode": "quick" if args.quick else "default", "machine": machine(), "targets": TARGETS, "config": cfg}
    return res, cfg, workdir, log, t_start


def finish(res: dict, args, t_start: float, report) -> None:
    """Write the JSON, print the markdown report."""
    res["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    print(report(res))
    print(f"JSON in {args.out}", file=sys.stderr)


def section_main(description: str, name: str, run, report, argv=None) -> int:
    """Command line of a one-section script: ``run(cfg, workdir, log) -> dict`` is stored as
    ``res[name]``; ``report(res) -> list[str]`` prints it."""
    args = parse_args(description, f"pipeline_{name}", argv)

    def full_report(r):
        return "\n".join([machine_line(r), ""] + report(r))

    if args.report:
        with open(args.report) as fh:
            print(full_report(json.load(fh)))
        return 0
    res, cfg, workdir, log, t0 = start(args)
    res[name] = run(cfg, workdir, log)
    finish(res, args, t0, full_report)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Child process of the pipeline benchmarks (internal).")
    ap.add_argument("--child", required=True, help="JSON spec with 'mode'")
    spec = json.loads(ap.parse_args(argv).child)
    out = run_child_mode(spec)
    print("RESULT " + json.dumps(out, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
