"""The README's measured figures, made from the benchmarks' JSON (issue 28.7).

Every number README.md states about quality and the demo is written here from the JSON a benchmark
left in ``benchmarks/results/``, with the command that made it, so a figure cannot drift from its
measurement: ``tests/test_docs.py::test_readme_states_the_figures_of_the_benchmark_json`` fails when
README.md no longer says what the JSON says.

    python benchmarks/readme_figures.py            # each figure, its JSON and its command
    python benchmarks/readme_figures.py --check    # exit 1 naming every figure README.md does not state
    python benchmarks/readme_figures.py --demo     # run the README's demo, keep its numbers in results/demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"


@dataclass(frozen=True)
class Figure:
    text: str  # as README.md states it
    source: str  # the JSON it comes from
    command: str  # what made that JSON


def demo_figures(result: dict, source: str = "results/demo.json") -> list[Figure]:
    """The demo's PSNR, SSIM and time, as the README's first paragraph states them."""
    cmd = result.get("command", "svision-big demo DIR")
    return [
        Figure(
            f"{result['psnr_enhanced']:.2f} dB against {result['psnr_cubic']:.2f} (Keys) and "
            f"{result['psnr_bspline']:.2f} (B-spline)",
            source,
            cmd,
        ),
        Figure(
            f"SSIM {result['ssim_enhanced']:.4f} against {result['ssim_cubic']:.4f} and {result['ssim_bspline']:.4f}",
            source,
            cmd,
        ),
        Figure(f"in {result['seconds']:.0f} s", source, cmd),
    ]


def quality_figures(result: dict, source: str = "results/quality.json") -> list[Figure]:
    """The quality matrix's summary, as README's 'What to expect' paragraph states it."""
    rows = [r for r in result["rows"] if "gain_db" in r]
    gains = [r["gain_db"] for r in rows]
    real = [r["gain_db"] for r in rows if r["case"].startswith("real-")]
    floor = result["summary"]["floor"]
    worst = min(gains)
    cmd = " ".join(["python", *result["command"][1:]]).split(" --out")[0]
    texts = [
        f"{len(rows)}-case matrix ({len(rows) - len(real)} synthetic, {len(real)} on two real volumes)",
        f"{floor['met']}/{floor['of']} cases within 0.05 dB of it or above",
        f"mean {sum(gains) / len(gains):+.2f} dB",
        f"{worst:+.2f}".replace("-", "") + " dB below",
        f"the real volumes average {sum(real) / len(real):+.2f} dB",
        f"{sum(bool(r['met']) for r in rows)}/{len(rows)} meet every target",
        f"+{max(gains):.1f} dB on clean blurred data",
        f"agrees in sign with the truth's gain on {_same_sign(rows)} of {len(rows)} cases",
    ]
    return [Figure(t, source, cmd) for t in texts]


def lateral_figures(result: dict, source: str = "results/quality_anisotropic_lateral.json") -> list[Figure]:
    """The lateral stage on the anisotropic group, as the README's z-stack paragraph states it (the 3D
    stage's figures beside them come from ``quality_anisotropic.json``)."""
    gains = [r["gain_db"] for r in result["rows"] if "gain_db" in r]
    cmd = " ".join(["python", *result["command"][1:]]).split(" --out")[0]
    texts = [f"it gains {sum(gains) / len(gains):+.2f} dB on average", f"each case at least {min(gains):+.2f}"]
    return [Figure(t, source, cmd) for t in texts]


def anisotropic_figures(result: dict, source: str = "results/quality_anisotropic.json") -> list[Figure]:
    gains = [r["gain_db"] for r in result["rows"] if "gain_db" in r]
    below = sum(g < -0.05 for g in gains)
    cmd = " ".join(["python", *result["command"][1:]]).split(" --out")[0]
    words = {1: "one case", 2: "two cases", 3: "three cases"}.get(below, f"{below} cases")
    return [Figure(f"the default 3D stage gains {sum(gains) / len(gains):+.2f} with {words} below", source, cmd)]


def _same_sign(rows: list[dict]) -> int:
    """Rows where compare's self-consistency gain and the truth's agree in sign (0.05 dB or less is 0),
    as ``quality.tracking`` counts them."""

    def sign(g: float) -> int:
        return 0 if abs(g) <= 0.05 else (1 if g > 0 else -1)

    return sum(sign(r["self_consistency"]["gain_db"]) == sign(r["gain_db"]) for r in rows if "self_consistency" in r)


def figures(results: Path = RESULTS) -> list[Figure]:
    out = []
    for name, make in (
        ("demo.json", demo_figures),
        ("quality.json", quality_figures),
        ("quality_anisotropic_lateral.json", lateral_figures),
        ("quality_anisotropic.json", anisotropic_figures),
    ):
        path = results / name
        if path.exists():
            out += make(json.loads(path.read_text()), f"benchmarks/results/{name}")
    return out


def missing(readme: Path = README, results: Path = RESULTS) -> list[Figure]:
    """The figures README.md does not state word for word (line breaks read as spaces)."""
    text = " ".join(readme.read_text().split())
    return [f for f in figures(results) if f.text not in text]


def _machine() -> str:
    """CPU model and usable cores, as the other benchmarks describe the machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def run_demo(results: Path = RESULTS) -> dict:
    """The README's demo command, timed by the demo itself; its numbers kept with the command and machine."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).parent / "svision-big"), "demo", f"{tmp}/demo"]
        subprocess.run(cmd, check=True)
        result = json.loads(Path(f"{tmp}/demo/demo_result.json").read_text())
    result = {k: v for k, v in result.items() if k not in ("input", "output")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    result.update(command="svision-big demo DIR", machine=_machine(), commit=commit.strip())
    (results / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md does not state every figure")
    p.add_argument("--demo", action="store_true", help="run the demo first and keep its numbers")
    args = p.parse_args(argv)
    if args.demo:
        run_demo()
    gone = missing()
    for f in figures():
        print(f"{'MISSING ' if f in gone else ''}{f.text!r}  <- {f.source} ({f.command})")
    return 1 if args.check and gone else 0


if __name__ == "__main__":
    sys.exit(main())
