"""The README's measured figures against the benchmarks' JSON they come from (issue 28.7)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _figures_module():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_readme_states_the_figures_of_the_benchmark_json():
    mod = _figures_module()
    figs = mod.figures()
    names = ("demo", "quality", "quality_anisotropic", "quality_anisotropic_lateral")
    assert {f.source for f in figs} == {f"benchmarks/results/{n}.json" for n in names}
    gone = mod.missing()
    assert not gone, "README.md does not state: " + "; ".join(f"{f.text!r} ({f.source})" for f in gone)


def test_a_figure_that_drifts_from_its_json_is_named(tmp_path):
    mod = _figures_module()
    results = tmp_path / "results"
    results.mkdir()
    demo = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    demo["psnr_enhanced"] = round(demo["psnr_enhanced"] + 1.0, 2)  # a new run measured 1 dB more
    (results / "demo.json").write_text(json.dumps(demo))
    gone = mod.missing(ROOT / "README.md", results)
    assert [f.text.split(" dB")[0] for f in gone] == [f"{demo['psnr_enhanced']:.2f}"]
