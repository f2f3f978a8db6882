"""Reliability (issue 14): bad input is one line and exit 2 with no damage, every fault is survived
or named, and two runs never write one output at once. Volumes are tiny (16x32x32), models have
random weights (conftest.make_model), and most runs use the in-process scheduler."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import zarr

from conftest import smooth_volume
from svision_big import pipeline
from svision_big.cli import main as cli_main
from svision_big.convert import write_ome_zarr
from svision_big.ngff import NgffError, open_image, remove_store
from svision_big.pipeline import enhancing, layout, request, running
from svision_big.state import OutputLock, OutputLocked
from svision_big.testing import make_model

SYNC = dict(scheduler="sync", progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.one_torch_thread


def _tree(path) -> dict[str, str]:
    """Every file and folder under ``path`` (relative name -> sha256, folders -> "dir")."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _write_input(path, vol, axes="zyx", ngff="0.5") -> str:
    n_sp = sum(a in "zyx" for a in axes)
    write_ome_zarr(vol, str(path), axes=axes, ngff=ngff, voxel_size=(2.0, 0.5, 0.5)[-n_sp:])
    return str(path)


def _levels(path) -> list[np.ndarray]:
    img = open_image(str(path))
    return [np.asarray(img.level(i)[...]) for i in range(img.nlevels)]


def _assert_same_image(a, b) -> None:
    la, lb = _levels(a), _levels(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]
        ),
    )


@pytest.fixture
def small(tmp_path):
    """A 16x32x32 uint16 input and a random-weight x2 model with one back-projection pass."""
    model = make_model((2, 2, 2), bp=1)
    src = _write_input(tmp_path / "in.ome.zarr", smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000))
    return src, model, str(model.save(tmp_path / "m.svb"))


# --------------------------------------------------------------------------- validation (issue 14.5-7)


def test_blocks_far_below_the_halo_are_refused_with_a_size_and_force_overrides(small, tmp_path, monkeypatch):
    src, model, _ = small
    out = str(tmp_path / "out.ome.zarr")
    with pytest.raises(ValueError, match=r"--block 2,2,2: blocks smaller than twice the halo.*use at least --block \d"):
        pipeline.enhance(src, out, model, block=(2, 2, 2), **SYNC)  # 16,384 blocks: refused at once
    assert not os.path.exists(out)
    monkeypatch.setattr(layout, "MAX_REPEATED_VOXELS", 0)  # make a cheap block count as wasteful
    with pytest.raises(ValueError, match="or pass --force"):
        pipeline.enhance(src, out, model, block=(8, 16, 16), **SYNC)
    assert not os.path.exists(out)
    stats = pipeline.enhance(src, out, model, block=(8, 16, 16), force=True, **SYNC)
    assert stats["blocks"] == 64
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, **SYNC)
    _assert_same_image(out, ref)  # small blocks are slow, not wrong


def test_overwrite_deletes_only_an_svision_output(small, tmp_path):
    src, model, _ = small
    # a folder with a zarr marker and the user's thesis: --overwrite must refuse and delete nothing
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (mixed / "thesis.docx").write_bytes(b"years of work")
    before = _tree(mixed)
    with pytest.raises(NgffError, match="not an svision-big output"):
        pipeline.enhance(src, str(mixed), model, overwrite=True, **SYNC)
    with pytest.raises(NgffError, match="thesis.docx.*refusing to delete anything"):
        pipeline.enhance(src, str(mixed), model, overwrite="any", **SYNC)
    assert _tree(mixed) == before
    with pytest.raises(NgffError, match="thesis.docx"):
        remove_store(str(mixed))
    assert _tree(mixed) == before
    # an svision-big output with a stray file in it: the same
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, model, **SYNC)
    with open(os.path.join(out, "0", "notes.txt"), "w") as fh:
        fh.write("mine")
    before = _tree(out)
    with pytest.raises(NgffError, match="0/notes.txt"):
        pipeline.enhance(src, out, model, block=(16, 32, 32), overwrite=True, **SYNC)
    assert _tree(out) == before
    os.remove(os.path.join(out, "0", "notes.txt"))
    pipeline.enhance(src, out, model, block=(16, 32, 32), overwrite=True, **SYNC)  # only ours: replaced
    assert open_image(out).group.attrs["svision_big"]["block"] == [16, 32, 32]


def test_train_refuses_too_small_volumes_naming_the_minimum(tmp_path):
    tiny = _write_input(tmp_path / "tiny.ome.zarr", smooth_volume((3, 5, 5), seed=1))
    with pytest.raises(NgffError, match="3x5x5 voxels is too small to train on.*at least 5"):
        pipeline.train(tiny, 2, steps=1, quiet=True)
    ok = _write_input(tmp_path / "ok.ome.zarr", smooth_volume((8, 16, 16), seed=1))
    with pytest.raises(ValueError, match="--budget 20: .*use a budget of at least"):
        pipeline.train(ok, 2, steps=1, quiet=True, budget=20)


def test_unusable_device_is_refused_before_anything_is_written(small, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    src, model, _ = small
    out = str(tmp_path / "out.ome.zarr")
    with pytest.raises(ValueError, match="--device cuda: not usable here"):
        pipeline.enhance(src, out, model, device="cuda", **SYNC)
    with pytest.raises(ValueError, match="not a torch device"):
        pipeline.enhance(src, out, model, device="potato", **SYNC)
    assert not os.path.exists(out)


# --------------------------------------------------------------------------- the output lock (issue 14.1, 14.9)


_HOLDER = textwrap.dedent("""
    import sys, time
    from svision_big.state import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_of_a_live_run_refuses_naming_its_owner_and_break_lock_takes_it(small, tmp_path, capsys):
    src, model, _ = small
    out = str(tmp_path / "out.ome.zarr")
    lock = os.path.join(out, "svision_state", "lock")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lock], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            OutputLocked,
            match=rf"being written by another run \(pid {holder.pid} on "
            rf"{socket.gethostname()}, started .*--break-lock",
        ):
            pipeline.enhance(src, out, model, **SYNC)
        assert sorted(_tree(out)) == ["svision_state", "svision_state/lock"]  # nothing written beside the lock
        rc = cli_main(["enhance", src, out, "--model", str(tmp_path / "m.svb"), "--scheduler", "sync", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0]
        pipeline.enhance(src, out, model, break_lock=True, **SYNC)
        assert "breaking the lock" in capsys.readouterr().err
        assert open_image(out).group.attrs["svision_big"]["state"] == "complete"
        assert not os.path.exists(lock)  # released at the end
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(small, tmp_path, capsys):
    src, model, _ = small
    out = str(tmp_path / "out.ome.zarr")
    os.makedirs(os.path.join(out, "svision_state"))
    dead = _dead_pid()
    with open(os.path.join(out, "svision_state", "lock"), "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": dead, "started": "2026-01-01T00:00:00", "token": "x"}, fh)
    pipeline.enhance(src, out, model, **SYNC)
    assert f"taking over the stale lock of pid {dead}" in capsys.readouterr().err
    assert open_image(out).group.attrs["svision_big"]["state"] == "complete"
    # another host's lock is never taken over: only --break-lock does
    out2 = str(tmp_path / "out2.ome.zarr")
    os.makedirs(os.path.join(out2, "svision_state"))
    with open(os.path.join(out2, "svision_state", "lock"), "w") as fh:
        json.dump({"host": "elsewhere.example", "pid": dead, "started": "2026-01-01T00:00:00", "token": "y"}, fh)
    with pytest.raises(OutputLocked, match="elsewhere.example"):
        pipeline.enhance(src, out2, model, **SYNC)
    pipeline.enhance(src, out2, model, break_lock=True, **SYNC)
    _assert_same_image(out, out2)
    # a dead run's pid, reused by a live unrelated process (another start time): stale (issue 27.4)
    out3 = str(tmp_path / "out3.ome.zarr")
    os.makedirs(os.path.join(out3, "svision_state"))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"host": socket.gethostname(), "pid": live.pid, "pid_start": 1, "started": "2026-01-01", "token": "z"}
        with open(os.path.join(out3, "svision_state", "lock"), "w") as fh:
            json.dump(rec, fh)
        pipeline.enhance(src, out3, model, **SYNC)
        assert f"taking over the stale lock of pid {live.pid}" in capsys.readouterr().err
        _assert_same_image(out, out3)
    finally:
        live.kill()
        live.wait()


def test_lock_is_reentrant_and_released_on_error(tmp_path):
    url = str(tmp_path / "o" / "svision_state" / "lock")
    a = OutputLock(url).acquire()
    assert OutputLock(url).acquire() is a and a.depth == 2  # run -> enhance in one process
    a.release()
    assert os.path.exists(url)
    a.release()
    assert not os.path.exists(tmp_path / "o")  # the folders the lock made go with it


_RACER = textwrap.dedent("""
    import os, sys, time
    from svision_big.cli import main
    go = sys.argv[1]
    while not os.path.exists(go):  # every racer has imported everything: start at one instant
        time.sleep(0.001)
    sys.exit(main(sys.argv[2:]))
""")


def test_two_runs_started_together_into_one_output_one_writes(small, tmp_path):
    src, model, model_path = small
    out = str(tmp_path / "out.ome.zarr")
    ref = str(tmp_path / "ref.ome.zarr")
    args = ["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--block", "8,16,16", "--quiet"]
    go = str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, go, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(3)
    ]
    time.sleep(4.0)  # imports done (about 2 s here)
    open(go, "w").close()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2, 2], results
    for rc, _, err in results:
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "being written by another run (pid " in lines[0], err
    pipeline.enhance(src, ref, model, block=(8, 16, 16), **SYNC)
    _assert_same_image(out, ref)


# --------------------------------------------------------------------------- setup killed at every step (issue 14.2)


_KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from svision_big.pipeline import enhancing
    step = sys.argv[1]
    def hook(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGKILL)
    enhancing._after_setup_step = hook
    from svision_big.cli import main
    sys.exit(main(sys.argv[2:]))
""")

SETUP_STEPS = ["marker", "group", "scratch p0", "level 0", "provenance"]

_TERM_AT_BLOCK = textwrap.dedent("""
    import os, signal, sys
    from svision_big.pipeline import enhancing
    real = enhancing._run_passes
    def passes(jobs, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's scancel, once the lock is held and set-up is done
        return real(jobs, *a, **k)
    enhancing._run_passes = passes
    from svision_big.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_stops_cleanly_releases_the_lock_and_the_rerun_resumes(small, tmp_path):
    """SIGTERM exited 143 silently and left the lock, so a resume on another host was refused
    (issue 27.4): it is handled as Ctrl-C is, with one line that says how to resume."""
    src, model, model_path = small
    out = str(tmp_path / "out.ome.zarr")
    argv = ["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--quiet"]
    p = subprocess.run(
        [sys.executable, "-c", _TERM_AT_BLOCK, *argv], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 143, p.stderr
    assert p.stderr.strip().splitlines() == ["svision-big: stopped by SIGTERM (re-run the same command to resume)"]
    assert not os.path.exists(os.path.join(out, "svision_state", "lock"))
    assert cli_main(argv) == 0
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, **SYNC)
    _assert_same_image(out, ref)


_INT_AT_FIRST_BLOCK = textwrap.dedent("""
    import os, signal, sys, time
    from svision_big import execute
    real = execute.run_block
    def blocks(*a, **k):
        if not os.environ.get("_SENT"):
            os.environ["_SENT"] = "1"
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the worker's tasks run
        time.sleep(0.5)
        return real(*a, **k)
    execute.run_block = blocks
    from svision_big.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_the_in_process_cluster_adds_no_lines_to_a_failure_or_an_interrupt(small, tmp_path):
    """Issue 27.6: with the default (in-process) cluster, distributed printed 8-10 lines ("Compute
    Failed", key, task, traceback) before the one-line error, and Ctrl-C added a "CancelledError"
    warning per running task under "interrupted". Each is one line now."""
    src, _, model_path = small
    vol = smooth_volume((32, 64, 64), seed=5, dtype=np.uint16, scale=900)
    bad = str(write_ome_zarr(vol, str(tmp_path / "bad.ome.zarr"), chunks=(8, 16, 16)))
    open(os.path.join(bad, "0", "c", "1", "0", "1"), "wb").write(b"\x28\xb5\x2f\xfd" + bytes(range(60)))
    out = str(tmp_path / "out.ome.zarr")
    p = subprocess.run(
        [sys.executable, "-m", "svision_big.cli", "enhance", bad, out, "--model", model_path, "--quiet"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "chunk c/1/0/1 cannot be read" in lines[0]
    out2 = str(tmp_path / "out2.ome.zarr")
    argv = ["enhance", src, out2, "--model", model_path, "--block", "16,32,32", "--force", "--quiet"]
    p = subprocess.run(
        [sys.executable, "-c", _INT_AT_FIRST_BLOCK, *argv], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == ["svision-big: interrupted (re-run the same command to resume)"]


def test_the_in_process_cluster_warns_nothing_when_port_8787_is_taken():
    """With another Dask cluster (or another svision-big run) on the machine, every enhance printed
    distributed's "Port 8787 is already in use. / Perhaps you already have a cluster running? /
    Hosting the HTTP server on port N instead" above its own lines: the dashboard was off, but the
    scheduler's HTTP server still took 8787. It takes a free loopback port now."""
    import warnings

    from svision_big.pipeline import cluster

    held = socket.socket()
    try:
        held.bind(("0.0.0.0", 8787))
        held.listen()
    except OSError:
        pass  # already taken on this machine: the case itself
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, owned = cluster._open_cluster(None, 1, None)
            cluster._close(owned, None)
    finally:
        held.close()
    assert [str(w.message) for w in caught if "already in use" in str(w.message)] == []


def test_setup_killed_at_every_step_resumes_to_the_clean_result(small, tmp_path, capsys):
    src, model, model_path = small
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, **SYNC)
    seen = []
    for k, step in enumerate(SETUP_STEPS):
        out = str(tmp_path / f"out{k}.ome.zarr")
        p = subprocess.run(
            [
                sys.executable,
                "-c",
                _KILL_AT,
                step,
                "enhance",
                src,
                out,
                "--model",
                model_path,
                "--scheduler",
                "sync",
                "--quiet",
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == -signal.SIGKILL, p.stderr
        seen.append(tuple(sorted((k, v) for k, v in _tree(out).items() if k != "svision_state/lock")))
        stats = pipeline.enhance(src, out, model, **SYNC)  # the plain re-run: no flag, no manual repair
        assert stats["computed"] == stats["blocks"]
        assert "stale lock" in capsys.readouterr().err  # the killed run's lock was taken over
        _assert_same_image(out, ref)
    assert len(set(seen)) == len(SETUP_STEPS)  # each kill left a different state behind


def test_output_with_provenance_but_no_arrays_resumes(small, tmp_path, monkeypatch):
    """The layout an older version left when killed between its provenance and its arrays
    (every re-run failed with ArrayNotFoundError): the arrays are created on resume."""
    src, model, _ = small
    ref, out = str(tmp_path / "ref.ome.zarr"), str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, ref, model, **SYNC)
    prov = dict(open_image(ref).group.attrs["svision_big"], state="writing level 0")
    for key in ("levels",):
        prov.pop(key, None)

    class Killed(Exception):
        pass

    def stop(step):
        if step == "group":
            raise Killed

    monkeypatch.setattr(enhancing, "_after_setup_step", stop)
    with pytest.raises(Killed):
        pipeline.enhance(src, out, model, **SYNC)
    monkeypatch.undo()
    zarr.open_group(out, mode="r+").attrs["svision_big"] = prov
    assert not os.path.exists(os.path.join(out, "0"))
    pipeline.enhance(src, out, model, **SYNC)
    _assert_same_image(out, ref)


def test_a_user_group_without_our_marker_is_still_refused(small, tmp_path):
    src, model, _ = small
    out = tmp_path / "users.zarr"
    zarr.open_group(str(out), mode="w").create_array("0", shape=(4,), dtype="f4")
    before = _tree(out)
    with pytest.raises(NgffError, match="not an svision-big output"):
        pipeline.enhance(src, str(out), model, **SYNC)
    assert _tree(out) == before


# --------------------------------------------------------------------------- bad data (issue 14.6)


def _with_nans(tmp_path, n: int = 16, name="nan.ome.zarr", **kw) -> tuple[str, np.ndarray]:
    vol = smooth_volume((16, 32, 32), seed=4)
    flat = vol.reshape(-1)
    idx = np.random.default_rng(0).choice(flat.size, n, replace=False)
    flat[idx[: n // 2]] = np.nan
    flat[idx[n // 2 :]] = np.inf
    return _write_input(tmp_path / name, vol, **kw), vol


def test_train_names_the_count_of_nonfinite_voxels_or_fills_them(tmp_path):
    src, _ = _with_nans(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(NgffError, match=r"holds 16 NaN/Inf voxels of 16,384.*--nonfinite fill"):
        pipeline.train(src, 2, steps=2, quiet=True)
    assert time.perf_counter() - t0 < 5  # before training, not after it
    m = pipeline.train(src, (2, 1, 1), steps=2, quiet=True, nonfinite="fill", acquisition="cubic")
    assert all(torch.isfinite(v).all() for s in m.stages for v in s.state.values())


def test_the_python_api_refuses_nonfinite_volumes_naming_the_count():
    """``Model.enhance`` returned 49,799 non-finite voxels for 7 NaN inputs, and ``fit`` with one NaN
    said ``min() arg is an empty sequence`` (issue 27.2, 27.6)."""
    vol = smooth_volume((16, 32, 32), seed=3)
    vol[3, 4, 5:12] = np.nan
    with pytest.raises(ValueError, match="holds 7 NaN/Inf voxels of 16,384"):
        make_model((2, 2, 2), bp=1).enhance(vol)
    vol[3, 4, 5:12] = 0.5
    vol[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="holds 1 NaN/Inf voxels of 16,384"):
        pipeline.fit(vol, factor=2, steps=1, quiet=True)
    vol[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="reaches 1e\\+300, beyond float32's range"):
        pipeline.fit(vol.astype(np.float64) * 1e300, factor=2, steps=1, quiet=True)


def test_a_models_saturation_ceiling_is_not_applied_to_data_above_it(tmp_path, capsys):
    """A ceiling belongs to the training data: a model trained where the detector clipped at 255
    clipped 97.8% of uint16 data to 255 (issue 27.2). Data above it: not applied, with a note;
    data within it: applied."""
    from dataclasses import replace

    from svision_big.model import Model

    base = make_model((2, 2, 2), bp=1, hi=4000.0)
    model = Model(stages=base.stages, norm=replace(base.norm, ceiling=255.0), factors=base.factors)
    src = _write_input(tmp_path / "in16.ome.zarr", smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=4000))
    out = str(tmp_path / "o16.ome.zarr")
    pipeline.enhance(src, out, model, **SYNC)
    assert "saturation ceiling 255 is not" in capsys.readouterr().err
    y = np.asarray(open_image(out).level(0)[...])
    assert y.max() > 3000 and np.mean(y == 255) < 0.01
    assert open_image(out).group.attrs["svision_big"]["normalisation"][0]["ceiling"] is None
    src8 = _write_input(tmp_path / "in8.ome.zarr", smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=250))
    out8 = str(tmp_path / "o8.ome.zarr")
    pipeline.enhance(src8, out8, model, dtype="float32", **SYNC)
    assert float(np.asarray(open_image(out8).level(0)[...]).max()) <= 255.0
    assert open_image(out8).group.attrs["svision_big"]["normalisation"][0]["ceiling"] == 255.0


def test_a_large_offset_keeps_the_signal_in_blocks_and_in_memory(tmp_path):
    """A uint32 input of 3e9 plus a 0-1000 signal came out with 7 levels, errors up to 393: float32
    cannot hold the offset beside the signal (issue 27.2). The offset is subtracted, and added back,
    in float64: the result equals the offset-free run's plus the offset (to rounding), blockwise."""
    from svision_big.model import Model
    from svision_big.values import Normalisation

    sig = np.round(smooth_volume((16, 32, 32), seed=3, scale=1000)).astype(np.float64)  # + 3e9 exactly
    base = make_model((2, 2, 2), bp=1, final_bp=0)
    wide = Model(stages=base.stages, norm=Normalisation(3e9, 3e9 + 1000, 3e9), factors=base.factors)
    plain = Model(stages=base.stages, norm=Normalisation(0.0, 1000.0, 0.0), factors=base.factors)
    src = _write_input(tmp_path / "in.ome.zarr", (sig + 3e9).astype(np.uint32))
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, wide, block=(8, 16, 16), **SYNC)
    y = np.asarray(open_image(out).level(0)[...]).astype(np.int64) - 3_000_000_000
    ref = plain.enhance(sig.astype(np.float32), dtype="float64")
    assert np.abs(y - ref).max() <= 1.0 and len(np.unique(y)) > 500
    assert np.abs(wide.enhance((sig + 3e9).astype(np.uint32)).astype(np.int64) - 3_000_000_000 - ref).max() <= 1.0


def _xyz_image(path, vol_zyx) -> str:
    """An NGFF 0.5 image that stores its spatial axes as x, y, z (write_ome_zarr always writes z, y, x)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = np.ascontiguousarray(vol_zyx.transpose(2, 1, 0))
    arr = root.create_array("0", shape=a.shape, dtype=a.dtype, chunks=a.shape, dimension_names=["x", "y", "z"])
    arr[...] = a
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "xyz"]
    ds = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.5, 2.0]}]}]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": ds}]}
    return str(path)


def test_factors_and_blocks_go_by_axis_name_not_position(tmp_path):
    """``--factor 1,2,2`` and ``--block`` are Z,Y,X whatever order the image stores its axes in: on an
    image stored x, y, z the factor upsampled z and left x alone (issue 27.2)."""
    src = _xyz_image(tmp_path / "xyz.ome.zarr", smooth_volume((12, 24, 20), seed=1, dtype=np.uint16, scale=1000))
    assert open_image(src).shape == (20, 24, 12)
    model = pipeline.train(src, (1, 2, 2), steps=2, quiet=True, acquisition="cubic")
    assert model.factors == (2, 2, 1)  # x, y, z
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, model, block=(12, 16, 16), **SYNC)
    assert open_image(out).shape == (40, 48, 12)
    assert open_image(out).group.attrs["svision_big"]["block"] == [16, 16, 12]
    stats = pipeline.run(src, str(tmp_path / "run.ome.zarr"), (1, 2, 2), steps=2, quiet=True, scheduler="sync")
    assert open_image(str(tmp_path / "run.ome.zarr")).shape == (40, 48, 12) and stats["computed"] > 0


def test_run_retrains_over_a_half_written_model_in_its_state(tmp_path, monkeypatch, capsys):
    """After a full disk, `run` left a truncated models-<key>/c0.svb, and every re-run, even with
    --overwrite, failed with "not a readable svision-big model file" (issue 27.3). Models are now
    written whole and renamed; one left half-written by an older version is trained again."""
    import glob

    src = _write_input(tmp_path / "in.ome.zarr", smooth_volume((12, 24, 24), seed=9, dtype=np.uint16, scale=800))
    out = str(tmp_path / "out.ome.zarr")
    real = running.enhance_with

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "enhance_with", stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(src, out, 2, steps=2, quiet=True, acquisition="cubic", scheduler="sync")
    (saved,) = glob.glob(os.path.join(out, "svision_state", "models-*", "c0.svb"))
    assert not glob.glob(saved + ".part")
    data = open(saved, "rb").read()
    open(saved, "wb").write(data[: len(data) // 3])
    monkeypatch.setattr(running, "enhance_with", real)
    stats = pipeline.run(src, out, 2, steps=2, quiet=True, acquisition="cubic", scheduler="sync")
    assert "training channel 0 again" in capsys.readouterr().err
    assert stats["computed"] > 0 and open_image(out).group.attrs["svision_big"]["state"] == "complete"


def test_enhance_refuses_nonfinite_input_or_fills_and_counts_them(small, tmp_path, monkeypatch):
    _, model, _ = small
    src, vol = _with_nans(tmp_path)
    out = str(tmp_path / "out.ome.zarr")
    with pytest.raises(NgffError, match="16 NaN/Inf voxels on level"):
        pipeline.enhance(src, out, model, **SYNC)
    assert not os.path.exists(out)  # found before anything was written
    # the blocks check every voxel they read, also where the coarse check does not look
    monkeypatch.setattr(request, "_check_coarse_finite", lambda *a: None)
    with pytest.raises(ValueError, match=r"NaN/Inf voxels in the region block \d+ reads.*--nonfinite fill"):
        pipeline.enhance(src, out, model, block=(16, 32, 32), **SYNC)
    monkeypatch.undo()
    filled = str(tmp_path / "filled.ome.zarr")
    stats = pipeline.enhance(src, filled, model, block=(16, 32, 32), nonfinite="fill", **SYNC)
    assert stats["input_nonfinite"] == 16  # each voxel once, though the blocks' halos overlap
    assert open_image(filled).group.attrs["svision_big"]["input_nonfinite"] == 16
    clean = _write_input(tmp_path / "zeroed.ome.zarr", np.where(np.isfinite(vol), vol, 0).astype(np.float32))
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(clean, ref, model, block=(16, 32, 32), **SYNC)
    _assert_same_image(filled, ref)
    assert all(np.isfinite(lvl).all() for lvl in _levels(filled))


def _chunked_input(tmp_path, name="chunked.ome.zarr") -> str:
    """16x32x32 in 8x16x16 chunks: eight chunks on level 0."""
    return str(
        write_ome_zarr(
            smooth_volume((16, 32, 32), seed=5, dtype=np.uint16, scale=900),
            str(tmp_path / name),
            voxel_size=(2.0, 0.5, 0.5),
            chunks=(8, 16, 16),
        )
    )


def test_missing_input_chunks_are_counted_warned_and_refused_under_strict(small, tmp_path, capsys):
    _, model, _ = small
    src = _chunked_input(tmp_path)
    chunk = os.path.join(src, "0", "c", "1", "0", "1")
    assert os.path.exists(chunk)
    os.remove(chunk)
    out = str(tmp_path / "strict.ome.zarr")
    with pytest.raises(ValueError, match=r"chunks?.*c/1/0/1 is missing.*needed by block"):
        pipeline.enhance(src, out, model, strict=True, block=(16, 32, 32), **SYNC)
    out = str(tmp_path / "out.ome.zarr")
    stats = pipeline.enhance(src, out, model, block=(16, 32, 32), **SYNC)
    err = capsys.readouterr().err
    assert "warning: 1 chunks of" in err and "c/1/0/1" in err and "--strict" in err
    assert stats["input_missing_chunks"] == 1
    prov = open_image(out).group.attrs["svision_big"]
    assert prov["input_missing_chunks"] == 1 and prov["input_missing_examples"] == ["c/1/0/1"]


# --------------------------------------------------------------------------- summary and state (issue 14.10, 11.4)


def test_summary_counts_every_pass_after_a_resume(small, tmp_path, capsys):
    src, model, model_path = small
    out = str(tmp_path / "out.ome.zarr")
    calls = []

    def stop_after_three(i):
        calls.append(i)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.enhance(src, out, model, block=(8, 16, 16), on_block=stop_after_three, **SYNC)
    rc = cli_main(["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--block", "8,16,16"])
    assert rc == 0
    text = capsys.readouterr().out
    # pass 1 (network, 64 blocks) finished in the first run, 3 blocks of pass 2 (64) too
    assert (
        "61 blocks computed, 67 already done over 2 pass(es) (pass 1: 0 computed, 64 done; "
        "pass 2: 61 computed, 3 done)" in text
    )


def test_a_complete_output_holds_no_run_state_and_records_the_input_absolutely(tmp_path, monkeypatch):
    vol = smooth_volume((12, 24, 24), seed=9, dtype=np.uint16, scale=800)
    _write_input(tmp_path / "in.ome.zarr", vol)
    monkeypatch.chdir(tmp_path)
    stats = pipeline.run(
        "in.ome.zarr", "out.ome.zarr", 2, steps=2, quiet=True, acquisition="cubic", **{"scheduler": "sync"}
    )
    out = tmp_path / "out.ome.zarr"
    prov = open_image(str(out)).group.attrs["svision_big"]
    assert prov["input"] == str(tmp_path / "in.ome.zarr")
    state = sorted(_tree(out / "svision_state")) if (out / "svision_state").exists() else []
    assert not [n for n in state if n.startswith(("done-", "work-", "setup", "lock"))], state
    kept = pipeline.load_model(out / "svision_model.svb")
    assert [kept.hash] == prov["model_hash"] and stats["models"] == ["out.ome.zarr/svision_model.svb"]
    # a second `run` finds it complete: no training, nothing written
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained again"))
    before = _tree(out)
    again = pipeline.run("in.ome.zarr", "out.ome.zarr", 2, steps=2, quiet=True, acquisition="cubic", scheduler="sync")
    assert again["state"] == "already complete" and _tree(out) == before
    for spelling in ("./in.ome.zarr", f"file://{tmp_path}/in.ome.zarr/"):  # one input, however spelled (issue 27.3)
        again = pipeline.run(spelling, "out.ome.zarr", 2, steps=2, quiet=True, acquisition="cubic", scheduler="sync")
        assert again["state"] == "already complete" and _tree(out) == before


# --------------------------------------------------------------------------- what --overwrite may delete (issue 27.1)


def test_a_home_relative_spelling_of_the_input_is_the_input(small, tmp_path, monkeypatch, capsys):
    """``~/in.ome.zarr`` names the input as ``$HOME/in.ome.zarr`` does: refused, input untouched."""
    src, _, mpath = small
    monkeypatch.setenv("HOME", str(tmp_path))
    before = _tree(src)
    for argv in (
        ["enhance", "~/in.ome.zarr", src, "--model", mpath, "--overwrite"],
        ["enhance", src, "~/in.ome.zarr", "--model", mpath, "--overwrite"],
        ["run", "~/in.ome.zarr", f"file://{src}", "--factor", "2", "--steps", "1", "--overwrite"],
    ):
        assert cli_main(argv) == 2
        assert "must not be the input" in capsys.readouterr().err
        assert _tree(src) == before


def test_overwrite_replaces_only_svision_outputs_and_overwrite_any_the_rest(small, tmp_path):
    src, model, _ = small
    plain = _write_input(tmp_path / "plain.ome.zarr", smooth_volume((8, 16, 16), seed=1, dtype=np.uint16))
    before = _tree(plain)
    with pytest.raises(NgffError, match="not an svision-big output.*--overwrite-any"):
        pipeline.enhance(src, plain, model, overwrite=True, **SYNC)
    assert _tree(plain) == before
    pipeline.enhance(src, plain, model, overwrite="any", **SYNC)
    assert open_image(plain).shape == (32, 64, 64)
    pipeline.enhance(src, plain, model, block=(16, 32, 32), overwrite=True, **SYNC)  # now ours: --overwrite does
    assert open_image(plain).group.attrs["svision_big"]["block"] == [16, 32, 32]


def test_overwrite_refuses_to_delete_the_model_it_runs_with(small, tmp_path):
    src, model, _ = small
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, model, **SYNC)
    inside = str(model.save(os.path.join(out, "svision_model.svb")))
    before = _tree(out)
    with pytest.raises(NgffError, match="lies inside the output.*move the model out"):
        pipeline.enhance(src, out, inside, block=(16, 32, 32), overwrite=True, **SYNC)
    assert _tree(out) == before
    assert pipeline.enhance(src, out, inside, **SYNC)["state"] == "already complete"  # a resume deletes nothing


def test_a_users_file_in_the_state_folder_survives_every_run(small, tmp_path):
    """Cleaning up a complete output removes the state svision-big wrote, nothing else."""
    src, model, _ = small
    out = tmp_path / "out.ome.zarr"
    (out / "svision_state").mkdir(parents=True)
    (out / "svision_state" / "notes.txt").write_text("mine")
    pipeline.enhance(src, str(out), model, **SYNC)
    pipeline.enhance(src, str(out), model, **SYNC)  # already complete: cleans leftovers
    assert (out / "svision_state" / "notes.txt").read_text() == "mine"
    with pytest.raises(NgffError, match="svision_state/notes.txt.*refusing to delete anything"):
        pipeline.enhance(src, str(out), model, block=(16, 32, 32), overwrite=True, **SYNC)
    assert (out / "svision_state" / "notes.txt").read_text() == "mine"


def test_demo_refuses_to_replace_an_earlier_demo_without_overwrite(tmp_path, capsys):
    (tmp_path / "demo_result.json").write_text('{"mine": 1}')
    assert cli_main(["demo", str(tmp_path), "--steps", "1"]) == 2
    assert "demo_result.json already exists" in capsys.readouterr().err
    assert (tmp_path / "demo_result.json").read_text() == '{"mine": 1}' and sorted(os.listdir(tmp_path)) == [
        "demo_result.json"
    ]


# --------------------------------------------------------------------------- model-file integrity (issue 14.4)


def _resave(path, edit) -> str:
    """Re-save a model file through torch (valid zip CRCs) after ``edit(obj)``: what a tamperer does."""
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)
    return str(path)


def _biggest_record(path) -> tuple[int, int]:
    """(offset, size) of the largest record's data in a model archive (a weight tensor)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        n, m = np.frombuffer(fh.read(4), dtype="<u2")
    return info.header_offset + 30 + int(n) + int(m), info.compress_size


def test_model_with_flipped_weight_bytes_is_refused_naming_the_file(tmp_path):
    from svision_big.model import ModelFileError, load_model

    path = make_model((2, 2, 2), bp=1).save(tmp_path / "m.svb")
    off, size = _biggest_record(path)
    assert size >= 128
    data = bytearray(open(path, "rb").read())
    data[off + size // 2 : off + size // 2 + 64] = bytes(b ^ 0xFF for b in data[off + size // 2 : off + size // 2 + 64])
    open(path, "wb").write(bytes(data))
    with pytest.raises(ModelFileError, match=rf"^{path} is corrupt: record .* fails its checksum"):
        load_model(path)


def test_model_with_edited_weights_or_header_is_refused(tmp_path):
    from svision_big.model import ModelFileError, load_model

    good = make_model((2, 2, 2), bp=1)

    def flip_weight(obj):
        t = next(iter(obj["weights"][0].values()))
        t.view(-1)[:16] += 1.0

    p = _resave(good.save(tmp_path / "w.svb"), flip_weight)
    with pytest.raises(ModelFileError, match=rf"^{p} is corrupt or was modified.*digest"):
        load_model(p)

    def edit_factors(obj):
        head = json.loads(obj["header"])
        head["factors"] = [4, 4, 4]
        obj["header"] = json.dumps(head)

    p = _resave(good.save(tmp_path / "f.svb"), edit_factors)
    with pytest.raises(ModelFileError, match="digest"):
        load_model(p)
    # the same edit in a file without a digest (older files): the stages give it away
    p = _resave(good.save(tmp_path / "f2.svb"), lambda o: (edit_factors(o), o.pop("digest")))
    with pytest.raises(ModelFileError, match=r"header says factors \(4, 4, 4\) but its stages make \(2, 2, 2\)"):
        load_model(p)
    plain = _resave(good.save(tmp_path / "plain.svb"), lambda o: o.pop("digest"))
    assert load_model(plain).hash == good.hash  # a file without a digest that is intact still loads


def test_model_header_sizes_are_checked_before_anything_is_allocated(tmp_path):
    from svision_big.model import ModelFileError, load_model

    good = make_model((2, 2, 2), bp=1)

    def features(n):
        def edit(obj):
            head = json.loads(obj["header"])
            head["stages"][0]["config"]["features"] = n
            obj["header"] = json.dumps(head)
            obj.pop("digest")

        return edit

    p = _resave(good.save(tmp_path / "big.svb"), features(2000))
    with pytest.raises(ModelFileError, match=r"stage 0 asks for features=2000, outside 0\.\.512"):
        load_model(p)
    p = _resave(good.save(tmp_path / "mid.svb"), features(400))  # plausible size, but not these weights
    t0 = time.perf_counter()
    with pytest.raises(
        ModelFileError,
        match=r"stage 0's header does not match its weights \(body.0.weight: "
        r"header \(400, 1, 5, 5, 5\), weights \(16, 1, 5, 5, 5\)\)",
    ):
        load_model(p)
    assert time.perf_counter() - t0 < 2.0

    def huge_header(obj):
        head = json.loads(obj["header"])
        head["info"] = {"pad": "x" * (2 << 20)}
        obj["header"] = json.dumps(head)
        obj.pop("digest")

    p = _resave(good.save(tmp_path / "pad.svb"), huge_header)
    with pytest.raises(ModelFileError, match="byte header"):
        load_model(p)


# --------------------------------------------------------------------------- CLI error sweep (issue 14.7)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    _write_input(d / "in.ome.zarr", smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000))
    _write_input(d / "tiny.ome.zarr", smooth_volume((3, 5, 5), seed=3, dtype=np.uint16, scale=1000))
    _with_nans(d, name="nan.ome.zarr")
    good = make_model((2, 2, 2), bp=1)
    good.save(d / "m.svb")
    make_model((2, 2), bp=0).save(d / "m2d.svb")
    (d / "garbage.svb").write_bytes(b"not a model")
    path = good.save(d / "flipped.svb")
    off, size = _biggest_record(path)
    data = bytearray(open(path, "rb").read())
    data[off + size // 2 : off + size // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(data))
    (d / "modeldir.svb").mkdir()
    (d / "theirs").mkdir()
    (d / "theirs" / "zarr.json").write_text("{}")
    (d / "theirs" / "thesis.docx").write_bytes(b"years")
    (d / "image.tif").write_bytes(b"II*\x00garbage")
    os.symlink(d / "in.ome.zarr", d / "link.ome.zarr")
    _write_input(d / "plain.ome.zarr", smooth_volume((16, 32, 32), seed=4, dtype=np.uint16, scale=1000))
    for name, edit in _BAD_COORDINATES.items():  # copies of the input with damaged coordinate metadata
        shutil.copytree(d / "in.ome.zarr", d / f"{name}.ome.zarr")
        g = zarr.open_group(str(d / f"{name}.ome.zarr"), mode="r+")
        ome = json.loads(json.dumps(g.attrs["ome"]))
        edit(ome["multiscales"][0])
        g.attrs["ome"] = ome
    import tifffile

    tifffile.imwrite(d / "vol.tif", smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000))
    os.mkfifo(f"{d}_fifo.svb")  # beside the folder: hashing the folder's files would block on it
    _write_input(d / "huge.ome.zarr", smooth_volume((16, 32, 32), seed=5).astype(np.float64) * 1e300)
    _write_input(d / "big32.ome.zarr", smooth_volume((16, 32, 32), seed=6, dtype=np.int32, scale=1e6))
    return d


def _scale0(ms, value=0.0):
    ms["datasets"][0]["coordinateTransformations"][0]["scale"][0] = value


_BAD_COORDINATES = {  # issue 27.5: each was accepted (exit 0), NaN and Infinity written as non-standard JSON
    "scale0": _scale0,
    "scaleneg": lambda ms: _scale0(ms, -1.0),
    "scalenan": lambda ms: _scale0(ms, float("nan")),
    "scaleinf": lambda ms: _scale0(ms, float("inf")),
    "dupaxes": lambda ms: ms["axes"][1].update(name="x"),
    "numunit": lambda ms: ms["axes"][0].update(unit=5),
    "twoscales": lambda ms: ms["datasets"][0]["coordinateTransformations"].append(
        dict(ms["datasets"][0]["coordinateTransformations"][0])
    ),
}

_SWEEP = [  # (what, argv with {d} for the fixture folder): each must be exit 2, one line, nothing changed
    *[
        (f"coordinates {n}", f"enhance {{d}}/{n}.ome.zarr {{d}}/o_{n} --model {{d}}/m.svb --scheduler sync")
        for n in _BAD_COORDINATES
    ],
    ("missing input", "enhance {d}/nope.ome.zarr {d}/o --model {d}/m.svb --scheduler sync"),
    ("workers -1", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --workers -1"),
    ("workers 0", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --workers 0"),
    ("block 0", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block 0"),
    ("block -8", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block -8"),
    ("block not a multiple", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block 7,16,16"),
    ("block two entries", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block 8,16"),
    ("block words", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block a,b"),
    ("block below halo", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --block 2,2,2"),
    ("dtype bogus", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --dtype bogus"),
    ("dtype complex", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --dtype complex64"),
    ("device cuda", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --device cuda"),
    ("device potato", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --device potato"),
    ("channel without axis", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --channel 5"),
    ("model is a folder", "enhance {d}/in.ome.zarr {d}/o --model {d}/modeldir.svb --scheduler sync"),
    ("model missing", "enhance {d}/in.ome.zarr {d}/o --model {d}/nope.svb --scheduler sync"),
    ("model a fifo", "enhance {d}/in.ome.zarr {d}/o --model {d}_fifo.svb --scheduler sync"),
    ("model /dev/zero", "enhance {d}/in.ome.zarr {d}/o --model /dev/zero --scheduler sync"),
    ("model garbage", "enhance {d}/in.ome.zarr {d}/o --model {d}/garbage.svb --scheduler sync"),
    ("model flipped bytes", "enhance {d}/in.ome.zarr {d}/o --model {d}/flipped.svb --scheduler sync"),
    ("model 2D on 3D", "enhance {d}/in.ome.zarr {d}/o --model {d}/m2d.svb --scheduler sync"),
    ("two models, one channel", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --model {d}/m.svb --scheduler sync"),
    ("output is the input", "enhance {d}/in.ome.zarr {d}/in.ome.zarr --model {d}/m.svb --scheduler sync"),
    ("output inside the input", "enhance {d}/in.ome.zarr {d}/in.ome.zarr/x --model {d}/m.svb --scheduler sync"),
    # every spelling of the input as the output (issue 27.1): refused before anything is opened for writing
    ("file:// input is the output", "enhance file://{d}/in.ome.zarr {d}/in.ome.zarr --model {d}/m.svb --overwrite"),
    ("file:// output is the input", "enhance {d}/in.ome.zarr file://{d}/in.ome.zarr --model {d}/m.svb --overwrite"),
    ("file:// output inside", "enhance file://{d}/in.ome.zarr {d}/in.ome.zarr/sub --model {d}/m.svb --scheduler sync"),
    (
        "file://localhost output",
        "enhance {d}/in.ome.zarr file://localhost{d}/in.ome.zarr --model {d}/m.svb --overwrite",
    ),
    ("dot-dot output is the input", "enhance {d}/in.ome.zarr {d}/theirs/../in.ome.zarr/ --model {d}/m.svb --overwrite"),
    ("symlink output is the input", "enhance {d}/in.ome.zarr {d}/link.ome.zarr --model {d}/m.svb --overwrite"),
    ("output contains the input", "enhance {d}/in.ome.zarr file://{d} --model {d}/m.svb --overwrite"),
    ("run file:// output is the input", "run file://{d}/in.ome.zarr {d}/in.ome.zarr --factor 2 --steps 1 --overwrite"),
    ("run symlink output is the input", "run {d}/link.ome.zarr {d}/in.ome.zarr/ --factor 2 --steps 1 --overwrite"),
    ("overwrite a plain image", "enhance {d}/in.ome.zarr {d}/plain.ome.zarr --model {d}/m.svb --overwrite"),
    ("run overwrite a plain image", "run {d}/in.ome.zarr {d}/plain.ome.zarr --factor 2 --steps 1 --overwrite"),
    # values the working precision or the output type cannot hold (issue 27.2)
    ("float64 beyond float32", "enhance {d}/huge.ome.zarr {d}/o --model {d}/m.svb --scheduler sync"),
    ("run float64 beyond float32", "run {d}/huge.ome.zarr {d}/o --factor 2 --steps 1 --scheduler sync"),
    ("dtype float16 too narrow", "enhance {d}/big32.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --dtype float16"),
    ("output holds user files", "enhance {d}/in.ome.zarr {d}/theirs --model {d}/m.svb --scheduler sync --overwrite"),
    ("output not ours", "enhance {d}/in.ome.zarr {d}/theirs --model {d}/m.svb --scheduler sync"),
    ("nan input", "enhance {d}/nan.ome.zarr {d}/o --model {d}/m.svb --scheduler sync"),
    ("shards on 0.4", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --shards --ngff 0.4"),
    ("ngff 0.3", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --ngff 0.3"),
    (
        "precision float16 on cpu",
        "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --precision float16 --device cpu",
    ),
    (
        "storage options not json",
        "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --storage-options {{x",
    ),
    (
        "storage options a list",
        "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --storage-options [1]",
    ),
    ("no --model", "enhance {d}/in.ome.zarr {d}/o --scheduler sync"),
    ("sync and workers", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --workers 2"),
    ("unknown flag", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --bogus"),
    ("train into no folder", "train {d}/in.ome.zarr -o {d}/nodir/m.svb --factor 2 --steps 1"),
    ("train onto a folder", "train {d}/in.ome.zarr -o {d}/modeldir.svb --factor 2 --steps 1"),
    ("train a tiff over a model", "train {d}/vol.tif -o {d}/m.svb --factor 2 --steps 1"),
    ("train over a model", "train {d}/in.ome.zarr -o {d}/m.svb --factor 2 --steps 1"),
    ("train factor 3", "train {d}/in.ome.zarr -o {d}/new.svb --factor 3 --steps 1"),
    ("train factor 0", "train {d}/in.ome.zarr -o {d}/new.svb --factor 0 --steps 1"),
    ("train too small", "train {d}/tiny.ome.zarr -o {d}/new.svb --factor 2 --steps 1"),
    ("train steps 0", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --steps 0"),
    ("train budget 0", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --budget 0"),
    ("train channel 5", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --channel 5"),
    ("train negative psf", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --psf-fwhm -1"),
    ("train nan input", "train {d}/nan.ome.zarr -o {d}/new.svb --factor 2 --steps 1"),
    ("train psf nan", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --steps 1 --psf-fwhm nan"),
    ("train seed too large", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --steps 1 --seed 1000000000000000000000"),
    ("device meta", "enhance {d}/in.ome.zarr {d}/o --model {d}/m.svb --scheduler sync --device meta"),
    ("train denoise bogus", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --steps 1 --denoise maybe"),
    ("run denoise bogus", "run {d}/in.ome.zarr {d}/o --factor 2 --steps 1 --denoise maybe"),
    ("train nonfinite bogus", "train {d}/in.ome.zarr -o {d}/new.svb --factor 2 --nonfinite keep"),
    ("run workers -1", "run {d}/in.ome.zarr {d}/o --factor 2 --steps 1 --workers -1"),
    ("run dtype bogus", "run {d}/in.ome.zarr {d}/o --factor 2 --steps 1 --dtype bogus --scheduler sync"),
    ("run too small", "run {d}/tiny.ome.zarr {d}/o --factor 2 --steps 1 --scheduler sync"),
    ("run into user files", "run {d}/in.ome.zarr {d}/theirs --factor 2 --steps 1 --scheduler sync"),
    ("compare channel without axis", "compare {d}/plain.ome.zarr {d}/in.ome.zarr --channel 3 --png {d}/c.png"),
    ("compare time without axis", "compare {d}/plain.ome.zarr {d}/in.ome.zarr --time 2 --png {d}/c.png"),
    ("info missing", "info {d}/nope.ome.zarr"),
    ("convert missing", "convert {d}/nope.tif {d}/o"),
    ("convert garbage tiff", "convert {d}/image.tif {d}/o"),
    ("no command", ""),
]


@pytest.mark.parametrize("what,argv", _SWEEP, ids=[w for w, _ in _SWEEP])
def test_every_bad_invocation_is_one_line_exit_2_and_changes_nothing(sweep, what, argv, capsys):
    if what == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = _tree(sweep)
    try:
        rc = cli_main(argv.format(d=sweep).split())
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (what, err)
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], (what, err)
    assert _tree(sweep) == before, what  # the input, the models and the other folders: unchanged, nothing created


# --------------------------------------------------------------------------- corrupt input chunk (issue 14.8)


def test_corrupt_input_chunk_is_named_retried_then_resumes_after_repair(small, tmp_path, monkeypatch, capsys):
    from svision_big import engine, execute

    _, model, model_path = small
    src = _chunked_input(tmp_path)
    chunk = os.path.join(src, "0", "c", "1", "0", "1")
    good = open(chunk, "rb").read()
    open(chunk, "wb").write(b"\x28\xb5\x2f\xfd" + bytes(range(60)))  # a codec header, then garbage
    out = str(tmp_path / "out.ome.zarr")
    monkeypatch.setattr(execute, "RETRY_DELAY_S", 0.0)
    calls = []
    real_open = engine.open_array

    def counting(url, path, *a, **k):
        calls.append((url, path, k.get("writable", a[1] if len(a) > 1 else None)))
        return real_open(url, path, *a, **k)

    monkeypatch.setattr(engine, "open_array", counting)
    with pytest.raises(
        OSError,
        match=rf"{src}/0: chunk c/1/0/1 cannot be read \(.*\), needed by block \d+ of .*"
        rf"stopped after 3 attempts",
    ):
        pipeline.enhance(src, out, model, block=(8, 16, 16), **SYNC)
    assert calls[-3:] == [(src, "0", False)] * 3 and calls[-4][2] is True  # 3 reads of the failing block, no more
    monkeypatch.undo()
    done_dir = [d for d in os.listdir(os.path.join(out, "svision_state")) if d.startswith("done-")][0]
    done = os.listdir(os.path.join(out, "svision_state", done_dir, "p0"))
    assert 0 < len(done) < 64  # the blocks finished before the bad chunk keep their records
    rc = cli_main(["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--block", "8,16,16", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "chunk c/1/0/1 cannot be read" in err[0]
    assert len(os.listdir(os.path.join(out, "svision_state", done_dir, "p0"))) == len(done)  # still there
    open(chunk, "wb").write(good)  # repaired
    stats = pipeline.enhance(src, out, model, block=(8, 16, 16), **SYNC)
    assert stats["total"]["skipped"] == len(done) and stats["total"]["computed"] == 128 - len(done)
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, block=(8, 16, 16), **SYNC)
    _assert_same_image(out, ref)


def test_a_damaged_chunk_met_before_compute_is_named_in_one_line_and_nothing_is_written(small, tmp_path, capsys):
    """The checks before compute (the coarsest level's finite check, the input digest, the training
    sample, compare's read) met a damaged chunk as "error during blosc decompression: -1": now one line
    names the array and the chunk, for enhance, run and compare; the input is untouched, no output made."""
    _, _, model_path = small
    vol = smooth_volume((16, 32, 32), seed=6).astype(np.float32)  # float: the finite check reads the data
    src = str(write_ome_zarr(vol, str(tmp_path / "one.ome.zarr"), chunks=(8, 16, 16)))
    assert open_image(src).nlevels == 1  # the check reads level 0 itself
    chunk = os.path.join(src, "0", "c", "1", "0", "1")
    open(chunk, "wb").write(b"garbage")
    before = _tree(src)
    out = str(tmp_path / "out.ome.zarr")
    for argv in (
        ["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--quiet"],
        ["run", src, out, "--factor", "2", "--steps", "1", "--scheduler", "sync", "--quiet"],
        ["compare", src, src, "--quiet"],  # without --quiet its progress line comes first (issue 28.2)
    ):
        rc = cli_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, argv
        assert err == [f"svision-big: error: {src}/0: chunk c/1/0/1 cannot be read ({err[0].split('(', 1)[1]}"], argv
        assert "cannot be read (" in err[0] and err[0].endswith("repair or replace it, then re-run"), argv
        assert not os.path.exists(out), argv
    assert _tree(src) == before


# --------------------------------------------------------------------------- distributed faults (issue 14.10)


def _dask_cluster(tmp_path, name: str) -> tuple[str, list[subprocess.Popen]]:
    """A `dask scheduler` and one single-thread `dask worker`, as a user starts them."""
    dask_bin = os.path.join(os.path.dirname(sys.executable), "dask")
    sfile = str(tmp_path / f"{name}.json")
    logs = open(tmp_path / f"{name}.log", "w")
    procs = [
        subprocess.Popen(
            [dask_bin, "scheduler", "--scheduler-file", sfile, "--port", "0", "--no-dashboard", "--host", "127.0.0.1"],
            env=_env(),
            stdout=logs,
            stderr=logs,
        )
    ]
    deadline = time.time() + 30
    while not os.path.exists(sfile) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    procs.append(
        subprocess.Popen(
            [
                dask_bin,
                "worker",
                "--scheduler-file",
                sfile,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            ],
            env=_env(),
            stdout=logs,
            stderr=logs,
            cwd=str(tmp_path),
        )
    )
    with open(sfile) as fh:
        return json.load(fh)["address"], procs


def _stop(procs) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.kill()
        p.wait()


def test_killed_scheduler_ends_the_client_with_one_line_and_a_new_one_resumes(small, tmp_path):
    src, model, model_path = small
    out = str(tmp_path / "out.ome.zarr")
    args = ["enhance", src, out, "--model", model_path, "--block", "8,16,16", "--quiet"]
    addr, procs = _dask_cluster(tmp_path, "first")
    try:
        env = dict(_env(), DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s")
        client = subprocess.Popen(
            [sys.executable, "-m", "svision_big.cli", *args, "--scheduler", addr],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        state = os.path.join(out, "svision_state")

        def done() -> int:
            dirs = [d for d in os.listdir(state) if d.startswith("done-")] if os.path.isdir(state) else []
            p0 = os.path.join(state, dirs[0], "p0") if dirs else ""
            return len(os.listdir(p0)) if os.path.isdir(p0) else 0

        deadline = time.time() + 60
        while done() < 5 and time.time() < deadline and client.poll() is None:
            time.sleep(0.02)
        procs[0].kill()  # the scheduler
        t0 = time.time()
        _, err = client.communicate(timeout=60)
        ended_after = time.time() - t0
    finally:
        _stop(procs)
    lines = err.strip().splitlines()
    assert client.returncode == 2, err
    assert len(lines) == 1 and "lost the Dask scheduler" in lines[0] and "Traceback" not in err, err
    assert ended_after < 30
    assert zarr.open_group(out, mode="r").attrs["svision_big"]["state"] == "writing level 0"  # cut short
    addr, procs = _dask_cluster(tmp_path, "second")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "svision_big.cli", *args, "--scheduler", addr],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        _stop(procs)
    assert r.returncode == 0, r.stderr
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, block=(8, 16, 16), **SYNC)
    _assert_same_image(out, ref)


def test_worker_killed_by_pid_mid_run_leaves_a_complete_identical_output(small, tmp_path):
    import dask
    from distributed import Client, LocalCluster

    src, model, _ = small
    out, ref = str(tmp_path / "out.ome.zarr"), str(tmp_path / "ref.ome.zarr")
    pipeline.enhance(src, ref, model, block=(8, 16, 16), **SYNC)
    killed = []
    slow_machine = {"distributed.comm.timeouts.connect": "90s", "distributed.deploy.lost-worker-timeout": "90s"}
    with (
        dask.config.set(slow_machine),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, timeout="120s"
        ) as cluster,
        Client(cluster, timeout="120s") as client,
    ):
        pids = client.run(os.getpid)

        def kill_one(i):
            if not killed:  # at the last pass's first finished block, the other worker mid-task
                pid = sorted(pids.values())[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        stats = pipeline.enhance(src, out, model, client=client, block=(8, 16, 16), progress=False, on_block=kill_one)
    assert killed and stats["computed"] == 64
    _assert_same_image(out, ref)


# --------------------------------------------------------------------------- remote stores (issue 11.2)


def test_s3_output_inherits_the_input_options_and_holds_no_state_when_done(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("rel-bucket")
    src, out = "s3://rel-bucket/in.ome.zarr", "s3://rel-bucket/out.ome.zarr"
    write_ome_zarr(smooth_volume((8, 16, 16), seed=2), src, voxel_size=(2, 1, 1), storage_options=s3_server)
    model = make_model((2, 2, 2), bp=0)
    stats = pipeline.enhance(src, out, model, block=(16, 32, 32), storage_options=s3_server, **SYNC)
    assert stats["computed"] == 1 and fs.exists("rel-bucket/out.ome.zarr/zarr.json")
    fs.invalidate_cache()
    left = [p for p in fs.find("rel-bucket/out.ome.zarr") if "/svision_state/" in p]
    assert left == []  # no done-records, scratch, marker or lock once complete
    assert open_image(out, storage_options=s3_server).group.attrs["svision_big"]["input"] == src


def test_sharding_an_ngff_04_output_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """``run --ngff 0.4 --shards`` trained for minutes, then said that NGFF 0.4 cannot shard: the format
    is checked with the other settings, before training, in one line, and nothing is written."""
    src = _write_input(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16), seed=2))
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained before checking the format"))
    out = str(tmp_path / "out.ome.zarr")
    rc = cli_main(["run", src, out, "--factor", "2", "--ngff", "0.4", "--shards", "--scheduler", "sync"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sharding needs NGFF 0.5" in err[0], err
    assert not os.path.exists(out)


def test_unreachable_output_store_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    src = _write_input(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16), seed=2))
    monkeypatch.setattr(running, "train", lambda *a, **k: pytest.fail("trained before checking the output"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    opts = json.dumps(
        {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "k",
            "secret": "s",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
    )
    t0 = time.perf_counter()
    rc = cli_main(
        [
            "run",
            src,
            "s3://bucket/out.ome.zarr",
            "--factor",
            "2",
            "--steps",
            "1",
            "--scheduler",
            "sync",
            "--output-storage-options",
            opts,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot reach the output store s3://bucket/out.ome.zarr" in err[0], err
    assert time.perf_counter() - t0 < 30


def test_wrong_scheduler_address_fails_in_one_line_before_anything_is_written(small, tmp_path, capsys):
    import dask

    src, _, model_path = small
    out = tmp_path / "out.ome.zarr"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        rc = cli_main(["enhance", src, str(out), "--model", model_path, "--scheduler", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not out.exists()  # a wrong --scheduler left a partial output before (issue 14.6)


def test_a_cluster_left_without_workers_ends_the_run_in_one_line(small, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    from svision_big import execute

    src, model, _ = small
    monkeypatch.setattr(execute, "NO_WORKERS_S", 2.0)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        with pytest.raises(execute.ClusterLost, match=r"had no worker for 2 s, after 0 of 64 blocks.*re-run"):
            pipeline.enhance(
                src, str(tmp_path / "out.ome.zarr"), model, client=client, block=(8, 16, 16), progress=False
            )
        assert time.perf_counter() - t0 < 30  # it waited forever before


@pytest.mark.parametrize(
    "volume,kw,message",
    [
        (np.zeros((0, 8, 8), np.float32), {}, "empty array of shape (0, 8, 8)"),
        (np.ones((8, 16, 16), np.float32), {"seed": 10**21}, "seed 1000000000000000000000: use a whole number"),
        (np.ones((8, 16, 16), np.float32), {"seed": -1}, "seed -1: use a whole number"),
    ],
)
def test_fit_refuses_what_it_cannot_use_in_one_line(volume, kw, message):
    """The Python API names the problem (was IndexError 'index -1 is out of bounds' and torch's
    'Overflow when unpacking long long')."""
    import svision_big as svb

    with pytest.raises(ValueError) as err:
        svb.fit(volume, factor=2, quiet=True, **kw)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "omero",
    [
        {"channels": "bad"},
        "not an object",
        {"channels": ["x", {"window": "w", "coefficient": "c", "label": 3}]},
    ],
)
def test_a_malformed_omero_block_does_not_fail_the_run(tmp_path, omero):
    """Rendering hints are carried over where they can be: a malformed input ``omero`` failed only
    after the compute, with AttributeError, on every re-run (issue 27.3). It now reads as absent, the
    run finishes, and the output's own ``omero`` is valid."""
    from svision_big import pipeline
    from svision_big.convert import write_ome_zarr
    from svision_big.ngff import open_image
    from svision_big.testing import make_model

    src = str(tmp_path / "in.ome.zarr")
    write_ome_zarr(np.random.default_rng(0).random((8, 24, 24)).astype(np.float32), src, axes="zyx")
    meta = tmp_path / "in.ome.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["ome"]["omero"] = omero
    meta.write_text(json.dumps(doc))
    before = meta.read_bytes()
    out = str(tmp_path / "out.ome.zarr")
    pipeline.enhance(src, out, make_model((2, 2, 2), bp=0), dtype="float32", scheduler="sync", progress=False)
    channels = open_image(out).omero["channels"]
    assert len(channels) == 1 and float(channels[0]["window"]["end"]) > float(channels[0]["window"]["start"])
    assert isinstance(channels[0]["coefficient"], float) and meta.read_bytes() == before


def test_a_full_disk_is_one_line_naming_the_output_and_how_to_go_on(small, tmp_path, monkeypatch, capsys):
    """`benchmarks/soak_command.py --mode disk` (a tmpfs filled under the running command, then freed)
    found each stop one line, exit 2, no lock left, the re-run resuming to identical levels; but the
    line was "[Errno 28] No space left on device", naming neither the place nor what to do."""
    import errno

    src, _, model_path = small
    out = str(tmp_path / "out.ome.zarr")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "enhance", full)
    rc = cli_main(["enhance", src, out, "--model", model_path, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        f"svision-big: error: no space left on the device for {out} (No space left on device): free space, "
        "then re-run the same command to resume (the finished work is kept)"
    ]


def test_a_missing_coarse_dataset_in_the_input_does_not_fail_the_run(small, tmp_path, capsys):
    """Issue 27.3: a level-1 dataset whose path does not exist must not fail a run that does not need
    it. The absent-chunk check reads the levels above level 0 as a help: a level that does not open
    ends its list (it failed with "KeyError: 'nope'" after the output was set up, once that check
    read every level). Opening that level names it."""
    _, _, model_path = small
    vol = smooth_volume((8, 256, 256), seed=3, dtype=np.uint16, scale=1000)
    src = str(write_ome_zarr(vol, str(tmp_path / "levels.ome.zarr")))
    meta_path = os.path.join(src, "zarr.json")
    meta = json.load(open(meta_path))
    meta["attributes"]["ome"]["multiscales"][0]["datasets"][1]["path"] = "nope"
    json.dump(meta, open(meta_path, "w"))
    img = open_image(src)
    assert img.nlevels >= 3
    with pytest.raises(NgffError, match="dataset 'nope' of .* does not exist"):
        img.level(1)
    out = str(tmp_path / "out.ome.zarr")
    rc = cli_main(["enhance", src, out, "--model", model_path, "--scheduler", "sync", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert open_image(out).level(0).shape == (16, 512, 512)
    # --skip-background reads the levels' shapes too: the missing one is passed over, the same output
    skip = str(tmp_path / "skip.ome.zarr")
    argv = ["enhance", src, skip, "--model", model_path, "--scheduler", "sync", "--quiet", "--skip-background"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert open_image(skip).level(0).shape == (16, 512, 512)
