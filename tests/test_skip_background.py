"""``--skip-background`` (docs/sparse.md): blocks in the background are written as the cubic
upsampling of their input, without the network; every other block is bit-equal to a run
without the option, for every kind of pass; the choice is recorded, fingerprinted and resumable."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from svision_big import background as bgd
from svision_big import pipeline
from svision_big.convert import write_ome_zarr
from svision_big.harmcheck import cubic_baseline
from svision_big.ngff import NgffError, open_image
from svision_big.operator import enhance_array
from svision_big.plan import BlockPlan
from svision_big.testing import make_model

LO, HI = 100.0, 1100.0  # the models' normalisation: background ~100, objects up to ~1100


def _sparse(shape, seed=0, corner=(0.5, 0.4, 0.4)):
    """Background offset + read noise everywhere; bright speckled objects only in one corner box."""
    rng = np.random.default_rng(seed)
    v = LO + 4.0 * rng.standard_normal(shape)
    box = tuple(slice(0, max(1, int(n * c))) for n, c in zip(shape, corner))
    v[box] += 900.0 * rng.random(v[box].shape) ** 3
    return np.clip(v, 0, None).astype(np.float32)


def _dense(shape, seed=1):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 1.5)
    v = (v - v.min()) / (v.max() - v.min())
    return (LO + 300.0 + 600.0 * v + 4.0 * rng.standard_normal(shape)).astype(np.float32)


def _input(tmp_path, vol, name="in.ome.zarr"):
    path = str(tmp_path / name)
    write_ome_zarr(vol, path, axes="zyx")
    return path


def _enhance(src, out, model, **kw):
    kw = {"scheduler": "sync", "dtype": "float32", "progress": False, **kw}
    return pipeline.enhance(src, out, model, **kw)


def _level0(path):
    return np.asarray(open_image(path).level(0)[...])


def _blocks(out_shape, block):
    """The last pass's write regions (output voxels), as the plan tiles them."""
    grid = [range(0, n, b) for n, b in zip(out_shape, block)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                yield tuple(slice(a, min(a + b, n)) for a, b, n in zip((z, y, x), block, out_shape))


MODELS = {  # model, input shape, the corner that holds the objects (blocks far enough from it skip in every pass)
    "network only": (dict(factors=(2, 2, 2), bp=0), (16, 64, 64), (0.5, 0.4, 0.4)),
    "network + back-projection": (dict(factors=(2, 2, 2), bp=1), (16, 96, 96), (0.5, 0.25, 0.25)),
    "two stages + closing back-projection": (dict(factors=(2, 4, 4), bp=1, final_bp=1), (8, 64, 64), (0.5, 0.2, 0.2)),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_computed_blocks_are_bit_equal_and_skipped_blocks_hold_the_cubic_fill(tmp_path, kind):
    spec, shape, corner = MODELS[kind]
    model = make_model(**spec, mapping=1, ensemble=1, lo=LO, hi=HI, seed=3)
    vol = _sparse(shape, corner=corner)
    src = _input(tmp_path, vol)
    block = (8, 32, 32)
    ref, out = str(tmp_path / "ref.ome.zarr"), str(tmp_path / "out.ome.zarr")
    _enhance(src, ref, model, block=block)
    stats = _enhance(src, out, model, block=block, skip_background=True)
    a, b = _level0(ref), _level0(out)
    cubic = enhance_array(vol, cubic_baseline(model).spec(), dtype="float32")
    skipped = computed = 0
    for w in _blocks(a.shape, block):
        if np.array_equal(b[w], a[w]):
            computed += 1
        else:  # not the network's output: then exactly the cubic fill
            np.testing.assert_array_equal(b[w], cubic[w])
            skipped += 1
    rec = open_image(out).group.attrs["svision_big"]["skip_background"]
    assert skipped == rec["blocks_skipped"] == stats["background"] > 0
    assert computed > 0
    per_pass = rec["blocks_skipped_per_pass"]
    assert len(per_pass) == len(stats["passes"]) and (len(per_pass) == 1 or max(per_pass[:-1]) > 0)
    # a skipped block's whole cone is below the threshold on level 0 (the coarse level here)
    assert rec["coarse_level"] == 0 and rec["auto"]
    t = rec["threshold"][0]
    assert t == pytest.approx(LO + bgd.AUTO_FRACTION * (HI - LO))
    f = model.factors
    passes = open_image(out).group.attrs["svision_big"]["passes"]
    res = [1 if p["kind"] == "final" or p["stage"] == 0 else 2 for p in passes]  # each pass's source, in input voxels
    halo = [sum(-(-p["halo"][d] // r) for p, r in zip(passes, res)) for d in range(3)]
    for w in _blocks(a.shape, block):
        if not np.array_equal(b[w], a[w]):
            cone = tuple(slice(max(0, s.start // k - h), -(-s.stop // k) + h) for s, k, h in zip(w, f, halo))
            assert vol[cone].max() <= t


def test_dense_volume_skips_nothing_and_stays_bit_equal(tmp_path):
    model = make_model((2, 2, 2), bp=0, mapping=1, ensemble=1, lo=LO, hi=HI)
    src = _input(tmp_path, _dense((8, 64, 64)))
    ref, out = str(tmp_path / "ref.ome.zarr"), str(tmp_path / "out.ome.zarr")
    _enhance(src, ref, model, block=(8, 32, 32))
    stats = _enhance(src, out, model, block=(8, 32, 32), skip_background=True)
    assert stats["background"] == 0 and stats["total"]["background"] == 0
    np.testing.assert_array_equal(_level0(ref), _level0(out))


def test_coarse_level_decides_and_misses_nothing_bright(tmp_path, monkeypatch):
    """With a budget below level 0, level 1 decides: the mean underestimates the maximum, and the
    margin shrinks by the linear factor; no skipped block holds a voxel above the threshold."""
    monkeypatch.setattr(bgd, "COARSE_VOXELS", 100_000)
    model = make_model((2, 2, 2), bp=0, mapping=1, ensemble=1, lo=LO, hi=HI)
    vol = _sparse((16, 128, 128), corner=(1.0, 0.3, 0.3))
    vol[8, 100, 100] = 1000.0  # one bright voxel far from the rest: its block must not be skipped
    src = _input(tmp_path, vol)
    assert open_image(src).nlevels > 1
    out = str(tmp_path / "out.ome.zarr")
    stats = _enhance(src, out, model, block=(32, 64, 64), skip_background=True)
    rec = open_image(out).group.attrs["svision_big"]["skip_background"]
    assert rec["coarse_level"] == 1
    assert rec["coarse_threshold"][0] < rec["threshold"][0]
    assert 0 < stats["background"] < 16
    cubic = enhance_array(vol, cubic_baseline(model).spec(), dtype="float32")
    b = _level0(out)
    w = (slice(0, 32), slice(192, 256), slice(192, 256))  # the bright voxel's block: computed
    assert not np.array_equal(b[w], cubic[w])


def test_explicit_threshold_is_recorded_and_changes_the_fingerprint(tmp_path):
    model = make_model((2, 2, 2), bp=1, mapping=1, ensemble=1, lo=LO, hi=HI)
    src = _input(tmp_path, _sparse((16, 64, 64)))
    out = str(tmp_path / "out.ome.zarr")

    class Stop(Exception):
        pass

    seen = []

    def stop_part_way(i):
        seen.append(i)
        if len(seen) == 40:  # of 64: the last ones, far from the objects, are in the background
            raise Stop

    with pytest.raises(Stop):
        _enhance(src, out, model, block=(8, 32, 32), skip_background=150.0, on_block=stop_part_way)
    done = glob.glob(os.path.join(out, "svision_state", "done-*", "p*"))
    notes = [json.load(open(n)) for d in done for n in glob.glob(os.path.join(d, "*.json"))]
    marked = {(d, n[:-5]) for d in done for n in os.listdir(d) if n.endswith(".json")}
    assert notes and all(n["background"] is True for n in notes)
    assert all(os.path.exists(os.path.join(d, i)) for d, i in marked)  # note, then the record
    # another skip setting (or none) must not mix with this one's blocks
    for other in (None, True, 200.0):
        with pytest.raises(NgffError, match="other settings"):
            _enhance(src, out, model, block=(8, 32, 32), skip_background=other)
    stats = _enhance(src, out, model, block=(8, 32, 32), skip_background=150.0)  # resumes
    assert stats["skipped"] >= 39
    rec = open_image(out).group.attrs["svision_big"]["skip_background"]
    assert rec["threshold"] == [150.0] and rec["auto"] is False and rec["blocks_skipped"] == stats["background"] > 0
    clean = str(tmp_path / "clean.ome.zarr")
    _enhance(src, clean, model, block=(8, 32, 32), skip_background=150.0)
    np.testing.assert_array_equal(_level0(out), _level0(clean))
    _enhance(src, out, model, block=(8, 32, 32), overwrite=True)
    assert open_image(out).group.attrs["svision_big"]["skip_background"] == {"enabled": False}


def test_bad_threshold_is_one_line_and_exit_2(tmp_path, capsys):
    from svision_big.cli import main

    model = make_model((2, 2, 2), bp=0, mapping=1, ensemble=1, lo=LO, hi=HI)
    mpath = str(model.save(tmp_path / "m.svb"))
    src = _input(tmp_path, _sparse((8, 32, 32)))
    out = str(tmp_path / "out.ome.zarr")
    args = ["enhance", src, out, "--model", mpath, "--scheduler", "sync", "--quiet", "--skip-background"]
    r = subprocess.run(  # once as a user runs it
        [sys.executable, "-m", "svision_big.cli", *args, "abc"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a threshold" in r.stderr, r.stderr
    for bad, why in (("nan", "finite"), ("inf", "finite"), ("5000", "high percentile")):
        try:
            rc = main(args + [bad])
        except SystemExit as exc:  # argparse's errors
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, (bad, err)
        assert len(err.strip().splitlines()) == 1 and why in err, err
        assert not os.path.exists(out)
    with pytest.raises(ValueError, match="not a threshold"):
        _enhance(src, out, model, skip_background=[1, 2])
    from svision_big.cli import build_parser

    for cmd in (["enhance", src, out, "--model", mpath], ["run", src, out, "--factor", "2"]):  # run shares the flag
        assert build_parser().parse_args(cmd + ["--skip-background"]).skip_background == "auto"
        assert build_parser().parse_args(cmd + ["--skip-background", "120"]).skip_background == 120.0
        assert build_parser().parse_args(cmd).skip_background is None


def test_propagation_skips_exactly_the_blocks_no_computed_block_reads():
    """Pure planning: an earlier pass's block is skipped iff every later block reading it is."""
    from svision_big.passes import IMAGE, BackProjectionPass, NetPass

    passes = (NetPass(0, (2, 2), (IMAGE,)), BackProjectionPass(0, (2, 2), (IMAGE, "p0")))
    plans = [BlockPlan((64, 64), (2, 2), (32, 32), (3, 3)), BlockPlan((64, 64), (2, 2), (32, 32), (2, 2))]
    last = np.ones(plans[1].shape, bool)
    last[0, 0] = False  # one computed block in the corner
    net = bgd.propagate(passes, plans, last)[0]
    # it reads its own net block and a 4-voxel strip of the right and lower neighbours
    assert [tuple(i) for i in np.argwhere(~net)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
