"""A new user's edges (issues 27, 28): TIFF inputs and their metadata, refusals that name what differs,
sparse inputs that are not missing chunks, messages that name the problem. Each test runs the command
line in process and checks the exit code, the one line on stderr, and what was (not) written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from conftest import smooth_volume
from svision_big.cli import main as cli_main
from svision_big.ngff import open_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.one_torch_thread


def _cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of one command-line call."""
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def _files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def plain_tif(tmp_path):
    """A TIFF that says nothing about its voxels."""
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000))
    return path


# --------------------------------------------------------------------------- TIFF inputs (issue 28.3)


def test_a_tiff_without_voxel_sizes_is_converted_with_a_one_line_warning_naming_the_assumption(
    plain_tif, tmp_path, capsys
):
    rc, _, err = _cli(["convert", plain_tif, tmp_path / "a.ome.zarr"], capsys)
    assert rc == 0
    assert err == [
        f"svision-big: warning: {plain_tif} has no voxel size for z,y,x: assumed 1 micrometer "
        "(give --voxel-size Z,Y,X and --unit)"
    ]
    img = open_image(str(tmp_path / "a.ome.zarr"))
    assert list(img.scales[0]) == [1.0, 1.0, 1.0] and {a["unit"] for a in img.axes} == {"micrometer"}
    rc, _, err = _cli(
        ["convert", plain_tif, tmp_path / "b.ome.zarr", "--voxel-size", "2,0.5,0.5", "--unit", "nm"], capsys
    )
    assert rc == 0 and err == []
    img = open_image(str(tmp_path / "b.ome.zarr"))
    assert list(img.scales[0]) == [2.0, 0.5, 0.5] and {a["unit"] for a in img.axes} == {"nanometer"}


def test_train_and_run_take_voxel_size_and_unit_for_a_tiff_and_refuse_them_for_an_ome_zarr(
    plain_tif, tmp_path, capsys, monkeypatch
):
    from svision_big import pipeline
    from svision_big.testing import make_model

    seen = []
    monkeypatch.setattr(pipeline, "train", lambda input, *a, **k: seen.append(input) or make_model((2, 2, 2)))
    rc, _, err = _cli(
        ["train", plain_tif, "-o", tmp_path / "m.svb", "--factor", "2", "--voxel-size", "3,0.25,0.25", "--unit", "nm"],
        capsys,
    )
    assert rc == 0 and not any("warning" in line for line in err), err
    img = open_image(seen[0])  # the OME-Zarr the TIFF became, beside the model
    assert os.path.dirname(seen[0]) == str(tmp_path)
    assert list(img.scales[0]) == [3.0, 0.25, 0.25] and {a["unit"] for a in img.axes} == {"nanometer"}

    before = _files(tmp_path)
    for cmd in (
        ["train", seen[0], "-o", tmp_path / "n.svb", "--factor", "2", "--voxel-size", "1,1,1"],
        ["run", seen[0], tmp_path / "out.ome.zarr", "--factor", "2", "--unit", "nm"],
    ):
        rc, _, err = _cli(cmd, capsys)
        assert rc == 2 and len(err) == 1 and "only for a TIFF input" in err[0], err
    assert _files(tmp_path) == before


def test_info_and_enhance_on_a_tiff_point_to_convert(plain_tif, tmp_path, capsys):
    from svision_big.testing import make_model

    model = make_model((2, 2, 2)).save(tmp_path / "m.svb")
    before = _files(tmp_path)
    for cmd in (["info", plain_tif], ["enhance", plain_tif, tmp_path / "o.ome.zarr", "--model", model]):
        rc, _, err = _cli(cmd, capsys)
        assert rc == 2 and err == [
            f"svision-big: error: {plain_tif} is a TIFF, not an OME-Zarr image: convert it first "
            f"(svision-big convert {plain_tif} OUT.ome.zarr)"
        ], err
    assert _files(tmp_path) == before


def test_view_without_qt_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    napari = pytest.importorskip("napari")
    from svision_big.convert import write_ome_zarr

    src = write_ome_zarr(smooth_volume((8, 16, 16)), str(tmp_path / "in.ome.zarr"))

    def no_qt(*a, **k):  # what napari raises on a machine without a Qt binding
        raise ImportError("No Qt bindings could be found for napari")

    monkeypatch.setattr(napari, "Viewer", no_qt)
    rc, _, err = _cli(["view", src, src], capsys)
    assert rc == 2 and len(err) == 1 and 'pip install "svision-big[view]"' in err[0], err
    # napari 0.9 makes its Viewer without Qt and fails at its event loop, with a 15-line ImportError (the
    # command said "error: ImportError: No Qt bindings could be found for napari==0.9.2." and no extra)
    from napari.components import ViewerModel

    def no_event_loop(*a, **k):
        raise ImportError("No Qt bindings could be found for napari==0.9.2.\n\nnapari requires either PyQt5, ...")

    monkeypatch.setattr(napari, "Viewer", lambda title=None: ViewerModel(title=title))
    monkeypatch.setattr(napari, "run", no_event_loop)
    rc, _, err = _cli(["view", src, src], capsys)
    assert rc == 2 and err == [
        'svision-big: error: svision-big view needs napari with a Qt binding: pip install "svision-big[view]" '
        "(No Qt bindings could be found for napari==0.9.2.)"
    ], err
    monkeypatch.setitem(__import__("sys").modules, "napari", None)  # napari not installed at all
    rc, _, err = _cli(["view", src, src], capsys)
    assert rc == 2 and err == [
        'svision-big: error: svision-big view needs napari with a Qt binding: pip install "svision-big[view]"'
    ]


# --------------------------------------------------------------------------- refusals that name what differs (issue 28.3)


def _tree(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


def test_an_output_made_with_other_settings_is_refused_naming_the_settings_that_differ(tmp_path, capsys):
    from svision_big.convert import write_ome_zarr
    from svision_big.testing import make_model

    src = write_ome_zarr(
        smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000), str(tmp_path / "in.ome.zarr")
    )
    model = str(make_model((2, 2, 2), bp=1).save(tmp_path / "m.svb"))
    out = str(tmp_path / "out.ome.zarr")
    common = ["enhance", src, out, "--model", model, "--scheduler", "sync", "--quiet"]
    assert _cli([*common, "--block", "16,32,32"], capsys)[0] == 0
    before = _tree(out)
    rc, _, err = _cli([*common, "--block", "16,32,32", "--dtype", "float32", "--nonfinite", "fill"], capsys)
    assert rc == 2 and err == [
        f"svision-big: error: {out} already exists and was made with other settings (dtype uint16, now float32; "
        "nonfinite error, now fill): pass --overwrite to replace it"
    ], err
    assert _tree(out) == before
    rc, _, err = _cli([*common, "--block", "32,64,64"], capsys)  # what follows from the block is named after it
    assert rc == 2 and len(err) == 1, err
    assert "other settings (block [16, 32, 32], now [32, 64, 64]; chunks [16, 32, 32], now [32, 64, 64]; " in err[0]
    assert _tree(out) == before


def test_run_over_another_runs_output_names_the_run_settings_that_differ(tmp_path, capsys):
    from svision_big.convert import write_ome_zarr

    src = write_ome_zarr(
        smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000), str(tmp_path / "in.ome.zarr")
    )
    out = str(tmp_path / "out.ome.zarr")
    common = ["run", src, out, "--factor", "2", "--scheduler", "sync", "--quiet", "--block", "32,64,64"]
    assert _cli([*common, "--steps", "2"], capsys)[0] == 0
    before = _tree(out)
    rc, _, err = _cli([*common, "--steps", "3", "--seed", "5"], capsys)
    assert rc == 2 and err == [
        f"svision-big: error: {out} already exists and was made with other settings (seed 0, now 5; steps 2, now 3): "
        "pass --overwrite to replace it"
    ], err
    assert _tree(out) == before


# --------------------------------------------------------------------------- sparse inputs are not missing chunks (issue 27.5)


def _sparse_volume() -> np.ndarray:
    """16x32x32 uint16, signal in a 4x8x8 corner only: in 8x16x16 chunks, seven of eight are all zero."""
    vol = np.zeros((16, 32, 32), np.uint16)
    vol[:4, :8, :8] = smooth_volume((4, 8, 8), seed=4, dtype=np.uint16, scale=900) + 100
    return vol


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_a_sparse_volume_written_by_convert_enhances_without_missing_chunks_and_passes_strict(tmp_path, capsys, ngff):
    from svision_big.convert import convert_tiff, write_ome_zarr
    from svision_big.harmcheck import cubic_baseline
    from svision_big.testing import make_model

    tif = tmp_path / "sparse.tif"
    tifffile.imwrite(tif, _sparse_volume())
    src = convert_tiff(tif, str(tmp_path / "sparse.ome.zarr"), voxel_size=(2, 0.5, 0.5), chunks=(8, 16, 16), ngff=ngff)
    api = write_ome_zarr(_sparse_volume(), str(tmp_path / "api.ome.zarr"), chunks=(8, 16, 16), ngff=ngff)
    # cubic upsampling (a network whose correction is zero): the empty input chunks give all-zero output chunks
    model = str(cubic_baseline(make_model((2, 2, 2), bp=0)).save(tmp_path / "m.svb"))
    for inp in (src, api):
        for strict in ([], ["--strict"]):
            out = str(tmp_path / f"out{len(strict)}_{os.path.basename(inp)}")
            argv = ["enhance", inp, out, "--model", model, "--scheduler", "sync", "--quiet", "--block", "16,32,32"]
            rc, lines, err = _cli([*argv, *strict], capsys)
            assert rc == 0 and err == [], err
            assert "missing" not in lines[-1]
            assert "input_missing_chunks" not in open_image(out).group.attrs["svision_big"]
        for image in (inp, out):  # every chunk stored, the all-zero ones too: the output can be enhanced again
            img = open_image(image)
            for level in range(img.nlevels):
                assert img.level(level).nchunks_initialized == img.level(level).nchunks, (image, level)


def _drop_empty_chunks(image_url: str) -> int:
    """Delete every stored chunk that holds only the fill value, at every level: what zarr's
    default (``write_empty_chunks=False``) leaves behind in another tool's output."""
    import zarr

    img = open_image(image_url)
    n = 0
    for level in range(img.nlevels):
        arr = img.level(level)
        for coords in np.ndindex(*arr.cdata_shape):
            region = tuple(slice(i * c, min((i + 1) * c, m)) for i, c, m in zip(coords, arr.chunks, arr.shape))
            if not np.any(arr[region] != (arr.fill_value or 0)):
                key = arr.metadata.encode_chunk_key(coords)
                os.remove(os.path.join(image_url, img.paths[level], *key.split("/")))
                n += 1
    assert isinstance(zarr.__version__, str)
    return n


def test_empty_chunks_another_tool_left_out_are_told_from_lost_ones_by_the_levels_above(tmp_path, capsys):
    """Issue 27.5: zarr leaves out chunks equal to the fill value by default, so an intact sparse
    image from another tool was warned of as missing chunks and refused by --strict. The levels
    above an absent chunk tell: all fill value there, it was empty; data there, it is lost."""
    from svision_big.convert import write_ome_zarr
    from svision_big.harmcheck import cubic_baseline
    from svision_big.testing import make_model

    vol = np.zeros((16, 128, 128), np.uint16)  # y, x above 64: a second level
    vol[:4, :8, :8] = smooth_volume((4, 8, 8), seed=4, dtype=np.uint16, scale=900) + 100
    src = str(write_ome_zarr(vol, str(tmp_path / "other.ome.zarr"), chunks=(8, 32, 32)))
    assert open_image(src).nlevels == 2
    assert _drop_empty_chunks(src) == 31 + 7  # 31 of 32 level-0 chunks, 7 of 8 on level 1
    model = str(cubic_baseline(make_model((2, 2, 2), bp=0)).save(tmp_path / "m.svb"))
    argv = ["enhance", src, "OUT", "--model", model, "--scheduler", "sync", "--quiet", "--block", "16,64,64"]
    for strict in ([], ["--strict"]):
        out = str(tmp_path / f"out{len(strict)}.ome.zarr")
        rc, lines, err = _cli([a if a != "OUT" else out for a in argv] + strict, capsys)
        assert rc == 0 and err == [], err
        assert "input_missing_chunks" not in open_image(out).group.attrs["svision_big"]
    # a chunk with data, lost at level 0 only: the level above shows its data, so it is missing
    os.remove(os.path.join(src, "0", "c", "0", "0", "0"))
    out = str(tmp_path / "lost.ome.zarr")
    rc, lines, err = _cli([a if a != "OUT" else out for a in argv], capsys)
    assert rc == 0 and len(err) == 1 and "1 chunks of" in err[0] and "missing" in err[0], err
    assert open_image(out).group.attrs["svision_big"]["input_missing_chunks"] == 1
    rc, lines, err = _cli([a if a != "OUT" else str(tmp_path / "lost2.ome.zarr") for a in argv] + ["--strict"], capsys)
    assert rc == 2 and "chunk c/0/0/0 is missing" in err[-1]


# --------------------------------------------------------------------------- what convert leaves out, or would invent (issue 27.5)


def test_convert_names_the_series_it_leaves_out(tmp_path, capsys):
    tif = tmp_path / "two.tif"
    vol = smooth_volume((4, 16, 16), seed=1, dtype=np.uint16, scale=500)
    tifffile.imwrite(tif, vol, metadata={"axes": "ZYX"}, photometric="minisblack")
    tifffile.imwrite(tif, vol[0, :8, :8], append=True)  # a second image: a thumbnail, another position
    out = tmp_path / "two.ome.zarr"
    rc, _, err = _cli(["convert", tif, out, "--voxel-size", "1,0.5,0.5"], capsys)
    assert rc == 0 and err == [
        f"svision-big: warning: {tif} holds 2 image series in 5 pages: only the first, shape (4, 16, 16) in 4 "
        "pages, is converted"
    ], err
    np.testing.assert_array_equal(open_image(str(out)).level(0)[...], vol)
    single = tmp_path / "one.tif"
    tifffile.imwrite(single, vol, metadata={"axes": "ZYX"})
    rc, _, err = _cli(["convert", single, tmp_path / "one.ome.zarr", "--voxel-size", "1,0.5,0.5"], capsys)
    assert rc == 0 and err == []  # the whole file: nothing to say


def test_a_tiff_with_lateral_sizes_but_no_z_size_is_refused_not_given_one_nanometre(tmp_path, capsys):
    tif = tmp_path / "ij.tif"
    vol = smooth_volume((4, 16, 16), seed=1, dtype=np.uint16, scale=500)
    tifffile.imwrite(tif, vol, imagej=True, resolution=(10, 10), metadata={"axes": "ZYX", "unit": "nm"})
    out = tmp_path / "ij.ome.zarr"
    before = _files(tmp_path)
    rc, _, err = _cli(["convert", tif, out], capsys)
    assert rc == 2 and err == [
        f"svision-big: error: {tif} gives voxel sizes for y,x (0.1, 0.1 nanometer) but not for z: "
        "pass --voxel-size Z,Y,X"
    ], err
    assert _files(tmp_path) == before and not out.exists()
    rc, _, err = _cli(["convert", tif, out, "--voxel-size", "300,100,100", "--unit", "nm"], capsys)
    assert rc == 0 and err == []
    img = open_image(str(out))
    assert list(img.scales[0]) == [300.0, 100.0, 100.0] and {a["unit"] for a in img.axes} == {"nanometer"}


# --------------------------------------------------------------------------- messages that name the problem (issue 27.6)


@pytest.mark.parametrize(
    "what,edit,message",
    [
        (  # was "KeyError: 0"
            "multiscales a dict",
            lambda ome: ome.update(multiscales={"0": ome["multiscales"][0]}),
            "'multiscales' must be a list of objects, not a dict",
        ),
        (  # was "IndexError: list index out of range"
            "multiscales empty",
            lambda ome: ome.update(multiscales=[]),
            "'multiscales' must be a list of objects, not an empty list",
        ),
        (  # was "AttributeError: 'str' object has no attribute 'get'"
            "datasets a dict",
            lambda ome: ome["multiscales"][0].update(datasets={"0": {"path": "0"}}),
            "'datasets' must be a list of objects with a 'path', not a dict",
        ),
    ],
)
def test_malformed_multiscales_are_named_in_one_line(tmp_path, capsys, what, edit, message):
    import json

    import zarr

    from svision_big.convert import write_ome_zarr
    from svision_big.testing import make_model

    src = write_ome_zarr(smooth_volume((16, 32, 32)), str(tmp_path / "in.ome.zarr"))
    group = zarr.open_group(src, mode="r+")
    ome = json.loads(json.dumps(group.attrs["ome"]))
    edit(ome)
    group.attrs["ome"] = ome
    model = str(make_model((2, 2, 2)).save(tmp_path / "m.svb"))
    before = _tree(tmp_path)
    for cmd in (["info", src], ["enhance", src, tmp_path / "o.ome.zarr", "--model", model, "--scheduler", "sync"]):
        rc, _, err = _cli(cmd, capsys)
        assert rc == 2 and err == [f"svision-big: error: no OME-Zarr image at {src}: {message}"], (what, err)
    assert _tree(tmp_path) == before


def test_a_one_bit_tiff_converts_and_enhance_names_its_dtype_not_a_dtype_flag(tmp_path, capsys):
    """A mask (1-bit TIFF) failed to convert with numpy's "boolean subtract ... is not supported"
    (the display window's percentiles); the refusal to enhance it without --dtype names the input's
    dtype, not a --dtype that was not given (that refusal was right already: pinned here)."""
    from svision_big.testing import make_model

    tif = tmp_path / "mask.tif"
    tifffile.imwrite(tif, smooth_volume((8, 16, 16), seed=2) > 0.5)
    src = tmp_path / "mask.ome.zarr"
    rc, _, err = _cli(["convert", tif, src, "--voxel-size", "1,1,1"], capsys)
    assert rc == 0 and err == [], err
    img = open_image(str(src))
    assert img.dtype == bool and img.omero["channels"][0]["window"]["end"] == 1.0
    model = str(make_model((2, 2, 2)).save(tmp_path / "m.svb"))
    rc, _, err = _cli(["enhance", src, tmp_path / "o.ome.zarr", "--model", model, "--scheduler", "sync"], capsys)
    assert rc == 2 and err == [
        "svision-big: error: the input's dtype is bool: pass --dtype with an integer or floating-point type"
    ]
    assert not (tmp_path / "o.ome.zarr").exists()


def test_train_on_values_beyond_float32_is_one_line_without_a_runtime_warning(tmp_path, capsys):
    """``min() arg is an empty sequence`` became a refusal naming float32 (issue 27); before it, the
    training-region search printed numpy's "RuntimeWarning: overflow encountered in cast" and its
    source line (three lines on stderr, from the command line)."""
    import warnings

    from svision_big.convert import write_ome_zarr

    src = write_ome_zarr(smooth_volume((16, 32, 32)).astype(np.float64) * 1e300, str(tmp_path / "huge.ome.zarr"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = _cli(["train", src, "-o", tmp_path / "m.svb", "--factor", "2", "--steps", "1"], capsys)
    assert rc == 2 and err == [
        "svision-big: error: the volume reaches 1e+300, beyond float32's range, the working precision: rescale it"
    ]
    assert [str(w.message) for w in caught] == [] and not (tmp_path / "m.svb").exists()


def test_a_seed_in_exponent_notation_is_named_by_its_flag(tmp_path, capsys):
    """``--seed 1e21`` (issue 27.6, once "Overflow when unpacking long long"): argparse names the flag.
    Right already; pinned here (the sweep in test_reliability.py covers 10^21 written out)."""
    rc, _, err = _cli(
        ["train", tmp_path / "in.ome.zarr", "-o", tmp_path / "m.svb", "--factor", "2", "--seed", "1e21"], capsys
    )
    assert rc == 2 and err == [
        "svision-big train: error: argument --seed: invalid int value: '1e21' (see svision-big train --help)"
    ]
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- the README's small truths (issue 28.7)


def test_a_resumed_output_leaves_no_empty_state_folder(tmp_path, monkeypatch):
    """A run that resumed an output it did not create left an empty ``svision_state/`` behind."""
    from svision_big import execute, pipeline
    from svision_big.convert import write_ome_zarr
    from svision_big.testing import make_model

    src = write_ome_zarr(
        smooth_volume((16, 32, 32), seed=3, dtype=np.uint16, scale=1000), str(tmp_path / "in.ome.zarr")
    )
    model = make_model((2, 2, 2), bp=1)
    out = str(tmp_path / "out.ome.zarr")
    real, calls = execute.run_block, []

    def dies_on_the_third_block(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(execute, "run_block", dies_on_the_third_block)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.enhance(src, out, model, block=(16, 32, 32), scheduler="sync", progress=False)
    assert os.listdir(os.path.join(out, "svision_state"))  # the first run's done-records: what the resume uses
    monkeypatch.setattr(execute, "run_block", real)
    stats = pipeline.enhance(src, out, model, block=(16, 32, 32), scheduler="sync", progress=False)
    assert stats["total"]["skipped"] == 2
    assert not os.path.exists(os.path.join(out, "svision_state")), os.listdir(os.path.join(out, "svision_state"))


def test_help_names_every_subcommand_and_every_argument_has_help():
    import argparse

    from svision_big.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"compare", "view"} <= set(sub.choices)
    first = parser.format_help().split("positional arguments")[0]  # usage and the description
    description = first.split("\n\n", 1)[1]
    assert all(name in description for name in sub.choices), description  # it named neither compare nor view
    bare = [
        f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
        for name, p in sub.choices.items()
        for a in p._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert bare == []  # 31 had none


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_files_say_what_current_tools_expect():
    """The demo's default folder is git-ignored, the licence is an SPDX expression (setuptools warned that
    a TOML table stops building after 2027-02-18), and every notebook cell has an id (nbformat 4.5)."""
    import json

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(_ROOT, ".gitignore")) as fh:
        assert "/svision_demo/" in fh.read().splitlines()
    with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as fh:
        meta = tomllib.load(fh)
    assert meta["project"]["license"] == "MIT"
    with open(os.path.join(_ROOT, "notebooks", "quickstart.ipynb")) as fh:
        nb = json.load(fh)
    ids = [c.get("id") for c in nb["cells"]]
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5) and all(ids) and len(set(ids)) == len(ids)


def test_the_repository_passes_its_own_linter():
    """`ruff check .` failed on main (import order in train.py) and nothing ran it (issue 28.7): the
    suite, which CI runs, runs it with the repository's configuration."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    p = subprocess.run([ruff, "check", "."], cwd=_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# --------------------------------------------------------------------------- the user's switches (issue 28.1)


def test_operator_and_ensemble_flags_force_the_choice_the_check_would_make_and_say_so(tmp_path, capsys):
    """Nothing on the command line could ask for the network the check refused (issue 28.1):
    --operator network|baseline|projected and --ensemble force each choice, the check's scores are
    still recorded, and the summary names the flag that hands the choice back to the check."""
    import svision_big as svb
    from svision_big import synthetic
    from svision_big.harmcheck import baselines, summary

    vol = synthetic.make_volume("beads", shape_lr=(16, 48, 48), factor=(2, 1, 1), seed=3).observed.astype(np.float32)
    f = (2, 1, 1)
    auto = svb.fit(vol, factor=f, steps=3, seed=0, quiet=True)
    net = svb.fit(vol, factor=f, steps=3, seed=0, quiet=True, operator="network", ensemble=1)
    base = svb.fit(vol, factor=f, steps=3, seed=0, quiet=True, operator="baseline")
    proj = svb.fit(vol, factor=f, steps=3, seed=0, quiet=True, operator="projected")
    b_auto, b_net, b_base, b_proj = (m.info["baseline"] for m in (auto, net, base, proj))
    # the check ran the same way each time: only the pick differs
    assert b_net["scores"] == b_auto["scores"] == b_base["scores"] == b_proj["scores"]
    assert b_auto["operator"] == "auto" and b_net["operator"] == "network"
    assert not b_net["used"] and b_net["ensemble"] == 1 and net.stages[-1].ensemble == 1
    assert "--operator network" in b_net["verdict"] and net.stages[-1].bp_iters >= 0
    assert b_base["used"] and b_base["back_projection"] == 0
    assert np.array_equal(base.enhance(vol), baselines(net)[b_base["safe"]].enhance(vol))  # the safe cubic, exactly
    assert b_proj["used"] and b_proj["back_projection"] > 0
    assert not np.array_equal(proj.enhance(vol), base.enhance(vol))
    assert not np.array_equal(net.enhance(vol), base.enhance(vol))
    # the summary names the way back
    text, reverse = summary(net)
    assert "--operator auto" in reverse and "--operator network" in text

    # bad values and impossible combinations: one line each, before any training
    for kw, msg in (
        ({"operator": "best"}, "operator 'best': choose one of auto, network, baseline, projected"),
        ({"ensemble": 3}, "ensemble 3: choose auto or one of 1, 4, 8"),
        ({"operator": "network", "denoise": "on"}, "--operator network with --denoise on"),
    ):
        with pytest.raises(ValueError, match=msg):
            svb.fit(vol, factor=2, steps=1, quiet=True, **kw)

    # the command line: the flags reach fit, and the printed summary says what reverses them
    from svision_big.convert import write_ome_zarr

    src = str(write_ome_zarr((vol * 1000).astype(np.uint16), str(tmp_path / "in.ome.zarr")))
    rc, out, err = _cli(
        [
            "train",
            src,
            "-o",
            str(tmp_path / "m.svb"),
            "--factor",
            "2",
            "--steps",
            "3",
            "--operator",
            "network",
            "--ensemble",
            "4",
        ],
        capsys,
    )
    assert rc == 0, err
    summary = [line for line in out if line.startswith("result: ")]
    assert summary and "trained operator, ensemble 4 (--operator network" in summary[-1]
    assert (
        "(--operator auto lets the held-aside check choose; --back-projection N sets the network's back-projection "
        "iterations (the check chose " in summary[-1]
    )
    m = svb.load_model(str(tmp_path / "m.svb"))
    assert m.info["baseline"]["operator"] == "network" and m.stages[-1].ensemble == 4
    rc, out, err = _cli(["train", src, "-o", str(tmp_path / "m2.svb"), "--factor", "2", "--ensemble", "2"], capsys)
    assert rc == 2 and "--ensemble: invalid choice: '2'" in err[-1]
    # the flags' choices are the library's (the command line declares them without importing torch)
    from svision_big import cli
    from svision_big.degrade import ACQUISITIONS
    from svision_big.harmcheck import OPERATORS
    from svision_big.operator import ENSEMBLES

    train_p = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train_p._actions if a.dest in ("operator", "ensemble", "acquisition")}
    assert tuple(choices["operator"]) == OPERATORS
    assert sorted(choices["ensemble"]) == sorted(["auto", *map(str, ENSEMBLES)])
    assert sorted(choices["acquisition"]) == sorted(["auto", *ACQUISITIONS])


def test_back_projection_flag_forces_the_iterations_the_check_would_choose_and_says_so(tmp_path, capsys, monkeypatch):
    """Issue 28.1: back-projection was the one automatic choice with no switch. back_projection=N
    (--back-projection N, train and run) sets the network stages' and the closing iterations; the
    check still runs and its scores are recorded; auto keeps the check's choice (on this volume, 10
    for every stage and the closing one, measured when this test was written); bad values are one line."""
    import svision_big as svb
    from svision_big import synthetic
    from svision_big.harmcheck import summary

    vol = synthetic.make_volume("beads", shape_lr=(16, 48, 48), factor=(2, 1, 1), seed=3).observed.astype(np.float32)
    two = svb.fit(vol, factor=(4, 1, 1), steps=3, seed=0, quiet=True, operator="network", back_projection=2)
    assert [s.bp_iters for s in two.stages] == [2, 2] and two.final is not None and two.final_bp_iters == 2
    assert two.info["back_projection"] == {"chosen": 2, "stages": [2, 2], "closing": 2}
    assert all(set(s.report["bp_val_mse"]) == {"0", "1", "2", "5", "10"} for s in two.stages)  # the check ran
    assert set(two.info["final_bp_val_mse"]) >= {"0", "2"}
    text, reverse = summary(two)
    assert "--back-projection auto lets the check choose the back-projection iterations (now 2/2, closing 2)" in reverse

    # bad values: one line each, before any training
    for bad in (-1, 1.5, "some", True, "2.0"):
        with pytest.raises(
            ValueError, match=r"^back_projection .*: choose auto or a whole number of iterations, 0 or more$"
        ):
            svb.fit(vol, factor=2, steps=1, quiet=True, back_projection=bad)
    lat = svb.fit(vol, factor=(2, 1, 1), steps=3, quiet=True, axial="lateral", operator="network", back_projection=1)
    assert [s.kind for s in lat.stages] == ["lateral"] and lat.stages[0].bp_iters == 1  # the lateral stage too

    # the command line: --back-projection 0 reaches fit, and the summary names the flag
    from svision_big.convert import write_ome_zarr

    src = str(write_ome_zarr((vol * 1000).astype(np.uint16), str(tmp_path / "in.ome.zarr")))
    argv = ["train", src, "-o", str(tmp_path / "m.svb"), "--factor", "2,1,1", "--steps", "3", "--operator", "network"]
    rc, out, err = _cli([*argv, "--back-projection", "0"], capsys)
    assert rc == 0, err
    m = svb.load_model(str(tmp_path / "m.svb"))
    assert [s.bp_iters for s in m.stages] == [0] and m.info["back_projection"]["chosen"] == 0
    assert any(
        line.startswith("stage 1:") and "back-projection 0 iterations (--back-projection)" in line for line in out
    )
    assert "--back-projection auto lets the check choose" in [line for line in out if line.startswith("result: ")][-1]
    rc, out, err = _cli([*argv, "--back-projection", "-1", "--overwrite"], capsys)
    assert rc == 2 and "--back-projection: '-1': choose auto or a whole number of iterations, 0 or more" in err[-1]
    # run: the flag reaches train, and a forced number is part of the run's fingerprint (auto keeps older keys)
    from svision_big.pipeline import running

    seen = {}

    def channel_model(fs, root, i, f, c, kw):  # what run hands to train, then stop (no training, no enhance)
        seen.update(kw)
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(running, "_channel_model", channel_model)
    rc, out, err = _cli(
        ["run", src, str(tmp_path / "out.ome.zarr"), "--factor", "2,1,1", "--back-projection", "3"], capsys
    )
    assert rc == 2 and "stopped before training" in err[-1], err
    assert seen["back_projection"] == 3
    from svision_big.ngff import open_image
    from svision_big.options import TrainOptions

    img = open_image(src)
    key_auto, ident = running._run_identity(src, "2,1,1", img, TrainOptions())
    key_3, ident_3 = running._run_identity(src, "2,1,1", img, TrainOptions(back_projection=3))
    assert key_auto != key_3 and ident["back_projection"] == "auto" and ident_3["back_projection"] == "3"
    assert key_auto == running._run_identity(src, "2,1,1", img, TrainOptions(back_projection="auto"))[0]


# --------------------------------------------------------------------------- interrupted training (issue 28.4)


def _interrupt_at_step(monkeypatch, n: int) -> None:
    """Ctrl-C while the ``n``-th training batch is drawn."""
    from svision_big import sampling

    real = sampling.PairSampler.batch
    calls = {"n": 0}

    def batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(sampling.PairSampler, "batch", batch)


def test_an_interrupted_training_resumes_from_its_checkpoint_to_the_same_model(tmp_path, monkeypatch, capsys):
    """A Ctrl-C at 30% of training restarted it from step 1. fit saves each stage's whole state at
    every validation step; called again the same way it resumes there, to the same weights and the
    same output as an uninterrupted fit. A checkpoint of another training is ignored."""
    import torch

    import svision_big as svb

    vol = smooth_volume((12, 40, 40), seed=21).astype(np.float32)
    kw = dict(factor=2, steps=40, seed=0, operator="network")
    ref = svb.fit(vol, quiet=True, **kw)
    ck = str(tmp_path / "ck")
    _interrupt_at_step(monkeypatch, 27)  # validation (and saves) every 10 steps: resumes at step 21
    with pytest.raises(KeyboardInterrupt):
        svb.fit(vol, quiet=True, checkpoint_dir=ck, **kw)
    monkeypatch.undo()
    assert os.listdir(ck) == ["s0.pt"]
    got = svb.fit(vol, quiet=False, checkpoint_dir=ck, **kw)
    assert "resuming training at step 21 of 40 (checkpoint)" in capsys.readouterr().out
    for s1, s2 in zip(ref.stages, got.stages, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(s1.state.values(), s2.state.values(), strict=True))
    assert np.array_equal(ref.enhance(vol), got.enhance(vol))
    # another volume, same folder: the checkpoint is not its own, so it trains from step 1
    other = svb.fit(smooth_volume((12, 40, 40), seed=22).astype(np.float32), quiet=False, checkpoint_dir=ck, **kw)
    assert "resuming" not in capsys.readouterr().out
    assert other.stages[0].report["best_step"] > 0


_KILL_AT_STEP = """
import os, signal, sys
import numpy as np
import torch
import svision_big as svb
from svision_big import sampling

torch.set_num_threads(1)
n, calls, real = int(sys.argv[3]), [0], sampling.PairSampler.batch

def batch(self, *a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)  # no Python clean-up runs
    return real(self, *a, **k)

sampling.PairSampler.batch = batch
svb.fit(np.load(sys.argv[1]), factor=2, steps=20, seed=0, operator="network", quiet=True, checkpoint_dir=sys.argv[2])
"""


def test_a_training_killed_at_a_random_step_resumes_to_the_same_model(tmp_path, capsys):
    """Issue 28.4 asked for a test that kills the training at a random step: SIGKILL (nothing saved on
    the way out), at a step drawn anew each run and named on failure; the same call resumes from the
    last checkpoint to the uninterrupted model's weights and output."""
    import random
    import subprocess
    import sys

    import torch

    import svision_big as svb

    vol = smooth_volume((12, 40, 40), seed=21).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    kw = dict(factor=2, steps=20, seed=0, operator="network", quiet=True)
    ref = svb.fit(vol, **kw)
    step = random.randint(11, 20)  # batches drawn: validation (and a save) every 10 steps
    ck = str(tmp_path / "ck")
    p = subprocess.run(
        [sys.executable, "-c", _KILL_AT_STEP, str(tmp_path / "v.npy"), ck, str(step)],
        env=dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -9, (step, p.stderr)
    assert os.listdir(ck) == ["s0.pt"], step
    capsys.readouterr()
    got = svb.fit(vol, checkpoint_dir=ck, **{**kw, "quiet": False})
    assert "resuming training at step 11 of 20 (checkpoint)" in capsys.readouterr().out, step  # not from step 1
    for s1, s2 in zip(ref.stages, got.stages, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(s1.state.values(), s2.state.values(), strict=True)), step
    assert np.array_equal(ref.enhance(vol), got.enhance(vol)), step


def test_run_interrupted_while_training_resumes_the_training_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    """`run` keeps the checkpoints in the output's state folder; the re-run resumes the training and
    the output equals an uninterrupted run's; the checkpoints are gone once the model is saved."""
    from svision_big import pipeline
    from svision_big.convert import write_ome_zarr

    vol = smooth_volume((12, 40, 40), seed=21, dtype=np.uint16, scale=1000)
    src = str(write_ome_zarr(vol, str(tmp_path / "in.ome.zarr")))
    kw = dict(steps=40, seed=0, quiet=True, scheduler="sync", operator="network")
    ref = str(tmp_path / "ref.ome.zarr")
    pipeline.run(src, ref, 2, **kw)
    out = str(tmp_path / "out.ome.zarr")
    _interrupt_at_step(monkeypatch, 33)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(src, out, 2, **kw)
    monkeypatch.undo()
    state = tmp_path / "out.ome.zarr" / "svision_state"
    saved = sorted(str(p.relative_to(state)) for p in state.rglob("*.pt"))
    assert len(saved) == 1 and saved[0].endswith("/c0.ckpt/s0.pt")
    pipeline.run(src, out, 2, **kw)
    a, b = open_image(ref), open_image(out)
    assert a.nlevels == b.nlevels
    for i in range(a.nlevels):
        np.testing.assert_array_equal(a.read(i), b.read(i))
    assert not list(tmp_path.joinpath("out.ome.zarr").rglob("*.ckpt"))


def test_commands_that_run_no_network_start_without_torch(tmp_path):
    """`svision-big --help` and `info` took about 2 s, most of it importing torch, which they never
    use (issue 13.1): the package imports its model and training modules on first use."""
    import subprocess
    import sys

    from svision_big.convert import write_ome_zarr

    src = str(write_ome_zarr(np.zeros((4, 8, 8), np.uint16), str(tmp_path / "in.ome.zarr")))
    code = (
        "import sys\n"
        "import svision_big, svision_big.cli\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "for argv in (['info', sys.argv[1]], ['--version']):\n"
        "    try:\n"
        "        svision_big.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'info'\n"
        "assert callable(svision_big.fit) and 'torch' in sys.modules  # on first use\n"
    )
    p = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, timeout=120, cwd=_ROOT)
    assert p.returncode == 0, p.stderr
