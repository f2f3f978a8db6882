"""The pyramid as tasks: levels equal a plain numpy reduction, one task per write unit, and a
pyramid killed part-way resumes (done-records per level and unit) to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from conftest import smooth_volume
from svision_big import pipeline, progress, pyramid
from svision_big.convert import write_ome_zarr
from svision_big.ngff import foreign_file, format_for, open_image, open_output_group
from svision_big.pyramid import LevelJob, build_levels, pyramid_factors
from svision_big.state import DoneRecords, _our_file
from svision_big.testing import make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- the reference


def _reference(level0: np.ndarray, factors: list[tuple[int, ...]], method: str) -> list[np.ndarray]:
    """Each level from the previous one by a reshape-mean (float64, then round and clip for
    integers; a mask's mean at >= 1/2) or a reshape-max, excess voxels dropped."""
    out, prev = [], level0
    for f in factors:
        keep = tuple(slice(0, n - n % fi) for n, fi in zip(prev.shape, f))
        cut = prev[keep]
        cells = cut.reshape([x for n, fi in zip(cut.shape, f) for x in (n // fi, fi)])
        axes = tuple(range(1, 2 * cut.ndim, 2))
        if method == "max":
            lvl = cells.max(axis=axes)
        elif prev.dtype == np.bool_:
            lvl = cells.mean(axis=axes, dtype=np.float64) >= 0.5
        elif np.issubdtype(prev.dtype, np.integer):
            info = np.iinfo(prev.dtype)
            lvl = np.clip(np.rint(cells.mean(axis=axes, dtype=np.float64)), info.min, info.max).astype(prev.dtype)
        else:
            lvl = cells.mean(axis=axes, dtype=np.float64).astype(prev.dtype)
        out.append(lvl)
        prev = lvl
    return out


def _data(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def _level0(path, data, version="0.5", chunks=(8, 16, 16), shards=None, names=None):
    fmt = format_for(version)
    group = open_output_group(str(path), fmt, mode="w-")
    names = names or list("tczyx"[-data.ndim :])
    fmt.create_array(group, "0", data.shape, chunks, data.dtype, names, shards=shards)[...] = data
    return group, fmt, names


def _build(group, fmt, names, spatial, factors, chunks, dtype, done=None, **kw):
    return build_levels(
        group,
        fmt,
        names,
        "0",
        spatial,
        factors,
        chunks,
        dtype,
        done_url=None if done is None else (lambda level: f"{done}/l{level}"),
        **kw,
    )


CASES = [  # shape, spatial axes, chunks, shards, dtype, version, factors (None: pyramid_factors)
    ((23, 77, 51), [0, 1, 2], (8, 16, 16), None, np.uint16, "0.4", None),
    ((23, 77, 51), [0, 1, 2], (8, 16, 16), (16, 32, 32), np.int16, "0.5", None),
    ((2, 2, 19, 70, 66), [2, 3, 4], (1, 1, 4, 16, 16), (1, 1, 8, 32, 32), np.float32, "0.5", [(1, 2, 2), (2, 2, 2)]),
    ((3, 21, 40, 37), [1, 2, 3], (1, 8, 16, 16), None, np.float64, "0.4", [(3, 2, 4)]),
    ((33, 65, 65), [0, 1, 2], (8, 16, 16), None, np.bool_, "0.5", None),
]


@pytest.mark.parametrize("method", ["mean", "max"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i][:1] + CASES[i][4:6])))
def test_levels_equal_the_numpy_reference(tmp_path, case, method):
    shape, spatial, chunks, shards, dtype, version, factors = CASES[case]
    data = _data(shape, dtype, seed=case)
    factors = factors or pyramid_factors(shape, spatial, min_shape=8)
    group, fmt, names = _level0(tmp_path / "p.zarr", data, version, chunks, shards)
    built = _build(
        group, fmt, names, spatial, factors, chunks, dtype, done=tmp_path / "done", method=method, shards=shards
    )
    assert [q["path"] for q in built] == [str(i) for i in range(1, len(factors) + 1)]
    full = [pyramid._full_factors(f, len(shape), spatial) for f in factors]
    for q, want in zip(built, _reference(data, full, method)):
        got = group[q["path"]]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got[...], want)
        assert q["computed"] == q["units"] == len(os.listdir(tmp_path / "done" / f"l{q['level']}"))


def test_units_tile_each_level_once_in_whole_chunks():
    """Invariant 5 for the pyramid: the units of a level cover it exactly once, each a whole
    write unit (clipped at the far faces), and read exactly the factors times their region."""
    job = LevelJob(None, None, "0", "1", (2, 11, 38, 25), (1, 2, 2, 3), (1, 8, 16, 16), "<u2", "mean", None, "t")
    seen = np.zeros(job.shape, np.int32)
    for i in range(len(job)):
        dst, src = job.regions(i)
        seen[dst] += 1
        for d, s, u, n, f in zip(dst, src, job.unit, job.shape, job.factors):
            assert d.start % u == 0 and d.stop == min(d.start + u, n)
            assert (s.start, s.stop) == (d.start * f, d.stop * f)
    assert (seen == 1).all() and len(job) == 2 * 2 * 3 * 2
    with pytest.raises(IndexError):
        job.regions(len(job))


# --------------------------------------------------------------------------- resuming


def _counter():
    calls: list[tuple[int, int]] = []
    return calls, lambda level, index: calls.append((level, index))


def test_a_level_killed_part_way_computes_only_its_unrecorded_units(tmp_path):
    data = _data((24, 128, 128), np.uint16, seed=4)
    factors = [(2, 2, 2), (1, 2, 2), (2, 2, 2)]
    group, fmt, names = _level0(tmp_path / "p.zarr", data)
    done = tmp_path / "done"
    _build(group, fmt, names, [0, 1, 2], factors, (8, 16, 16), data.dtype, done=done)
    ref = [group[str(i)][...] for i in (1, 2, 3)]
    # as if killed in the middle of level 2: some of its units unrecorded (and unwritten), level 3 not begun
    lost = {1, 4, 6}
    job2 = LevelJob(None, None, "1", "2", ref[1].shape, (1, 2, 2), (8, 16, 16), "<u2", "mean", None, "t")
    for i in lost:
        os.remove(done / "l2" / str(i))
        group["2"][job2.regions(i)[0]] = 0
    kept = 7  # a recorded unit: poisoned, so recomputing it would show
    group["2"][job2.regions(kept)[0]] = 12345
    shutil.rmtree(done / "l3")
    del group["3"]
    calls, on_unit = _counter()
    built = _build(group, fmt, names, [0, 1, 2], factors, (8, 16, 16), data.dtype, done=done, on_unit=on_unit)
    assert [(q["skipped"], q["computed"]) for q in built] == [
        (len(job2) * 4, 0),  # level 1: 4x the units of level 2 here, all recorded
        (len(job2) - len(lost), len(lost)),
        (0, built[2]["units"]),
    ]
    assert {i for lvl, i in calls if lvl == 2} == lost and not [c for c in calls if c[0] == 1]
    np.testing.assert_array_equal(group["1"][...], ref[0])
    got2 = group["2"][...]
    assert (got2[job2.regions(kept)[0]] == 12345).all()  # a recorded unit is not recomputed
    got2[job2.regions(kept)[0]] = ref[1][job2.regions(kept)[0]]
    np.testing.assert_array_equal(got2, ref[1])  # the lost units were


def test_complete_levels_are_kept_and_a_changed_layout_is_rebuilt(tmp_path):
    data = _data((16, 64, 64), np.float32, seed=5)
    factors = [(2, 2, 2), (2, 2, 2)]
    group, fmt, names = _level0(tmp_path / "p.zarr", data)
    done = tmp_path / "done"
    _build(group, fmt, names, [0, 1, 2], factors, (8, 16, 16), data.dtype, done=done)
    ref = _reference(data, factors, "mean")
    level1_meta = os.stat(tmp_path / "p.zarr" / "1" / "zarr.json").st_mtime_ns
    calls, on_unit = _counter()
    built = _build(group, fmt, names, [0, 1, 2], factors, (8, 16, 16), data.dtype, done=done, on_unit=on_unit)
    assert calls == [] and [q["computed"] for q in built] == [0, 0]
    assert os.stat(tmp_path / "p.zarr" / "1" / "zarr.json").st_mtime_ns == level1_meta  # not re-created
    # level 1 stored with another layout (not this run's): it and every level after it are rebuilt
    fmt.create_array(group, "1", ref[0].shape, (4, 8, 8), data.dtype, names, overwrite=True)
    calls, on_unit = _counter()
    built = _build(group, fmt, names, [0, 1, 2], factors, (8, 16, 16), data.dtype, done=done, on_unit=on_unit)
    assert [q["computed"] for q in built] == [q["units"] for q in built] and len(calls) == sum(
        q["units"] for q in built
    )
    assert group["1"].chunks == (8, 16, 16)
    for i, want in enumerate(ref, start=1):
        np.testing.assert_array_equal(group[str(i)][...], want)


def test_cluster_path_equals_the_in_process_one(tmp_path):
    distributed = pytest.importorskip("distributed")
    data = _data((2, 20, 70, 66), np.uint16, seed=6)
    factors = [(2, 2, 2), (1, 2, 2)]
    a, fmt, names = _level0(tmp_path / "a.zarr", data, "0.5", (1, 4, 16, 16), (1, 8, 32, 32))
    b, _, _ = _level0(tmp_path / "b.zarr", data, "0.5", (1, 4, 16, 16), (1, 8, 32, 32))
    _build(a, fmt, names, [1, 2, 3], factors, (1, 4, 16, 16), data.dtype, shards=(1, 8, 32, 32))
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        built = _build(
            b,
            fmt,
            names,
            [1, 2, 3],
            factors,
            (1, 4, 16, 16),
            data.dtype,
            done=tmp_path / "done",
            shards=(1, 8, 32, 32),
            client=client,
            url=str(tmp_path / "b.zarr"),
            window=3,  # fewer than the units: the window refills
        )
    assert [q["computed"] for q in built] == [q["units"] for q in built] and built[0]["units"] > 3
    for p in ("1", "2"):
        assert b[p].shards == a[p].shards
        np.testing.assert_array_equal(b[p][...], a[p][...])
    assert DoneRecords(str(tmp_path / "done" / "l2")).load() == set(range(built[1]["units"]))


_CHILD = textwrap.dedent(
    """
    import sys, time
    from svision_big import pyramid
    from svision_big.ngff import format_for, open_output_group
    out, done = sys.argv[1], sys.argv[2]
    fmt = format_for("0.5")
    group = open_output_group(out, fmt, mode="a")
    pyramid.build_levels(group, fmt, list("zyx"), "0", [0, 1, 2], [(2, 2, 2), (2, 2, 2)], (4, 8, 8), "uint16",
                         done_url=lambda level: f"{done}/l{level}", on_unit=lambda level, i: time.sleep(0.01))
    """
)


def test_sigkilled_pyramid_resumes_to_the_uninterrupted_result(tmp_path):
    data = _data((32, 128, 128), np.uint16, seed=7)
    factors = [(2, 2, 2), (2, 2, 2)]
    ref = _reference(data, factors, "mean")
    group, fmt, names = _level0(tmp_path / "p.zarr", data, chunks=(8, 32, 32))
    done = tmp_path / "done"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "p.zarr"), str(done)], env=env)

    def recorded(level: int) -> int:
        d = done / f"l{level}"
        return len(os.listdir(d)) if d.is_dir() else 0

    deadline = time.time() + 60
    while time.time() < deadline and recorded(1) < 40 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = recorded(1)
    assert 40 <= before < 256  # killed part-way through level 1 (4 x 8 x 8 units of 4 x 8 x 8)
    calls, on_unit = _counter()
    built = _build(group, fmt, names, [0, 1, 2], factors, (4, 8, 8), np.uint16, done=done, on_unit=on_unit)
    assert built[0]["skipped"] == before and built[0]["computed"] == 256 - before
    assert len({i for lvl, i in calls if lvl == 1}) == 256 - before
    for i, want in enumerate(ref, start=1):
        np.testing.assert_array_equal(group[str(i)][...], want)


# --------------------------------------------------------------------------- in the pipeline


def test_enhance_stopped_in_the_pyramid_resumes_identically_with_progress(tmp_path, monkeypatch, capsys):
    model = make_model((2, 2, 2), bp=0)
    src = str(tmp_path / "in.ome.zarr")
    write_ome_zarr(smooth_volume((8, 128, 128), seed=8, dtype=np.uint16, scale=1000), src, axes="zyx")
    kw = dict(scheduler="sync", block=(16, 64, 64), progress=False)  # level 1: 4 units, level 2: 1
    ref, out = str(tmp_path / "ref.ome.zarr"), str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, ref, model, **kw)

    real, seen = pyramid.write_unit, []

    def dies_in_level_1(src_arr, dst, job, index):
        if len(seen) == 2:
            raise KeyboardInterrupt("killed")
        seen.append(index)
        return real(src_arr, dst, job, index)

    monkeypatch.setattr(pyramid, "write_unit", dies_in_level_1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.enhance(src, out, model, **kw)
    attrs = zarr.open_group(out, mode="r").attrs.asdict()
    assert attrs["svision_big"]["state"] == "building pyramid" and "multiscales" not in json.dumps(attrs)
    assert any(
        n.startswith("l")
        for d in os.listdir(f"{out}/svision_state")
        if d.startswith("done-")
        for n in os.listdir(f"{out}/svision_state/{d}")
    )
    assert foreign_file(out, allowed=_our_file) is None  # --overwrite may still replace it
    monkeypatch.setattr(pyramid, "write_unit", real)
    capsys.readouterr()
    progress.configure(format="json")
    try:
        stats = pipeline.enhance(src, out, model, **{**kw, "progress": True})
    finally:
        progress.configure(format="text")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    last = {r["label"]: r for r in lines if r["label"].startswith("pyramid level")}
    assert sorted(last) == [f"pyramid level {q['level']}/{len(stats['pyramid'])}" for q in stats["pyramid"]]
    assert all(r["done"] == r["total"] for r in last.values())
    assert [(q["skipped"], q["computed"]) for q in stats["pyramid"]] == [(2, 2), (0, 1)]
    assert stats["computed"] == 0  # level 0 was complete
    a, b = open_image(ref), open_image(out)
    assert a.nlevels == b.nlevels >= 3
    for lvl in range(a.nlevels):
        np.testing.assert_array_equal(a.level(lvl)[...], b.level(lvl)[...])
    state = os.path.join(out, "svision_state")
    assert not os.path.exists(state) or not os.listdir(state)  # the pyramid's records removed with the rest
