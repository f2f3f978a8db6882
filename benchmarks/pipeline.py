"""Pipeline performance benchmark: every section in one run, one JSON, one report.

The sections are separate scripts (each runnable alone, with the same options):

1. ``pipeline_throughput.py``: ``enhance`` end to end against the in-memory operator,
   ``dask.array.map_overlap`` + ``to_zarr`` and the physical limit (FLOP count over the conv rate);
2. ``pipeline_memory.py``: peak RSS of the whole process tree for volumes 1x, 8x, 64x;
3. ``pipeline_planning.py``: time and client memory to plan 10^5 and 10^6 blocks;
4. ``pipeline_blocks.py``: each pass against block size, and halo overhead per pass;
- ``pipeline_profile.py``: one block phase by phase, and levers (not in the default run).

Shared parts (machine, models, inputs, child processes, configurations) are in
``pipeline_common.py``. Everything compared is measured in the same run, side by side, and
reported as a ratio, because the machine is shared and noisy.

    python benchmarks/pipeline.py                 # default (about 25 min on 2 cores)
    python benchmarks/pipeline.py --quick         # smoke run (about 2 min)
    python benchmarks/pipeline.py --only memory,halo
    python benchmarks/pipeline.py --report benchmarks/results/pipeline.json
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_blocks import report_blocks, report_halo, run_blocks  # noqa: E402
from pipeline_common import finish, machine_line, parse_args, start  # noqa: E402
from pipeline_memory import add_flatness, report_memory, section_memory  # noqa: E402
from pipeline_planning import report_planning, section_planning  # noqa: E402
from pipeline_profile import report_profile, section_profile  # noqa: E402
from pipeline_throughput import report_throughput, section_throughput  # noqa: E402

SECTIONS = ("throughput", "profile", "memory", "planning", "blocks", "halo")
DEFAULT_RUN = {"throughput", "memory", "planning", "blocks", "halo"}  # profile: --only profile


def report(res: dict) -> str:
    lines = [machine_line(res), ""]
    for name, rep in (
        ("throughput", report_throughput),
        ("profile", report_profile),
        ("memory", report_memory),
        ("planning", report_planning),
        ("blocks", report_blocks),
        ("halo", report_halo),
    ):
        if name in res:
            lines += rep(res)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(
        __doc__.split("\n")[0],
        "pipeline",
        argv,
        extra=lambda ap: ap.add_argument("--only", default=None, help="comma list of sections: " + ",".join(SECTIONS)),
    )
    if args.report:
        with open(args.report) as fh:
            print(report(json.load(fh)))
        return 0
    only = set(args.only.split(",")) if args.only else DEFAULT_RUN
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    res, cfg, workdir, log, t0 = start(args)
    if "throughput" in only:
        res["throughput"] = section_throughput(cfg, workdir, log)
    if "profile" in only:
        res["profile"] = section_profile(cfg, workdir, log)
    if "memory" in only:
        res["memory"] = add_flatness(section_memory(cfg, workdir, log), res.get("throughput"))
    if "planning" in only:
        res["planning"] = section_planning(cfg, workdir, log)
    res.update(run_blocks(cfg, workdir, log, tuple(s for s in ("blocks", "halo") if s in only)))
    finish(res, args, t0, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
