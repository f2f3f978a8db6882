"""The pyramid at scale: what building one level costs the client and scheduler, and the pyramid
against level 0 in the usual 50 M-output-voxel command.

    python benchmarks/pyramid_scale.py                       # this tree only
    python benchmarks/pyramid_scale.py --baseline 76f7a6f    # and the code of that commit, for comparison

1. **Scale** (one child process per measurement): a LocalCluster of 2 single-threaded workers;
   level 0 a virtual uint16 array (nothing written: zarr reads the chunks as the fill value) sized
   so that level 1 has 10^4 or 10^6 write units of 8^3 voxels. Measured: seconds from the call to
   the first finished pyramid task (a scheduler plugin sees the transition), the peak RSS growth of
   the client process (the LocalCluster's scheduler runs in it) and the most tasks the scheduler
   held, over the first ``--run-seconds`` seconds after that first task; then the child is
   stopped (the level is not computed in full). A run still without a task after ``--limit``
   seconds is reported as such.
2. **Bit-identity** (with ``--baseline``): the baseline's ``build_pyramid`` and this tree's on 9
   layouts (odd sizes, anisotropic and x3 factors, sharded or not, integer, float and bool dtypes,
   NGFF 0.4 and 0.5, t and c axes), mean and max, in this process and on a Dask client: every
   level's values and layout must be equal.
3. **50 M output voxels**: ``svision-big enhance`` at its defaults (96x256x256 -> x2, random-weight
   default model, as ``benchmarks/whole_command.py``), level 0 seconds and pyramid seconds from its
   summary line.

Prints a markdown table, writes JSON (``benchmarks/results/pyramid_scale.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
UNIT = 8  # level-1 write unit (chunk) edge: tiny, so that a large level needs little virtual space
GRIDS = {"1e4": (10, 32, 32), "1e6": (100, 100, 100)}  # level-1 unit grids: 10,240 and 1,000,000 units


# --------------------------------------------------------------------------- 1. scale (child side)


def child_scale(grid: tuple[int, ...], run_seconds: float, limit: float) -> dict:
    """Start building level 1 of a virtual level 0 on a LocalCluster; report, then stop."""
    import psutil
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    from svision_big import pyramid
    from svision_big.ngff import format_for, open_output_group

    class FirstTask(SchedulerPlugin):
        def __init__(self):
            self.first: float | None = None
            self.finished = 0  # write units: the tasks that store one (old: "store-map-..." keys)

        def transition(self, key, start, finish, *args, **kwargs):
            name = str(key[0] if isinstance(key, tuple) else key)
            if finish == "memory" and name.startswith(("svb-pyramid", "store")):
                self.finished += 1
                if self.first is None:
                    self.first = time.time()

    work = Path(tempfile.mkdtemp(prefix="svb-pyramid-scale-"))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    plugin = FirstTask()
    cluster.scheduler.add_plugin(plugin)
    fmt = format_for("0.5")
    out = str(work / "virtual.ome.zarr")
    group = open_output_group(out, fmt, mode="w-")
    shape0 = tuple(2 * g * UNIT for g in grid)
    fmt.create_array(group, "0", shape0, (2 * UNIT,) * 3, "uint16", list("zyx"))  # no chunk written
    me = psutil.Process()
    base = me.memory_info().rss
    peak = {"rss": base, "tasks": 0}
    halt = threading.Event()

    def sample() -> None:
        while not halt.is_set():
            peak["rss"] = max(peak["rss"], me.memory_info().rss)
            peak["tasks"] = max(peak["tasks"], len(cluster.scheduler.tasks))
            halt.wait(0.05)

    threading.Thread(target=sample, daemon=True).start()
    kwargs = {}
    if hasattr(pyramid, "build_levels"):  # this tree: windowed tasks with done-records
        kwargs = dict(url=out, done_url=lambda level: f"{work}/done/l{level}")
    t0 = time.time()
    args = (group, fmt, list("zyx"), "0", [0, 1, 2], [(2, 2, 2)], (UNIT,) * 3, "uint16")
    threading.Thread(target=lambda: pyramid.build_pyramid(*args, client=client, **kwargs), daemon=True).start()
    while plugin.first is None and time.time() - t0 < limit:
        time.sleep(0.01)
    first = None if plugin.first is None else plugin.first - t0
    end = time.time() + (run_seconds if first is not None else 0)
    while time.time() < end:
        time.sleep(0.05)
    finished = plugin.finished
    halt.set()
    res = {
        "units": int(grid[0] * grid[1] * grid[2]),
        "first_task_s": None if first is None else round(first, 3),
        "waited_s": round(time.time() - t0, 1),
        "rss_growth_mb": round((peak["rss"] - base) / 2**20, 1),
        "max_scheduler_tasks": peak["tasks"],
        "units_finished": finished,
        "units_per_s": round(finished / max(1e-9, time.time() - plugin.first), 1) if plugin.first else 0.0,
    }
    shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- 2. bit-identity

IDENTITY_CASES = [  # shape, spatial axes, chunks, shards, dtype, NGFF version, factors (None: pyramid_factors)
    ((23, 77, 51), [0, 1, 2], (8, 16, 16), None, "uint16", "0.4", None),
    ((23, 77, 51), [0, 1, 2], (8, 16, 16), (16, 32, 32), "uint16", "0.5", None),
    ((1, 23, 77, 51), [1, 2, 3], (1, 8, 16, 16), None, "float32", "0.5", [(2, 2, 2), (1, 2, 2)]),
    ((2, 3, 19, 70, 66), [2, 3, 4], (1, 1, 8, 16, 16), None, "float32", "0.4", [(1, 2, 2), (2, 2, 2), (1, 2, 1)]),
    ((2, 3, 19, 70, 66), [2, 3, 4], (1, 1, 4, 16, 16), (1, 1, 8, 32, 32), "int16", "0.5", None),
    ((40, 130, 97), [0, 1, 2], (8, 32, 32), (16, 64, 64), "uint8", "0.5", [(1, 2, 2), (2, 4, 4)]),
    ((33, 65, 65), [0, 1, 2], (8, 16, 16), None, "float64", "0.5", None),
    ((33, 65, 65), [0, 1, 2], (8, 16, 16), None, "bool", "0.5", None),
    ((21, 64, 64), [0, 1, 2], (8, 16, 16), None, "int32", "0.4", [(3, 3, 3)]),
]


def _identity_data(shape, dtype: str, rng):
    import numpy as np

    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) > 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dt)
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-20, 20, shape)).astype(dt)  # wide exponents


def identity(baseline_tree: str, work: Path) -> list[dict]:
    """Old and new ``build_pyramid`` on the same level 0: equal levels? (in process, then on a client)."""
    import importlib.util

    import numpy as np
    from distributed import Client

    from svision_big import pyramid as new
    from svision_big.ngff import format_for, open_output_group

    spec = importlib.util.spec_from_file_location(
        "svision_big._baseline_pyramid", f"{baseline_tree}/svision_big/pyramid.py"
    )
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # its relative imports resolve to this tree's ngff, plan and values
    spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    rows = []
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        for k, (shape, spatial, chunks, shards, dtype, version, factors) in enumerate(IDENTITY_CASES):
            fmt = format_for(version)
            names = list("tczyx")[-len(shape) :]
            data = _identity_data(shape, dtype, rng)
            factors = factors or new.pyramid_factors(shape, spatial, min_shape=8)
            for method in ("mean", "max"):
                for where in ("in process", "client"):
                    d = Path(tempfile.mkdtemp(dir=work))
                    groups = []
                    for name in ("old", "new"):
                        g = open_output_group(str(d / name), fmt, mode="w-")
                        fmt.create_array(g, "0", shape, chunks, data.dtype, names, shards=shards)[...] = data
                        groups.append(g)
                    cl = client if where == "client" else None
                    args = (fmt, names, "0", spatial, factors, chunks, dtype)
                    paths = old.build_pyramid(groups[0], *args, method=method, shards=shards, client=cl)
                    extra = dict(url=str(d / "new"), done_url=lambda level, d=d: f"{d}/done/l{level}")
                    same = paths == new.build_pyramid(
                        groups[1], *args, method=method, shards=shards, client=cl, **extra
                    )
                    for p in paths:
                        a, b = groups[0][p], groups[1][p]
                        same &= (a.shape, a.chunks, a.shards, a.dtype) == (b.shape, b.chunks, b.shards, b.dtype)
                        same &= a[...].tobytes() == b[...].tobytes()
                    rows.append(
                        {
                            "case": k,
                            "shape": list(shape),
                            "dtype": dtype,
                            "ngff": version,
                            "sharded": bool(shards),
                            "method": method,
                            "where": where,
                            "levels": len(paths),
                            "identical": bool(same),
                        }
                    )
                    shutil.rmtree(d)
    return rows


# --------------------------------------------------------------------------- parent side


def _code(baseline: str | None, tmp: Path) -> dict[str, str]:
    """name -> PYTHONPATH of each tree measured: this one, and the baseline commit's svision_big."""
    trees = {"new": str(REPO)}
    if baseline:
        dest = tmp / f"svision_big-{baseline}"
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", baseline, "svision_big"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        trees["old"] = str(dest)
    return trees


def _env(path: str) -> dict:
    return dict(os.environ, PYTHONPATH=path, OMP_WAIT_POLICY="PASSIVE")


def run_scale(path: str, grid: tuple[int, ...], run_seconds: float, limit: float, cap_gb: float) -> dict:
    """One child (its own session, stopped as a whole once it reported, or once its process tree
    holds more than ``cap_gb``)."""
    import psutil

    cmd = [sys.executable, __file__, "--child", ",".join(map(str, grid)), str(run_seconds), str(limit)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=_env(path), stdout=subprocess.PIPE, text=True, start_new_session=True)
    tree = {"peak": 0, "capped": None}

    def watch() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                rss = 0
            tree["peak"] = max(tree["peak"], rss)
            if rss > cap_gb * 2**30 and tree["capped"] is None:
                tree["capped"] = round(time.time() - t0, 1)
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        line = proc.stdout.readline()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    res = {"units": grid[0] * grid[1] * grid[2]}
    if tree["capped"] is not None:
        res["error"] = f"stopped at {cap_gb:g} GB after {tree['capped']} s, before a first task"
    elif not line:
        res["error"] = f"child exited {proc.returncode} without a result"
    else:
        res = json.loads(line)
    res["peak_tree_gb"] = round(tree["peak"] / 2**30, 2)
    return res


def run_command(path: str, inp: str, out: Path, model: str) -> dict:
    """``svision-big enhance`` at its defaults: level 0 and pyramid seconds from its summary line."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "svision_big.cli", "enhance", inp, str(out), "--model", model, "--progress", "json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(path), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"enhance exited {r.returncode}: {r.stderr[-2000:]}")
    m = re.search(r"([\d.]+) s \+ pyramid ([\d.]+) s", r.stdout)
    levels = re.search(r"levels (\[[^\]]*\])", r.stdout)
    shutil.rmtree(out, ignore_errors=True)
    level0, pyr = float(m.group(1)), float(m.group(2))
    return {
        "command_s": round(wall, 2),
        "level0_s": level0,
        "pyramid_s": pyr,
        "pyramid_over_level0": round(pyr / level0, 4),
        "levels": levels.group(1) if levels else None,
    }


def print_tables(record: dict) -> None:
    """The markdown tables of a result record (``--tables FILE`` prints them again)."""
    if record["scale"]:
        print(
            "\n| code | level-1 units | first pyramid task (s) | client+scheduler RSS growth (MB) | "
            "most tasks in the scheduler | units/s after the first | peak RSS, process tree (GB) |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in record["scale"]:
            if r.get("error"):
                first = r["error"]
            elif r.get("first_task_s") is None:
                first = f"none after {r.get('waited_s')} s"
            else:
                first = f"{r['first_task_s']:.2f}"
            print(
                f"| {r.get('code')} | {r['units']:,} | {first} | {r.get('rss_growth_mb', '-')} | "
                f"{r.get('max_scheduler_tasks', '-')} | {r.get('units_per_s', '-')} | {r['peak_tree_gb']} |"
            )
    if record.get("identity"):
        same = record["identity"]
        print(f"\nbit-identity with the baseline: {sum(r['identical'] for r in same)} of {len(same)} pyramids")
    if record["command"]:
        print("\n| code | run | level 0 (s) | pyramid (s) | pyramid / level 0 | levels |")
        print("|---|---|---|---|---|---|")
        for r in record["command"]:
            print(
                f"| {r['code']} | {r['repeat'] + 1} | {r['level0_s']:.1f} | {r['pyramid_s']:.2f} | "
                f"{r['pyramid_over_level0']:.1%} | {r['levels']} |"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="also measure the svision_big of this commit (e.g. 76f7a6f)")
    ap.add_argument("--run-seconds", type=float, default=10.0, help="how long the window runs after the first task")
    ap.add_argument("--limit", type=float, default=300.0, help="give up waiting for a first task after this long")
    ap.add_argument("--memory-cap-gb", type=float, default=6.0, help="stop a child whose process tree holds more")
    ap.add_argument("--repeats", type=int, default=2, help="50 M command runs per tree (alternating)")
    ap.add_argument("--skip-command", action="store_true", help="leave the 50 M command out")
    ap.add_argument("--skip-scale", action="store_true", help="leave the scale section out")
    ap.add_argument("--workdir", default=str(BENCH / ".cache" / "pyramid_scale"))
    ap.add_argument("--out", default=str(BENCH / "results" / "pyramid_scale.json"))
    ap.add_argument("--tables", metavar="FILE", help="print the tables of an earlier result file and stop")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tables:
        print_tables(json.loads(Path(args.tables).read_text()))
        return 0
    if args.child:
        grid = tuple(int(g) for g in args.child[0].split(","))
        print(json.dumps(child_scale(grid, float(args.child[1]), float(args.child[2]))), flush=True)
        return 0

    sys.path.insert(0, str(BENCH))
    from pipeline_common import build_model, machine, make_input

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    trees = _code(args.baseline, work)
    scale = []
    for size, grid in {} if args.skip_scale else GRIDS.items():
        for name, path in trees.items():
            res = run_scale(path, grid, args.run_seconds, args.limit, args.memory_cap_gb)
            res.update(code=name, size=size)
            print(json.dumps(res), flush=True)
            scale.append(res)
    same = []
    if "old" in trees:
        same = identity(trees["old"], work)
        print(f"bit-identity: {sum(r['identical'] for r in same)} of {len(same)} pyramids identical", flush=True)
    command = []
    if not args.skip_command:
        model = build_model(bp=0).save(work / "model.svb")
        inp, _ = make_input(work, (96, 256, 256))
        for rep in range(args.repeats):
            for name, path in trees.items():
                res = run_command(path, inp, work / f"out_{name}.ome.zarr", str(model))
                res.update(code=name, repeat=rep)
                print(json.dumps(res), flush=True)
                command.append(res)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine(),
        "unit": UNIT,
        "run_seconds": args.run_seconds,
        "baseline": args.baseline,
        "scale": scale,
        "identity": same,
        "command": command,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print_tables(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
