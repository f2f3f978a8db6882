"""Grouped against densified convolutions in the default SR network (``SVNet.densified``): the
same arithmetic, block-diagonal dense weights instead of grouped ones. Tells whether the dense
copy the operator runs is still the faster one on this CPU.

    python benchmarks/grouped_vs_dense.py            # 32x96x96 input block, 5 repeats
    python benchmarks/grouped_vs_dense.py --quick    # 16x48x48

Prints a markdown table (seconds per forward, best of the repeats) and writes JSON to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from svision_big.network import NetConfig, SVNet  # noqa: E402


def best_time(net: SVNet, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        net(x)  # warm-up: kernel selection, allocation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grouped_vs_dense.json"))
    args = ap.parse_args(argv)
    shape = (16, 48, 48) if args.quick else (32, 96, 96)
    torch.manual_seed(0)
    net = SVNet(NetConfig((2, 2, 2))).eval()
    dense = net.densified().eval()
    x = torch.rand((1, 1, *shape))
    with torch.inference_mode():
        diff = float((net(x) - dense(x)).abs().max())
    t_grouped = best_time(net, x, args.repeats)
    t_dense = best_time(dense, x, args.repeats)
    row = {
        "input": list(shape),
        "threads": torch.get_num_threads(),
        "grouped_s": round(t_grouped, 4),
        "dense_s": round(t_dense, 4),
        "speedup": round(t_grouped / t_dense, 3),
        "max_abs_difference": diff,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print("| input | threads | grouped (s) | dense (s) | dense speed-up | max difference |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {'x'.join(map(str, shape))} | {row['threads']} | {t_grouped:.4f} | {t_dense:.4f} | "
        f"{row['speedup']:.2f}x | {diff:.1e} |"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
