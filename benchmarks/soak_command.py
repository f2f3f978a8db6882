"""Soak the whole command: `svision-big enhance` stopped the way cluster jobs and disks stop it, then
run again, until it completes; the result is compared with a clean run, level by level.

* ``--mode term``: SIGTERM (what SLURM, Kubernetes and dask-jobqueue send) every LO..HI seconds.
  Each stop must exit 143 with one line on stderr and leave no lock; the next run resumes.
* ``--mode disk``: the output lives on a small tmpfs (root only: it is mounted here) that another
  process fills while the command runs and frees after it stopped. Each stop must be one line and
  exit 2; the next run, with space again, resumes.

    python benchmarks/soak_command.py --mode term      # about 1-2 min on 2 cores
    sudo python benchmarks/soak_command.py --mode disk

Not part of the test suite. Writes JSON to ``--out`` (default ``benchmarks/results/soak_<mode>.json``)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from soak import random_model, volume  # noqa: E402
from svision_big import pipeline  # noqa: E402
from svision_big.convert import write_ome_zarr  # noqa: E402
from svision_big.ngff import open_image  # noqa: E402

MAX_ROUNDS = 40


def _command(src: str, out: str, model: str, block: str) -> list[str]:
    cli = [sys.executable, "-m", "svision_big.cli"]
    return [*cli, "enhance", src, out, "--model", model, "--block", block, "--force", "--quiet", "--workers", "2"]


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full."""
    chunk = b"\0" * (1 << 20)
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(chunk)
                fh.flush()
    except OSError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["term", "disk"], default="term")
    ap.add_argument("--shape", default="32,128,128", help="input Z,Y,X (x2 output)")
    ap.add_argument("--block", default="16,64,64", help="output block Z,Y,X")
    ap.add_argument("--every", default="2,5", help="seconds into each run before the stop: uniform in LO,HI")
    ap.add_argument("--tmpfs-mb", type=int, default=96, help="--mode disk: size of the output's filesystem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    lo, hi = (float(v) for v in a.every.split(","))
    rng = random.Random(a.seed)
    out_json = a.out or str(HERE / "results" / f"soak_{a.mode}.json")

    work = Path(tempfile.mkdtemp(prefix="svb-soak-cmd-"))
    src = str(work / "in.ome.zarr")
    write_ome_zarr(volume(shape, a.seed), src, voxel_size=(2.0, 0.5, 0.5))
    model = str(random_model().save(work / "m.svb"))
    block = tuple(int(v) for v in a.block.split(","))
    clean = str(work / "clean.ome.zarr")
    t0 = time.perf_counter()
    pipeline.enhance(src, clean, model, scheduler="sync", block=block, progress=False, force=True)
    clean_s = time.perf_counter() - t0

    mount = None
    if a.mode == "disk":
        if os.geteuid() != 0:
            print("soak_command: --mode disk mounts a tmpfs and needs root; skipped", file=sys.stderr)
            return 2
        mount = work / "small"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.tmpfs_mb}m", "tmpfs", str(mount)], check=True)
    out = str((mount or work) / "soak.ome.zarr")
    filler = (mount or work) / "filler.bin"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    rounds: list[dict] = []
    t1 = time.perf_counter()
    try:
        for _ in range(MAX_ROUNDS):
            p = subprocess.Popen(_command(src, out, model, a.block), env=env, stderr=subprocess.PIPE, text=True)
            wait = rng.uniform(lo, hi)
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if a.mode == "term":
                    p.send_signal(signal.SIGTERM)
                else:
                    _fill(filler)  # the disk fills under the running command
            err = p.communicate(timeout=300)[1].strip().splitlines()
            lock = os.path.exists(os.path.join(out, "svision_state", "lock"))
            rounds.append({"after_s": round(wait, 2), "rc": p.returncode, "stderr": err, "lock_left": lock})
            if filler.exists():
                filler.unlink()  # space again for the next run
            if p.returncode == 0:
                break
        soak_s = time.perf_counter() - t1
        a_img, b_img = open_image(clean), open_image(out)
        identical = [bool(np.array_equal(a_img.read(i), b_img.read(i))) for i in range(a_img.nlevels)]
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], check=False)

    # a SIGTERM during start-up (importing torch, before the command installs its handler) ends the
    # process by the signal's default: nothing is written yet, so it is counted apart
    early = [r for r in rounds if r["rc"] == -signal.SIGTERM]
    stops = [r for r in rounds if r["rc"] not in (0, -signal.SIGTERM)]
    expected_rc = 143 if a.mode == "term" else 2
    res = {
        "mode": a.mode,
        "shape": list(shape),
        "block": list(block),
        "every_s": [lo, hi],
        "rounds": rounds,
        "stops": len(stops),
        "stopped_during_startup": len(early),
        "locks_left_by_startup_stops": sum(r["lock_left"] for r in early),
        "stops_with_expected_exit": sum(r["rc"] == expected_rc for r in stops),
        "stops_with_one_line": sum(len(r["stderr"]) == 1 for r in stops),
        "locks_left": sum(r["lock_left"] for r in stops),
        "completed": bool(rounds) and rounds[-1]["rc"] == 0,
        "clean_seconds": round(clean_s, 1),
        "soak_seconds": round(soak_s, 1),
        "levels_identical": identical,
        "work_dir": str(work),
    }
    rows = [
        ("stops", len(stops)),
        (f"  exit {expected_rc}", res["stops_with_expected_exit"]),
        ("  one line on stderr", res["stops_with_one_line"]),
        ("  lock left behind", res["locks_left"]),
        ("stopped during start-up (nothing written)", len(early)),
        ("completed", res["completed"]),
        ("clean run (sync), s", res["clean_seconds"]),
        ("soak, s", res["soak_seconds"]),
        ("levels identical to clean", identical),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}} | value\n{'-' * width}-|------")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    for r in stops[:3]:
        print(f"  e.g. exit {r['rc']}: {r['stderr'][-1] if r['stderr'] else '(nothing)'}")
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    with open(out_json, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {out_json}")
    ok = res["completed"] and all(identical) and res["stops_with_one_line"] == len(stops)
    ok = ok and not res["locks_left"] and not res["locks_left_by_startup_stops"]
    return 0 if ok and res["stops_with_expected_exit"] == len(stops) else 1


if __name__ == "__main__":
    sys.exit(main())
