"""Out-of-core pipeline: the seven invariants of docs/architecture.md (section "Invariants"), the CLI, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

import svision_big as svb
from conftest import smooth_volume
from svision_big import pipeline
from svision_big.cli import main as cli_main
from svision_big.convert import write_ome_zarr
from svision_big.execute import Job
from svision_big.ngff import NgffError, open_image
from svision_big.passes import plan_passes
from svision_big.plan import BlockPlan
from svision_big.testing import make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.one_torch_thread


def _tree_hash(path: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _write_input(tmp_path, vol, axes="zyx", ngff="0.5", name="in.ome.zarr", voxel=None):
    path = str(tmp_path / name)
    n_sp = sum(a in "zyx" for a in axes)
    write_ome_zarr(vol, path, axes=axes, ngff=ngff, voxel_size=voxel or (2.0, 0.5, 0.5)[-n_sp:])
    return path


# --------------------------------------------------------------------------- 1. seamless


@pytest.mark.parametrize(
    "factors,shape,block,interpolation",
    [
        ((2, 2, 2), (21, 45, 38), (16, 32, 24), "keys"),
        ((2, 2, 2), (21, 45, 38), (14, 50, 64), "keys"),
        ((2, 1, 1), (23, 30, 41), (8, 16, 24), "keys"),
        ((4, 2, 2), (9, 27, 25), (12, 18, 20), "keys"),
        ((2, 2), (75, 61), (32, 22), "keys"),
        ((2, 2, 2), (21, 45, 38), (16, 32, 24), "bspline"),  # the B-spline's 16-voxel reach: a wide halo
        ((4, 2, 2), (9, 27, 25), (12, 18, 20), "bspline"),
    ],
)
def test_chunked_equals_whole_volume(tmp_path, factors, shape, block, interpolation):
    model = make_model(factors, bp=1, final_bp=1, interpolation=interpolation)
    vol = smooth_volume(shape, seed=1)
    axes = "zyx" if len(shape) == 3 else "yx"
    src = _write_input(tmp_path, vol, axes=axes)
    stats = pipeline.enhance(
        src, str(tmp_path / "out.ome.zarr"), model, scheduler="sync", block=block, dtype="float32", progress=False
    )
    out = open_image(str(tmp_path / "out.ome.zarr")).level(0)[...]
    ref = model.enhance(vol, dtype="float32")
    assert out.shape == ref.shape
    rng = float(ref.max() - ref.min())
    worst = float(np.abs(out - ref).max())
    assert worst <= 1e-5 * rng, worst
    assert stats["computed"] == len(BlockPlan(shape, factors, block, model.halo()))
    # the plan really cut the volume: more than one block in every pass (network, back-projection, ...)
    assert [p["kind"] for p in stats["passes"]] == [p.kind for p in plan_passes(model.spec())]
    assert len(stats["passes"]) >= 2 and all(p["computed"] > 1 for p in stats["passes"])


def test_plan_tiles_the_output_exactly():
    plan = BlockPlan((13, 40, 33), (2, 2, 2), (10, 24, 16), (5, 7, 7), outer_shape=(2,))
    cover = np.zeros((2, 26, 80, 66), np.int32)
    for b in plan:
        cover[(b.outer[0], *b.write)] += 1
        for r, w, c, f, h, n in zip(b.read, b.write, b.crop, plan.factors, plan.halo, plan.in_shape):
            assert r.start == max(0, w.start // f - h) and r.stop == min(n, -(-w.stop // f) + h)
            assert c.stop - c.start == w.stop - w.start and c.start == w.start - r.start * f
    assert np.all(cover == 1)  # every output voxel has exactly one writer


def test_plan_of_a_million_blocks_is_instant():
    t0 = time.perf_counter()
    plan = BlockPlan((5000, 5000, 5000), (2, 2, 2), (100, 100, 100), (20, 20, 20))
    assert len(plan) == 1_000_000
    last = plan[len(plan) - 1]
    assert last.write == (slice(9900, 10000),) * 3
    assert time.perf_counter() - t0 < 1.0


def test_bad_block_is_refused():
    with pytest.raises(ValueError, match="multiple of the factors"):
        BlockPlan((10, 10, 10), (2, 2, 2), (15, 16, 16), (3, 3, 3))


# --------------------------------------------------------------------------- 3/5. distributed, aligned writes


def test_local_cluster_workers_load_model_once(tmp_path):
    from distributed import Client, LocalCluster

    from svision_big import execute as ex

    model = make_model((2, 2, 2), bp=1)
    vol = smooth_volume((18, 40, 36), seed=2)
    src = _write_input(tmp_path, vol)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        stats = pipeline.enhance(
            src,
            str(tmp_path / "out.ome.zarr"),
            model,
            client=client,
            block=(12, 24, 24),
            dtype="float32",
            progress=False,
        )
        loaded = client.run(lambda: sorted(ex.MODELS))
        threads = client.run(lambda: torch.get_num_threads())
    assert all(v == [model.hash] for v in loaded.values()) and len(loaded) == 2
    assert all(t == 1 for t in threads.values())
    out = open_image(str(tmp_path / "out.ome.zarr")).level(0)[...]
    np.testing.assert_allclose(out, model.enhance(vol, dtype="float32"), atol=1e-5 * float(np.ptp(out)))
    assert stats["computed"] == stats["blocks"]


def test_task_payload_is_small_and_has_no_weights(tmp_path):
    job = Job(
        "in",
        "0",
        "out",
        "0",
        BlockPlan((100, 100, 100), (2, 2, 2), (64, 64, 64), (9, 9, 9)),
        (0, 1, 2),
        (),
        (),
        ("abc",),
        None,
        "float32",
        "out/state/done",
    )
    assert len(pickle.dumps(job)) < 2000


@pytest.mark.parametrize("block,inner", [((16, 32, 32), (16, 32, 32)), ((32, 80, 80), (32, 40, 40))])
def test_sharded_output_is_aligned_and_correct(tmp_path, block, inner):
    """One shard per writing block; its inner chunks are the largest divisors of the block up to 64."""
    model = make_model((2, 2, 2), bp=1)
    vol = smooth_volume((16, 40, 40), seed=3)
    src = _write_input(tmp_path, vol)
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, model, scheduler="sync", block=block, shards=True, dtype="float32", progress=False)
    arr = open_image(out).level(0)
    assert arr.shards == block and arr.chunks == inner
    assert all(s % c == 0 for s, c in zip(arr.shards, arr.chunks))
    np.testing.assert_allclose(arr[...], model.enhance(vol, dtype="float32"), atol=1e-5)


# --------------------------------------------------------------------------- 7. metadata


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_output_metadata_is_valid_and_overlays_input(tmp_path, ngff):
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    model = make_model((2, 2, 2), bp=1)
    vol = smooth_volume((12, 70, 70), seed=4, dtype=np.uint16, scale=3000)
    src = _write_input(tmp_path, vol, ngff=ngff, voxel=(2.0, 0.5, 0.5))
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(
        src, out, make_model((2, 2, 2), bp=1, hi=3000.0), scheduler="sync", block=(16, 64, 64), progress=False
    )
    del model
    validated = ome_zarr_models.open_ome_zarr(out)
    assert validated.ome_zarr_version == ngff
    nodes = list(Reader(parse_url(out))())
    assert nodes[0].data[0].shape == (24, 140, 140)
    img_in, img_out = open_image(src), open_image(out)
    assert img_out.fmt.version == ngff and img_out.dtype == np.uint16
    assert img_out.scales[0] == [1.0, 0.25, 0.25]
    assert img_out.translations[0] == [-0.5, -0.125, -0.125]
    # physical extent is the input's: first voxel edge and last voxel edge coincide
    for lvl in range(img_out.nlevels):
        shp = img_out.level(lvl).shape
        for d in range(3):
            s, t = img_out.scales[lvl][d], img_out.translations[lvl][d]
            s0, t0 = img_in.scales[0][d], img_in.translations[0][d]
            assert abs((t - s / 2) - (t0 - s0 / 2)) < 1e-9
            if lvl == 0:
                assert abs((t + s * (shp[d] - 0.5)) - (t0 + s0 * (img_in.shape[d] - 0.5))) < 1e-9
    assert img_out.level(img_out.nlevels - 1).shape[1] <= img_in.level(img_in.nlevels - 1).shape[1]
    # the input's display settings carry over; the name says it is the enhanced image (ngff.viewer_metadata)
    assert img_out.omero["channels"] == img_in.omero["channels"]
    assert img_out.omero["name"].endswith(" (svision x2)") and img_out.omero["version"] == ngff
    prov = img_out.group.attrs["svision_big"]
    assert prov["state"] == "complete" and prov["factors"] == [2, 2, 2] and len(prov["model_hash"][0]) == 16
    assert prov["halo"] and prov["block"] == [16, 64, 64] and prov["normalisation"][0]["hi"] == 3000.0


def test_metadata_is_written_last(tmp_path):
    """While level 0 is being written, the output does not claim to be an OME-Zarr image."""
    model = make_model((2, 2, 2), bp=1)
    src = _write_input(tmp_path, smooth_volume((10, 40, 40), seed=5))
    out = str(tmp_path / "out.ome.zarr")
    seen = []

    def check(_):
        seen.append(json.dumps(zarr.open_group(out, mode="r").attrs.asdict()))
        with pytest.raises(NgffError, match="no 'multiscales' metadata"):
            open_image(out)  # the partial output, while it is being written
        refused.append(True)

    refused = []
    pipeline.enhance(src, out, model, scheduler="sync", block=(20, 40, 40), progress=False, on_block=check)
    assert seen and all("multiscales" not in s for s in seen) and len(refused) == len(seen)
    # a partial output written by hand (level 0 array, no metadata yet) is not openable as an image
    partial = zarr.open_group(str(tmp_path / "partial.ome.zarr"), mode="w-", zarr_format=3)
    partial.create_array("0", shape=(20, 80, 80), chunks=(20, 40, 40), dtype="f4")
    with pytest.raises(NgffError, match="no 'multiscales' metadata"):
        open_image(str(tmp_path / "partial.ome.zarr"))
    assert "multiscales" in json.dumps(zarr.open_group(out, mode="r").attrs.asdict())
    assert open_image(out).level(0).shape == (20, 80, 80)


# --------------------------------------------------------------------------- 6. resumable


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "svision_big.cli", *args], capture_output=True, text=True, **kw)


def test_killed_run_resumes_to_identical_result(tmp_path):
    model = make_model((2, 2, 2), bp=1)
    model_path = str(model.save(tmp_path / "m.svb"))
    vol = smooth_volume((20, 64, 64), seed=6, dtype=np.uint16, scale=1000)
    src = _write_input(tmp_path, vol)
    ref_out, out = str(tmp_path / "ref.ome.zarr"), str(tmp_path / "out.ome.zarr")
    args = ["--model", model_path, "--scheduler", "sync", "--block", "8,32,32", "--quiet"]
    assert _cli("enhance", src, ref_out, *args).returncode == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "svision_big.cli", "enhance", src, out, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = os.path.join(out, "svision_state")

    def done_in_last_pass():  # the network pass, then back-projection (pass p1) writes the output
        dirs = [d for d in os.listdir(state) if d.startswith("done-")] if os.path.isdir(state) else []
        last = os.path.join(state, dirs[0], "p1") if dirs else ""
        return len(os.listdir(last)) if os.path.isdir(last) else 0

    deadline = time.time() + 120
    while time.time() < deadline and done_in_last_pass() < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = done_in_last_pass()
    assert 5 <= done_before < 80  # killed part-way (80 blocks in all)
    assert "multiscales" not in json.dumps(zarr.open_group(out, mode="r").attrs.asdict())

    r = _cli("enhance", src, out, *args[:-1])
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout
    skipped = int(r.stdout.split(" blocks computed, ")[1].split(" already done")[0])
    assert skipped >= done_before - 1
    a, b = open_image(ref_out), open_image(out)
    for lvl in range(a.nlevels):
        np.testing.assert_array_equal(a.level(lvl)[...], b.level(lvl)[...])
    r2 = _cli("enhance", src, out, *args)
    assert r2.returncode == 0 and "already complete" in r2.stdout
    assert not os.path.exists(state)  # scratch arrays, records and the emptied folder removed once done


def test_existing_output_with_other_settings_is_refused(tmp_path):
    model = make_model((2, 2, 2), bp=1)
    src = _write_input(tmp_path, smooth_volume((10, 32, 32), seed=7))
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, model, scheduler="sync", progress=False)
    before = _tree_hash(out)
    with pytest.raises(NgffError, match="other settings.*--overwrite"):
        pipeline.enhance(src, out, model, scheduler="sync", block=(10, 32, 32), progress=False)
    assert _tree_hash(out) == before
    pipeline.enhance(src, out, model, scheduler="sync", block=(10, 32, 32), progress=False, overwrite=True)
    assert open_image(out).group.attrs["svision_big"]["block"] == [10, 32, 32]
    # the same settings on a changed input (same shape and dtype) are another run, not a resume
    before = _tree_hash(out)
    write_ome_zarr(smooth_volume((10, 32, 32), seed=8), src, axes="zyx", voxel_size=(2.0, 0.5, 0.5), overwrite=True)
    with pytest.raises(NgffError, match="made from another input.*--overwrite"):
        pipeline.enhance(src, out, model, scheduler="sync", block=(10, 32, 32), progress=False)
    assert _tree_hash(out) == before
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(NgffError, match="not an svision-big output"):
        pipeline.enhance(src, str(other), model, scheduler="sync", progress=False)
    assert (other / "precious.txt").read_text() == "keep me"


def test_input_is_never_written(tmp_path):
    model = make_model((2, 2, 2), bp=1)
    src = _write_input(tmp_path, smooth_volume((10, 32, 32), seed=8))
    before = _tree_hash(src)
    with pytest.raises(NgffError, match="must not be the input"):
        pipeline.enhance(src, src, model, scheduler="sync", progress=False)
    with pytest.raises(NgffError, match="must not be the input"):
        pipeline.enhance(src, os.path.join(src, "inner"), model, scheduler="sync", progress=False)
    pipeline.enhance(src, str(tmp_path / "out.ome.zarr"), model, scheduler="sync", progress=False)
    assert _tree_hash(src) == before


# --------------------------------------------------------------------------- training on a sample, channels


def test_training_region_finds_signal_within_budget(tmp_path):
    vol = np.zeros((16, 128, 128), np.float32)
    vol[4:12, 90:120, 10:40] = smooth_volume((8, 30, 30), seed=9) + 0.5
    src = _write_input(tmp_path, vol)
    image = open_image(src)
    box, level = pipeline.training_region(image, {}, budget=8 * 40 * 40)
    assert np.prod([s.stop - s.start for s in box]) <= 8 * 40 * 40
    assert box[1].start < 120 and box[1].stop > 90 and box[2].start < 40 and box[2].stop > 10


def test_run_trains_one_model_per_channel(tmp_path):
    a = smooth_volume((8, 40, 40), seed=10)
    b = smooth_volume((8, 40, 40), seed=11) * 0.3
    src = _write_input(tmp_path, np.stack([a, b]), axes="czyx")
    out = str(tmp_path / "out.ome.zarr")
    stats = pipeline.run(src, out, 2, steps=5, scheduler="sync", quiet=True, block=(16, 40, 40), dtype="float32")
    img = open_image(out)
    assert img.level(0).shape == (2, 16, 80, 80)
    hashes = img.group.attrs["svision_big"]["model_hash"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    # a finished output keeps its models at their documented place, and no run state
    state = os.path.join(out, "svision_state")
    assert not os.path.exists(state) or not any(d.startswith("models") for d in os.listdir(state))
    assert sorted(f for f in os.listdir(out) if f.endswith(".svb")) == ["svision_model_c0.svb", "svision_model_c1.svb"]
    m1 = svb.load_model(os.path.join(out, "svision_model_c1.svb"))
    np.testing.assert_allclose(img.level(0)[1], m1.enhance(b, dtype="float32"), atol=1e-5)
    assert stats["computed"] == 2 * 2 * 2  # two channels x (1 x 2 x 2) blocks


# --------------------------------------------------------------------------- CLI


def test_cli_progress_as_json_lines_and_log_file(tmp_path, capsys):
    """Cluster jobs are watched without a terminal: --progress json makes every progress line a
    JSON object (training steps, then blocks up to done == total), --log-file gets them too."""
    import json

    from svision_big import progress

    vol = smooth_volume((8, 32, 32), seed=13, dtype=np.uint16, scale=2000)
    src = _write_input(tmp_path, vol)
    out, log = str(tmp_path / "out.ome.zarr"), str(tmp_path / "job.log")
    assert (
        cli_main(
            [
                "run",
                src,
                out,
                "--factor",
                "2",
                "--steps",
                "4",
                "--scheduler",
                "sync",
                "--block",
                "16,32,32",
                "--progress",
                "json",
                "--log-file",
                log,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    err = captured.err
    recs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert recs and all(r["event"] == "progress" and {"done", "total", "eta_s", "rate_per_s"} <= set(r) for r in recs)
    assert any(r["unit"] == "steps" for r in recs)
    blocks = [r for r in recs if r["unit"] == "blocks"]
    assert blocks and blocks[-1]["done"] == blocks[-1]["total"]
    logged = [json.loads(line) for line in open(log)]
    assert [r["done"] for r in logged if r["event"] == "progress"] == [r["done"] for r in recs]
    # the decisions go there too, as records: what was chosen, on which figures, and what reverses it
    decided = [json.loads(line) for line in captured.out.splitlines()]  # every line a record: the plan and the
    # closing lines were plain text there, and absent from the log file
    kinds = [r["kind"] for r in decided]
    summary = decided[kinds.index("summary")]
    assert "check" in kinds and summary["reverse"] and summary["result"]
    assert kinds[0] == "training region" and "plan" in kinds and kinds[-1] == "done"
    wrote = [r for r in decided if r["kind"] == "done" and r["text"].startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0]["output"] == out and wrote[0]["computed"] > 0 and wrote[0]["levels"]
    assert [r for r in logged if r["event"] == "decision"] == decided
    assert progress._SETTINGS["format"] == "text"  # restored for in-process callers
    assert (
        cli_main(["run", src, str(tmp_path / "o2"), "--factor", "2", "--log-file", str(tmp_path / "no" / "x.log")]) == 2
    )
    assert not (tmp_path / "o2").exists()


def test_cli_train_enhance_info(tmp_path, capsys):
    vol = smooth_volume((10, 48, 48), seed=12, dtype=np.uint16, scale=2000)
    src = _write_input(tmp_path, vol, ngff="0.4")
    model_path = str(tmp_path / "m.svb")
    assert cli_main(["train", src, "-o", model_path, "--factor", "2,1,1", "--steps", "5", "--quiet"]) == 0
    out = str(tmp_path / "out.ome.zarr")
    assert cli_main(["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "NGFF version: 0.4 (zarr v2)" in text and "0: shape (20, 48, 48)" in text
    img = open_image(out)
    assert img.fmt.version == "0.4" and img.level(0).shape == (20, 48, 48)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """An NGFF 0.4 input and a model trained on it (5 steps), shared by the bad-invocation cases."""
    d = tmp_path_factory.mktemp("cli")
    src = _write_input(d, smooth_volume((10, 48, 48), seed=12, dtype=np.uint16, scale=2000), ngff="0.4")
    model_path = str(d / "m.svb")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["train", src, "-o", model_path, "--factor", "2,1,1", "--steps", "5", "--quiet"]) == 0
    finally:
        torch.set_num_threads(n)
    (d / "bad.svb").write_bytes(b"garbage")
    return d, src, model_path


# Each bad invocation: exit 2, the message on stderr, and the output it names not created.
_CLI_ERRORS = {
    "model exists": (
        ["train", "{src}", "-o", "{model}", "--factor", "2", "--steps", "5", "--quiet"],
        "already exists",
        None,
    ),
    "missing input": (["enhance", "{d}/missing.ome.zarr", "{d}/o2", "--model", "{model}"], "does not exist", "o2"),
    "bad model file": (
        ["enhance", "{src}", "{d}/o3", "--model", "{d}/bad.svb", "--scheduler", "sync"],
        "not a readable svision-big model",
        "o3",
    ),
    "factor 3": (["train", "{src}", "-o", "{d}/m2.svb", "--factor", "3"], "1, 2 or 4", "m2.svb"),
    "block not a multiple": (
        ["enhance", "{src}", "{d}/o4", "--model", "{model}", "--scheduler", "sync", "--block", "7,16,16"],
        "multiple of the factors",
        "o4",
    ),
}


@pytest.mark.parametrize("case", list(_CLI_ERRORS))
def test_cli_errors(cli_inputs, capsys, case):
    d, src, model_path = cli_inputs
    argv, message, created = _CLI_ERRORS[case]
    argv = [a.format(d=d, src=src, model=model_path) for a in argv]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svision-big: error:") and message in err and len(err.splitlines()) == 1, err
    if created is not None:
        assert not (d / created).exists()


def test_cli_convert_tiff(tmp_path, capsys):
    import tifffile

    vol = smooth_volume((6, 20, 24), seed=13, dtype=np.uint16, scale=500)
    tif = str(tmp_path / "stack.tif")
    tifffile.imwrite(tif, vol)
    out = str(tmp_path / "stack.ome.zarr")
    assert cli_main(["convert", tif, out, "--voxel-size", "2,0.3,0.3", "--axes", "zyx"]) == 0
    img = open_image(out)
    np.testing.assert_array_equal(img.level(0)[...], vol)
    assert img.scales[0] == [2.0, 0.3, 0.3]
    assert cli_main(["convert", tif, out]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- remote stores


@pytest.mark.s3
def test_enhance_s3_to_s3_is_seamless_and_resumable(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("pipeline-bucket")
    vol = smooth_volume((12, 40, 36), seed=14)
    src, out = "s3://pipeline-bucket/in.ome.zarr", "s3://pipeline-bucket/out.ome.zarr"
    write_ome_zarr(vol, src, voxel_size=(2, 1, 1), storage_options=s3_server)
    model = make_model((2, 2, 2), bp=1)
    kw = dict(
        scheduler="sync",
        block=(12, 40, 36),
        dtype="float32",
        progress=False,
        storage_options=s3_server,
        output_storage_options=s3_server,
    )
    stats = pipeline.enhance(src, out, model, **kw)
    assert stats["computed"] == 8 and fs.exists("pipeline-bucket/out.ome.zarr/zarr.json")
    img = open_image(out, storage_options=s3_server)
    np.testing.assert_allclose(img.level(0)[...], model.enhance(vol, dtype="float32"), atol=1e-5)
    again = pipeline.enhance(src, out, model, **kw)
    assert again["state"] == "already complete"


def test_five_dimensional_input_through_top_level_api(tmp_path):
    vol = np.stack([np.stack([smooth_volume((6, 20, 20), seed=20 + 2 * t + c) for c in range(2)]) for t in range(2)])
    src = _write_input(tmp_path, vol, axes="tczyx")
    model = make_model((2, 2, 2), bp=1)
    out = str(tmp_path / "out.ome.zarr")
    svb.enhance(src, out, model, scheduler="sync", dtype="float32", progress=False)
    img = open_image(out)
    assert img.axis_names == ["t", "c", "z", "y", "x"] and img.level(0).shape == (2, 2, 12, 40, 40)
    np.testing.assert_allclose(img.level(0)[1, 0], model.enhance(vol[1, 0], dtype="float32"), atol=1e-5)
    assert img.scales[0][:2] == [1.0, 1.0]


def test_default_blocks_write_whole_chunks(tmp_path):
    """By default the output has viewer-sized chunks and bigger blocks (less halo): every block must
    still own whole chunks (the last one may end at the array's edge)."""
    from svision_big.pipeline import DEFAULT_CHUNK, _whole_chunks

    assert _whole_chunks((256, 200), (128, 128), (600, 200)) == (256, 200)
    assert _whole_chunks((250, 256), (128, 128), (600, 600)) == (128, 256)
    vol = smooth_volume((150, 40), seed=9)
    src = _write_input(tmp_path, vol, axes="yx")
    # the network pass takes big blocks, and so does back-projection with a halo no wider than the
    # network's (bp 1); wider ones (bp 5) run in chunk-sized blocks
    for bp in (0, 1, 5):
        model = make_model((2, 2), bp=bp)
        out = str(tmp_path / f"out{bp}.ome.zarr")
        pipeline.enhance(src, out, model, scheduler="sync", dtype="float32", progress=False)
        img = open_image(out)
        arr = img.level(0)
        assert arr.chunks == (DEFAULT_CHUNK, 80)
        blocks = [tuple(p["block"]) for p in img.group.attrs["svision_big"]["passes"]]
        assert all(b[0] % DEFAULT_CHUNK == 0 and b[1] == 80 for b in blocks)
        assert blocks[0][0] > DEFAULT_CHUNK and blocks[-1][0] == (DEFAULT_CHUNK if bp > 2 else blocks[0][0])
        halo = img.group.attrs["svision_big"]["passes"][-1]["halo"]
        assert (max(halo) > pipeline.NARROW_BP_HALO) == (bp > 2), halo
        np.testing.assert_allclose(arr[...], model.enhance(vol, dtype="float32"), atol=1e-5, rtol=0)


def test_bfloat16_is_seamless_close_to_float32_and_recorded(tmp_path):
    """bfloat16 networks (the faster CPU option) keep the pipeline seamless against the same
    precision in memory, stay near the float32 reference, and say so in the provenance."""
    model = make_model((2, 2, 2), bp=1)
    vol = smooth_volume((21, 45, 38), seed=3)
    src = _write_input(tmp_path, vol)
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(
        src, out, model, scheduler="sync", block=(16, 32, 24), dtype="float32", progress=False, precision="bfloat16"
    )
    got = open_image(out).level(0)[...]
    ref16 = model.enhance(vol, dtype="float32", precision="bfloat16")
    ref32 = model.enhance(vol, dtype="float32")
    rng = float(ref32.max() - ref32.min())
    assert float(np.abs(got - ref16).max()) <= 1e-5 * rng
    assert 0 < float(np.abs(ref16 - ref32).max()) <= 2e-3 * rng
    assert open_image(out).group.attrs["svision_big"]["precision"] == "bfloat16"


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it_and_is_recorded(tmp_path, monkeypatch):
    """The default precision is decided per machine: bfloat16 with native CPU support, float32
    otherwise and on CUDA; the variable pins it; the provenance and fingerprint hold what ran."""
    from svision_big import operator

    monkeypatch.delenv(operator.AUTO_ENV, raising=False)
    expected = "bfloat16" if operator.cpu_has_bf16() else "float32"
    assert operator.resolve_precision("auto", "cpu") == expected
    assert operator.resolve_precision("auto", "cuda") == "float32"
    assert operator.resolve_precision("float32", "cpu") == "float32"
    monkeypatch.setattr(operator, "cpu_has_bf16", lambda: True)
    assert operator.resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(operator, "cpu_has_bf16", lambda: False)
    assert operator.resolve_precision("auto", "cpu") == "float32"
    monkeypatch.setenv(operator.AUTO_ENV, "bfloat16")
    assert operator.resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setenv(operator.AUTO_ENV, "int4")
    with pytest.raises(ValueError, match="SVISION_BIG_AUTO_PRECISION=int4"):
        operator.resolve_precision("auto", "cpu")

    model = make_model((2, 2, 2))
    src = _write_input(tmp_path, smooth_volume((8, 16, 16), seed=4))
    prints = {}
    for pinned in ("bfloat16", "float32"):
        monkeypatch.setenv(operator.AUTO_ENV, pinned)
        out = str(tmp_path / f"o_{pinned}")
        st = pipeline.enhance(src, out, model, scheduler="sync", progress=False, precision="auto")
        assert open_image(out).group.attrs["svision_big"]["precision"] == pinned
        prints[pinned] = st["fingerprint"]
        explicit = pipeline.enhance(src, out + "_x", model, scheduler="sync", progress=False, precision=pinned)
        assert explicit["fingerprint"] == st["fingerprint"]  # auto resolved is the same run as the name given
    assert prints["bfloat16"] != prints["float32"]


def test_one_precision_default_for_the_python_api_the_pipeline_and_the_command_line(tmp_path, monkeypatch):
    """Issue 28.5: Model.enhance, pipeline.enhance and the command line share one default, float32,
    whatever the CPU: the same model gives the same bytes on every path (was: the command line ran
    bfloat16 where the CPU had it, the Python API float32)."""
    import inspect

    from svision_big import cli, operator
    from svision_big.model import Model
    from svision_big.precision import DEFAULT_PRECISION

    monkeypatch.setenv(operator.AUTO_ENV, "bfloat16")  # what "auto" would give on a bfloat16 CPU
    assert DEFAULT_PRECISION == "float32"
    assert inspect.signature(Model.enhance).parameters["precision"].default == DEFAULT_PRECISION
    assert inspect.signature(pipeline.enhance).parameters["precision"].default == DEFAULT_PRECISION
    assert pipeline.EnhanceSettings().precision == DEFAULT_PRECISION
    parser = cli.build_parser()
    for cmd in (["enhance", "a", "b", "--model", "m"], ["run", "a", "b", "--factor", "2"]):
        assert parser.parse_args(cmd).precision == DEFAULT_PRECISION
    model = make_model((2, 2, 2))
    vol = smooth_volume((8, 16, 16), seed=4)
    src = _write_input(tmp_path, vol)
    out = str(tmp_path / "o")
    pipeline.enhance(src, out, model, scheduler="sync", progress=False)
    assert open_image(out).group.attrs["svision_big"]["precision"] == "float32"
    got = np.asarray(open_image(out).level(0)[...])
    assert np.array_equal(got.reshape(model.enhance(vol).shape), model.enhance(vol))
    # "auto" is accepted by the Python API too, and resolves as the pipeline resolves it
    assert not np.array_equal(model.enhance(vol, precision="auto"), model.enhance(vol))


def test_bad_precision_is_refused_before_anything_is_written(tmp_path):
    model = make_model((2, 2, 2))
    src = _write_input(tmp_path, smooth_volume((8, 16, 16), seed=4))
    for precision, msg in (("int8", "unknown precision 'int8'"), ("float16", "needs a CUDA device")):
        with pytest.raises(ValueError, match=msg):
            pipeline.enhance(src, str(tmp_path / "o"), model, scheduler="sync", precision=precision, progress=False)
        assert not (tmp_path / "o").exists()


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's first command: synthetic acquisition -> train -> enhance -> numbers."""
    folder = tmp_path / "demo"
    assert cli_main(["demo", str(folder), "--steps", "10", "--workers", "1"]) == 0
    result = json.loads((folder / "demo_result.json").read_text())
    assert all(np.isfinite(result[k]) for k in ("psnr_cubic", "psnr_enhanced", "ssim_cubic", "ssim_enhanced"))
    inp, out = open_image(str(folder / "input.ome.zarr")), open_image(str(folder / "enhanced.ome.zarr"))
    assert out.level(0).shape == tuple(2 * n for n in inp.level(0).shape)
    printed = capsys.readouterr().out
    assert "cubic B-spline" in printed
    # napari-ome-zarr 0.10 applies only the scale transform, which shifts the layers (docs/viewing.md)
    assert f"svision-big view {folder / 'input.ome.zarr'} {folder / 'enhanced.ome.zarr'}" in printed
    assert "napari-ome-zarr" not in printed


def test_staged_output_is_sharded_by_writer_block(tmp_path):
    """A staged pass output has one shard per writer block and small inner chunks, so the next pass
    decodes little more than its block and halo; sizes without a usable divisor keep plain chunks."""
    assert pipeline._scratch_layout((256, 256, 256), (256, 256, 256)) == ((64, 64, 64), (256, 256, 256))
    assert pipeline._scratch_layout((200, 80), (128, 80)) == ((50, 40), (200, 80))
    assert pipeline._scratch_layout((202, 256), (128, 256)) == ((2, 256), None)  # 202 = 2 x 101: gcd chunks
    import zarr

    vol = smooth_volume((40, 70), seed=3)
    src = _write_input(tmp_path, vol, axes="yx")
    model = make_model((2, 2), bp=1)
    out = str(tmp_path / "out.ome.zarr")
    seen = []

    def on_block(i):
        if not seen:
            (work,) = [p for p in os.listdir(os.path.join(out, "svision_state")) if p.startswith("work-")]
            arr = zarr.open_array(os.path.join(out, "svision_state", work, "p0"), mode="r")
            seen.append((arr.shards, arr.chunks))

    pipeline.enhance(src, out, model, scheduler="sync", dtype="float32", progress=False, on_block=on_block)
    block0 = tuple(open_image(out).group.attrs["svision_big"]["passes"][0]["block"])
    assert block0 == (80, 140) and seen == [((80, 140), (40, 35))]
    np.testing.assert_allclose(open_image(out).level(0)[...], model.enhance(vol, dtype="float32"), atol=1e-5, rtol=0)
