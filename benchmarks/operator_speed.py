"""In-memory operator throughput for each ensemble size (8 / 4 / 1, what the held-aside check picks)
and each CPU precision (float32, bfloat16), default architecture, x2, no back-projection.

    python benchmarks/operator_speed.py                 # 48x128x128 -> 96x256x256, 3 repeats
    python benchmarks/operator_speed.py --quick         # 16x64x64

Prints a markdown table (output voxels/s, best of the repeats) and writes JSON to --out.
Random weights: speed does not depend on them. One process, torch threads = usable cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from svision_big.model import Model  # noqa: E402
from svision_big.operator import enhance_array  # noqa: E402
from svision_big.testing import make_model  # noqa: E402


def model(ensemble: int, precision: str) -> tuple[Model, object]:
    m = make_model((2, 2, 2), bp=0, mapping=4, seed=0, ensemble=ensemble)  # the default architecture
    return m, m.spec("cpu", precision)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "operator_speed.json"))
    a = ap.parse_args(argv)
    shape = (16, 64, 64) if a.quick else (48, 128, 128)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    rows = []
    for precision in ("float32", "bfloat16"):
        for ens in (8, 4, 1):
            _, spec = model(ens, precision)
            enhance_array(x[:8, :32, :32], spec)  # warm-up
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                enhance_array(x, spec)
                best = min(best, time.perf_counter() - t0)
            vox = int(np.prod(shape)) * 8
            rows.append(
                {
                    "precision": precision,
                    "ensemble": ens,
                    "seconds": round(best, 3),
                    "output_voxels": vox,
                    "mvox_per_s": round(vox / best / 1e6, 3),
                }
            )
            print(f"{precision} ensemble {ens}: {rows[-1]['mvox_per_s']} M output voxels/s", flush=True)
    base = {r["ensemble"]: r["mvox_per_s"] for r in rows if r["precision"] == "float32"}
    print("\n| precision | ensemble 8 | ensemble 4 | ensemble 1 |\n|---|---|---|---|")
    for p in ("float32", "bfloat16"):
        vals = {r["ensemble"]: r["mvox_per_s"] for r in rows if r["precision"] == p}
        print(f"| {p} | " + " | ".join(f"{vals[e]:.3g} M/s ({vals[e] / base[8]:.2f}x)" for e in (8, 4, 1)) + " |")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    res = {
        "benchmark": "operator_speed",
        "input_shape": list(shape),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor()
        or next((l.split(":")[1].strip() for l in flags.splitlines() if "model name" in l), "?"),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
