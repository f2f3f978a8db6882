"""Issue 11: TIFF metadata in, viewer metadata out, napari at the true positions, compare figures.

All data are made here (synthetic, small); no downloads. napari and matplotlib are optional
dependencies: their tests are skipped where they are not installed.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from svision_big import ngff
from svision_big.convert import as_ome_zarr, convert_tiff, write_ome_zarr
from svision_big.degrade import Degradation, resize
from svision_big.metrics import psnr, ssim
from svision_big.ngff import (
    enhanced_name,
    format_for,
    multiscales_metadata,
    ngff_unit,
    open_image,
    open_output_group,
    spec_axes,
    upsampled_transform,
    viewer_metadata,
)
from svision_big.pyramid import build_pyramid, pyramid_datasets, pyramid_factors

tifffile = pytest.importorskip("tifffile")


def _rng(shape, seed=0, hi=4000):
    return np.random.default_rng(seed).integers(0, hi, shape).astype(np.uint16)


# --------------------------------------------------------------------------- 1. TIFF metadata


def test_ome_tiff_metadata_kept(tmp_path):
    import ome_zarr_models

    data = _rng((6, 2, 24, 20))
    tif = str(tmp_path / "cells.ome.tif")
    tifffile.imwrite(
        tif,
        data,
        metadata={
            "axes": "ZCYX",
            "Name": "HeLa fixed",
            "PhysicalSizeZ": 2.0,
            "PhysicalSizeZUnit": "µm",
            "PhysicalSizeY": 500.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeX": 500.0,
            "PhysicalSizeXUnit": "nm",
            "Channel": {"Name": ["DAPI", "GFP"]},
        },
    )
    out = convert_tiff(tif, str(tmp_path / "a.ome.zarr"))
    ome_zarr_models.open_ome_zarr(out)  # an independent validator accepts it
    img = open_image(out)
    assert img.axis_names == ["c", "z", "y", "x"]
    assert img.scales[0] == [1.0, 2.0, 500.0, 500.0]
    assert [a.get("unit") for a in img.axes] == [None, "micrometer", "nanometer", "nanometer"]
    assert [c["label"] for c in img.omero["channels"]] == ["DAPI", "GFP"]
    assert img.name == "HeLa fixed"
    assert img.omero["version"] == "0.5"
    np.testing.assert_array_equal(img.level(0)[...], data.transpose(1, 0, 2, 3))

    # explicit arguments override the file
    img = open_image(
        convert_tiff(
            tif,
            str(tmp_path / "b.ome.zarr"),
            voxel_size=(1.0, 0.1, 0.1),
            unit="micrometer",
            ngff="0.4",
            channel_names=["nuclei", "actin"],
        )
    )
    assert img.scales[0] == [1.0, 1.0, 0.1, 0.1]
    assert {a.get("unit") for a in img.axes if a["type"] == "space"} == {"micrometer"}
    assert [c["label"] for c in img.omero["channels"]] == ["nuclei", "actin"]
    assert img.omero["version"] == "0.4"


def test_imagej_hyperstack_metadata_kept(tmp_path):
    data = _rng((2, 5, 2, 16, 18), seed=1)
    tif = str(tmp_path / "hyper.tif")
    tifffile.imwrite(
        tif,
        data,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"axes": "TZCYX", "spacing": 1.5, "unit": "\\u00B5m", "Ranges": [10, 900, 20, 1800]},
    )
    img = open_image(convert_tiff(tif, str(tmp_path / "h.ome.zarr")))
    assert img.axis_names == ["t", "c", "z", "y", "x"]
    assert img.scales[0] == pytest.approx([1.0, 1.0, 1.5, 0.25, 0.25])
    assert [a.get("unit") for a in img.axes if a["type"] == "space"] == ["micrometer"] * 3
    wins = [c["window"] for c in img.omero["channels"]]
    assert [(w["start"], w["end"]) for w in wins] == [(10.0, 900.0), (20.0, 1800.0)]  # ImageJ's display ranges
    np.testing.assert_array_equal(img.level(0)[...], data.transpose(0, 2, 1, 3, 4))

    nm = str(tmp_path / "nm.tif")
    tifffile.imwrite(
        nm,
        data[0, :, 0],
        imagej=True,
        resolution=(1 / 80.0, 1 / 80.0),
        metadata={"axes": "ZYX", "spacing": 200.0, "unit": "nm"},
    )
    img = open_image(convert_tiff(nm, str(tmp_path / "nm.ome.zarr")))
    assert img.scales[0] == pytest.approx([200.0, 80.0, 80.0])
    assert [a["unit"] for a in img.axes] == ["nanometer"] * 3  # nm stays nm


def test_unit_names():
    assert [
        ngff_unit(u)
        for u in ("nm", "µm", "um", "micron", b"\\u00B5m".decode("unicode_escape"), "Å", "mm", "micrometer", "parsec")
    ] == [
        "nanometer",
        "micrometer",
        "micrometer",
        "micrometer",
        "micrometer",
        "angstrom",
        "millimeter",
        "micrometer",
        "parsec",
    ]


def test_tiff_input_for_run(tmp_path):
    data = _rng((8, 20, 20), seed=2)
    tif = str(tmp_path / "stack.ome.tif")
    tifffile.imwrite(
        tif, data, metadata={"axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2}
    )
    out = str(tmp_path / "results" / "out.ome.zarr")
    os.makedirs(os.path.dirname(out))
    z1 = as_ome_zarr(tif, near=out, quiet=True)
    assert os.path.dirname(z1) == os.path.dirname(out) and z1.endswith(".ome.zarr")
    assert open_image(z1).scales[0] == [1.0, 0.2, 0.2]
    stamp = os.path.getmtime(os.path.join(z1, "zarr.json"))
    assert as_ome_zarr(tif, near=out, quiet=True) == z1  # reused, not converted again
    assert os.path.getmtime(os.path.join(z1, "zarr.json")) == stamp
    assert as_ome_zarr(z1) == z1  # an OME-Zarr passes through
    st = os.stat(tif)
    os.utime(tif, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed TIFF: a new copy
    assert as_ome_zarr(tif, near=out, quiet=True) != z1


# --------------------------------------------------------------------------- 2. viewer metadata


def _upper_case_input(tmp_path, version="0.5"):
    """An input with iohub-style axis names ("Z", "Y", "X") and omero version "0.5"."""
    vol = _rng((16, 48, 48), seed=3, hi=1000)
    vol[3, 10, 10] = vol[12, 40, 30] = 60000  # two bright outliers the window must ignore
    src = write_ome_zarr(vol, str(tmp_path / "upper.ome.zarr"), voxel_size=(2.0, 0.5, 0.5), ngff=version, name="sample")
    import zarr

    g = zarr.open_group(src, mode="r+")
    attrs = g.attrs.asdict()
    ome = attrs["ome"] if version == "0.5" else attrs
    for a in ome["multiscales"][0]["axes"]:
        a["name"] = a["name"].upper()
    ome["omero"] = {"version": "0.5", "channels": [{"label": "GFP", "color": "00FF00"}]}  # no window
    g.attrs.update(attrs)
    return src, vol


def test_viewer_metadata_window_name_axes_version(tmp_path):
    import ome_zarr_models

    src, vol = _upper_case_input(tmp_path)
    img = open_image(src)
    assert img.axis_names == ["Z", "Y", "X"]
    f = (2, 2, 2)
    up = resize(torch.from_numpy(vol.astype(np.float64))[None, None], f, up=True)[0, 0].numpy().astype(np.float32)
    fmt = format_for("0.4")  # a 0.5 input written as 0.4
    out = str(tmp_path / "out.ome.zarr")
    g = open_output_group(out, fmt, mode="w-")
    fmt.create_array(g, "0", up.shape, (16, 32, 32), up.dtype, [n.lower() for n in img.axis_names])[...] = up
    pf = pyramid_factors(up.shape, [0, 1, 2], min_shape=16)
    paths = build_pyramid(g, fmt, ["z", "y", "x"], "0", [0, 1, 2], pf, (16, 32, 32), up.dtype)
    s0, t0 = upsampled_transform(img.scales[0], img.translations[0], f)
    ome = multiscales_metadata(
        img.axes, pyramid_datasets(s0, t0, [0, 1, 2], pf, paths), name=img.name, version=fmt.version
    )
    ome = viewer_metadata(ome, img, g[paths[-1]], fmt.version, f)
    fmt.write_ome_attrs(g, ome)
    ome_zarr_models.open_ome_zarr(out)
    res = open_image(out)
    assert res.axis_names == ["z", "y", "x"]
    assert res.name == "sample (svision x2)" and enhanced_name("a", (4, 2, 2)) == "a (svision x(4,2,2))"
    om = res.omero
    assert om["version"] == "0.4"
    ch = om["channels"][0]
    assert ch["label"] == "GFP" and ch["color"] == "00FF00"
    w = ch["window"]
    coarse = np.asarray(g[paths[-1]][...])
    assert w["start"] == pytest.approx(np.percentile(coarse, 0.1))
    assert w["end"] == pytest.approx(np.percentile(coarse, 99.9))
    assert w["end"] < 3000 < w["max"]  # the outliers widen the range, not the window
    assert w["min"] <= w["start"] < w["end"] <= w["max"]


def test_display_window_reads_only_sampled_chunks(tmp_path, monkeypatch):
    import zarr

    arr = zarr.create_array(str(tmp_path / "big.zarr"), shape=(64, 64, 64), chunks=(16, 16, 16), dtype="uint16")
    arr[...] = _rng((64, 64, 64), seed=4)
    reads = []

    class Counting:
        shape, chunks, dtype, shards = arr.shape, arr.chunks, arr.dtype, None

        def __getitem__(self, key):
            reads.append(key)
            return arr[key]

    monkeypatch.setattr(ngff.viewer, "WINDOW_VOXELS", 8 * 16**3)
    om = ngff.omero_metadata(Counting(), ["z", "y", "x"], version="0.5")
    assert len(reads) == 8  # 8 of 64 chunks
    assert all(k != Ellipsis for k in reads)
    w = om["channels"][0]["window"]
    assert 0 <= w["start"] < 50 and 3950 < w["end"] <= 4000 and (w["min"], w["max"]) == (0.0, 65535.0)


def test_spec_axes():
    axes = spec_axes(
        [{"name": "T", "type": "Time"}, {"name": "C", "type": "channel"}, {"name": "Z", "type": "space", "unit": "µm"}]
    )
    assert axes == [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
    ]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_pipeline_writes_viewer_metadata(tmp_path, version):
    """An enhanced output from the real pipeline, from a 0.5 input with upper-case axis names:
    omero with the output's version and a window, a name with the factor, lower-case axes, and
    ome-zarr-models accepts it (needs ``viewer_metadata`` wired into ``pipeline.finish._finish``)."""
    import ome_zarr_models

    from svision_big import pipeline
    from svision_big.pipeline import finish

    if "viewer_metadata" not in open(finish.__file__).read():
        pytest.skip("pipeline.finish._finish does not call ngff.viewer_metadata yet")
    from svision_big.testing import make_model

    src, _ = _upper_case_input(tmp_path)
    out = str(tmp_path / "enh.ome.zarr")
    pipeline.enhance(
        src,
        out,
        make_model((2, 2, 2), bp=0, hi=1000.0),
        scheduler="sync",
        ngff=version,
        dtype="float32",
        progress=False,
    )
    res = open_image(out)
    assert res.fmt.version == version and res.omero["version"] == version
    assert res.axis_names == ["z", "y", "x"] and res.name == "sample (svision x2)"
    assert res.omero["channels"][0]["label"] == "GFP"
    w = res.omero["channels"][0]["window"]
    assert w["end"] > w["start"]
    ome_zarr_models.open_ome_zarr(out)  # dimension_names must match the lower-case axes in 0.5


# --------------------------------------------------------------------------- 3. napari, headless


def _bead(shape, centre, sigma, peak=1000.0):
    idx = np.indices(shape).astype(float)
    r2 = sum(((idx[i] - c) / s) ** 2 for i, (c, s) in enumerate(zip(centre, sigma)))
    return (peak * np.exp(-r2 / 2)).astype(np.float32)


def _centroid(data):
    data = np.asarray(data, dtype=float)
    m = np.unravel_index(int(np.argmax(data)), data.shape)
    sl = tuple(slice(max(0, i - 4), i + 5) for i in m)
    w = np.clip(data[sl] - 0.1 * data.max(), 0, None)
    return np.array(ndimage.center_of_mass(w)) + [s.start for s in sl]


def test_view_bead_world_positions_agree(tmp_path):
    pytest.importorskip("napari")
    from napari.components import ViewerModel

    from svision_big.view import view, world_position

    f = (2, 2, 2)
    vol = _bead((16, 40, 40), (7.3, 18.6, 21.2), (1.5, 1.2, 1.2))
    inp = write_ome_zarr(vol, str(tmp_path / "in.ome.zarr"), voxel_size=(2.0, 0.4, 0.4), name="beads")
    # a multiscale-level transform too: every transform must be composed
    import zarr

    for url in (inp,):
        g = zarr.open_group(url, mode="r+")
        a = g.attrs.asdict()
        a["ome"]["multiscales"][0]["coordinateTransformations"] = [
            {"type": "translation", "translation": [5.0, -3.0, 1.0]}
        ]
        g.attrs.update(a)
    img = open_image(inp)
    up = resize(torch.from_numpy(vol.astype(np.float64))[None, None], f, up=True)[0, 0].numpy().astype(np.float32)
    fmt = format_for("0.5")
    out = str(tmp_path / "out.ome.zarr")
    g = open_output_group(out, fmt, mode="w-")
    fmt.create_array(g, "0", up.shape, (16, 32, 32), up.dtype, img.axis_names)[...] = up
    pf = pyramid_factors(up.shape, [0, 1, 2], min_shape=16)
    paths = build_pyramid(g, fmt, img.axis_names, "0", [0, 1, 2], pf, (16, 32, 32), up.dtype)
    s0, t0 = upsampled_transform(img.scales[0], img.translations[0], f)
    ome = multiscales_metadata(img.axes, pyramid_datasets(s0, t0, [0, 1, 2], pf, paths), name=img.name)
    fmt.write_ome_attrs(g, viewer_metadata(ome, img, g[paths[-1]], "0.5", f))

    viewer = ViewerModel()
    view(inp, out, viewer=viewer)
    assert [layer.name for layer in viewer.layers] == ["beads", "beads (svision x2)"]
    lin, lout = viewer.layers
    pin = world_position(lin, _centroid(lin.data[0] if lin.multiscale else lin.data))
    cout = _centroid(lout.data[0] if lout.multiscale else lout.data)
    pout = world_position(lout, cout)
    out_voxel = np.asarray(lout.scale, dtype=float)
    err = np.abs(pin - pout) / out_voxel
    assert err.max() < 0.1, (pin, pout, err)
    # the check can fail: only the first (scale) transform, as napari-ome-zarr 0.10 reads it, is
    # half an output voxel off plus the multiscale translation
    first_only = cout * np.asarray(s0)
    assert (np.abs(first_only - pin) / out_voxel).max() > 0.4
    # the omero window and colour reach the layers
    w = open_image(out).omero["channels"][0]["window"]
    assert tuple(lout.contrast_limits) == pytest.approx((w["start"], w["end"]))
    assert np.allclose(lout.colormap.colors[-1][:3], 1.0)


# --------------------------------------------------------------------------- 4. compare


def _pair_volume(shape_hr=(16, 64, 64)):
    """Two close beads (5 voxels apart laterally) and a few others, smooth, on the high-res grid."""
    v = np.zeros(shape_hr, np.float32)
    for c in ((8, 30, 28), (8, 30, 33), (5, 12, 50), (11, 50, 14)):
        v += _bead(shape_hr, c, (1.6, 1.3, 1.3))
    return v


def test_compare_with_truth_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image as PILImage

    from svision_big.compare import compare

    truth = _pair_volume()
    x = Degradation((2, 2, 2)).down(torch.from_numpy(truth.astype(np.float64))[None, None])[0, 0].numpy()
    x = x.astype(np.float32)
    delta = 2.5
    inp = write_ome_zarr(x, str(tmp_path / "in.ome.zarr"), voxel_size=(1.0, 0.2, 0.2))
    res = write_ome_zarr(truth + delta, str(tmp_path / "res.ome.zarr"), voxel_size=(0.5, 0.1, 0.1))
    tru = write_ome_zarr(truth, str(tmp_path / "truth.ome.zarr"), voxel_size=(0.5, 0.1, 0.1))
    png = str(tmp_path / "fig.png")
    rep = compare(res, inp, truth=tru, out_png=png, quiet=True)
    js = json.load(open(str(tmp_path / "fig.json")))
    dr = float(truth.max() - truth.min())
    assert js["mode"] == "truth" and js["factors"] == [2, 2, 2] and js["region"]["whole"]
    assert js["result"]["psnr"] == pytest.approx(20 * math.log10(dr / delta), abs=1e-4)  # MSE = delta^2
    cubic = resize(torch.from_numpy(x.astype(np.float64))[None, None], (2, 2, 2), up=True)[0, 0].numpy()
    assert js["cubic"]["psnr"] == pytest.approx(psnr(truth, cubic.astype(np.float32), dr), abs=1e-4)
    assert js["cubic"]["ssim"] == pytest.approx(ssim(truth, cubic.astype(np.float32), dr), abs=1e-5)
    assert js["result"]["ssim"] == pytest.approx(ssim(truth, truth + delta, dr), abs=1e-5)
    # the line profile crosses the two close beads
    objs = sorted(js["profile"]["objects"], key=lambda p: p[2])
    assert js["profile"]["found_pair"]
    assert np.allclose(objs[0], (8, 30, 28), atol=1) and np.allclose(objs[1], (8, 30, 33), atol=1)
    dip = js["profile"]["dip"]
    assert dip["truth"] < dip["cubic"]  # the truth separates them better than cubic
    assert rep["result"] == js["result"]
    with PILImage.open(png) as im:
        w, h = im.size
    assert 800 <= w <= 3000 and 600 <= h <= 3000
    assert os.path.getsize(png) > 20_000


def test_compare_on_a_saturated_object_shows_the_dim_structure_and_finds_the_pair_beside_it(tmp_path):
    """Issue 28.2: on a neuron with a saturated soma the window was set by the soma (dim dendrites
    black), the soma's tied maxima were thousands of candidate peaks (9,746 profiles, each copying
    the volume: 20 of 22 s), and the profile crossed one object. Now the window leaves the ceiling
    out, the plateau is no candidate, the closest pair with a dip is found first, the slices are
    where the result differs most from cubic, and the figure says so."""
    pytest.importorskip("matplotlib")
    from svision_big import compare as C

    truth = _pair_volume((16, 64, 64))
    truth *= 100.0 / truth.max()  # beads at 100
    zz, yy, xx = np.mgrid[:16, :64, :64]
    truth += 5000.0 * np.exp(-(((zz - 8) / 4.0) ** 2 + ((yy - 50) / 6.0) ** 2 + ((xx - 50) / 6.0) ** 2))
    ceiling = 250.0
    truth = np.minimum(truth, ceiling).astype(np.float32)  # a soma far past the detector's ceiling
    assert C.saturated(truth) == ceiling and np.count_nonzero(truth == ceiling) > 500
    lo, hi = C.display_window(truth)
    assert np.percentile(truth, 99.9) == ceiling  # the old window ended at the ceiling
    assert hi < ceiling and hi == pytest.approx(np.percentile(truth[truth < ceiling], 99.5))
    pts = C.line_profile_points(truth)
    assert pts is not None
    objs = sorted((tuple(p) for p in pts), key=lambda p: p[2])
    assert np.allclose(objs[0], (8, 30, 28), atol=1) and np.allclose(objs[1], (8, 30, 33), atol=1)

    x = Degradation((2, 2, 2)).down(torch.from_numpy(truth.astype(np.float64))[None, None])[0, 0].numpy()
    inp = write_ome_zarr(x.astype(np.float32), str(tmp_path / "in.ome.zarr"), voxel_size=(1.0, 0.2, 0.2))
    res_v = truth.copy()
    res_v[3] += 20.0  # the result differs from everything in one plane
    res_v[:, 50] += 20.0
    res = write_ome_zarr(res_v, str(tmp_path / "res.ome.zarr"), voxel_size=(0.5, 0.1, 0.1))
    rep = C.compare(res, inp, out_png=str(tmp_path / "f.png"), quiet=True, gamma=0.5)
    fig = rep["figure"]
    assert fig["lateral_z"] == 3 and fig["axial_y"] == 50 and fig["gamma"] == 0.5
    assert fig["window"][1] < float(res_v.max())
    assert os.path.getsize(tmp_path / "f.png") > 20_000
    with pytest.raises(ValueError, match="gamma 0: use a positive number"):
        C.compare(res, inp, out_png=None, quiet=True, gamma=0)


def test_compare_without_two_close_objects_says_so_in_the_figure(tmp_path, monkeypatch):
    """Issue 28.2: where no pair of close objects exists the profile still crosses something; the
    report and the profile's title say that no pair was found (it was titled as a pair regardless)."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from svision_big.compare import compare

    truth = _bead((16, 64, 64), (8, 32, 32), (1.6, 1.3, 1.3)).astype(np.float32)  # one object alone
    x = Degradation((2, 2, 2)).down(torch.from_numpy(truth.astype(np.float64))[None, None])[0, 0].numpy()
    inp = write_ome_zarr(x.astype(np.float32), str(tmp_path / "in.ome.zarr"))
    res = write_ome_zarr(truth, str(tmp_path / "res.ome.zarr"))
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: titles.append(t) or real(ax, t, *a, **k)
    )
    rep = compare(res, inp, out_png=str(tmp_path / "f.png"), quiet=True)
    assert rep["profile"]["found_pair"] is False
    assert json.load(open(tmp_path / "f.json"))["profile"]["found_pair"] is False
    assert any(t.startswith("no two close objects found") for t in titles), titles
    assert not any(t.startswith("line profile across two close objects") for t in titles)
    # without a truth the figure's score is named for what it is (compare's table already said so)
    assert any("self-consistency PSNR (not a quality score)" in t for t in titles), titles


def test_compare_inset_is_where_the_result_differs_from_cubic_and_progress_is_shown(tmp_path, capsys):
    """Issue 28.2: a zoomed inset where the result and the baseline differ most, its region outlined
    on the full slices; and compare's slow phases on a progress line (minutes passed with no sign of
    life), silenced by quiet, JSON under --progress json."""
    pytest.importorskip("matplotlib")
    from svision_big import progress
    from svision_big.cli import main as cli_main
    from svision_big.compare import compare

    rng = np.random.default_rng(4)
    x = ndimage.gaussian_filter(rng.random((12, 48, 48)), 1.0).astype(np.float32) * 100
    inp = write_ome_zarr(x, str(tmp_path / "in.ome.zarr"))
    cub = resize(torch.from_numpy(x.astype(np.float64))[None, None], (2, 2, 2), up=True)[0, 0].numpy()
    y = cub.astype(np.float32)
    region = (slice(14, 16), slice(60, 64), slice(20, 24))  # the only place the result is not cubic
    y[region] += 30.0
    res = write_ome_zarr(y, str(tmp_path / "res.ome.zarr"))
    png = str(tmp_path / "f.png")
    rep = compare(res, inp, out_png=png, quiet=False)
    inset = rep["figure"]["inset"]
    (y0, y1), (x0, x1) = inset["box"]
    assert y1 - y0 == 32 and x1 - x0 == 32
    assert 14 <= inset["z"] < 16 and y0 <= 60 and 64 <= y1 and x0 <= 20 and 24 <= x1, inset
    assert json.load(open(tmp_path / "f.json"))["figure"]["inset"] == inset
    assert os.path.getsize(png) > 20_000
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("compare: 0/6 step") and "phase=read the region" in err[0], err
    assert err[-1].startswith("compare: 6/6 step (100%)") and err[-1].endswith("phase=done"), err
    assert len([e for e in err if "6/6" in e]) == 1  # the closing line once
    compare(res, inp, out_png=None, quiet=True)
    assert capsys.readouterr().err == ""
    saved = dict(progress._SETTINGS)
    try:
        progress.configure("json")
        compare(res, inp, out_png=None, quiet=False)
    finally:
        progress._SETTINGS.update(saved)
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert records[-1]["label"] == "compare" and records[-1]["done"] == records[-1]["total"] == 5
    # the CLI: --quiet silences both the lines and the table; --progress json reaches compare
    assert cli_main(["compare", res, inp, "--png", str(tmp_path / "c.png"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    assert cli_main(["compare", res, inp, "--png", str(tmp_path / "c.png"), "--progress", "json"]) == 0
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["phase"] == "done"


def test_compare_self_consistency(tmp_path):
    pytest.importorskip("matplotlib")
    from svision_big.compare import compare

    truth = _pair_volume()
    x = Degradation((2, 2, 2)).down(torch.from_numpy(truth.astype(np.float64))[None, None])[0, 0].numpy()
    inp = write_ome_zarr(x.astype(np.float32), str(tmp_path / "in.ome.zarr"))
    # the truth itself explains the input exactly: PSNR inf (null in JSON), SSIM 1
    res = write_ome_zarr(truth, str(tmp_path / "res.ome.zarr"))
    rep = compare(res, inp, out_png=None, out_json=str(tmp_path / "s.json"), quiet=True)
    js = json.load(open(str(tmp_path / "s.json")))
    assert js["mode"] == "self-consistency" and js["acquisition"] == "cubic"
    assert js["result"]["psnr"] is None or js["result"]["psnr"] > 80
    assert js["result"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert js["result"]["psnr"] is None or js["result"]["psnr"] > js["cubic"]["psnr"]
    # a result that is cubic upsampling scores exactly what cubic scores
    cub = resize(torch.from_numpy(x.astype(np.float64))[None, None], (2, 2, 2), up=True)[0, 0].numpy()
    res2 = write_ome_zarr(cub.astype(np.float32), str(tmp_path / "cub.ome.zarr"))
    rep = compare(res2, inp, out_png=None, out_json=None, quiet=True)
    assert rep["result"] == rep["cubic"]
    back = Degradation((2, 2, 2)).down(torch.from_numpy(cub.astype(np.float32).astype(np.float64))[None, None])
    expect = psnr(x.astype(np.float32), back[0, 0].numpy().astype(np.float32), float(x.max() - x.min()))
    assert rep["cubic"]["psnr"] == pytest.approx(expect, abs=1e-4)
    # the table says what the number means (issue 28.2: it was read as a quality score)
    from svision_big.compare import format_table

    text = format_table(rep)
    assert "not its quality" in text and "--truth" in text
    assert "not its quality" not in format_table({**rep, "mode": "truth"})


@pytest.mark.parametrize("shape", [(9, 14, 11), (1, 6, 7), (2, 1, 5), (13, 8), (5,)])
def test_compare_peak_filter_is_scipys_maximum_filter(shape):
    """Issue 28: the line profile's 3x3x3 maximum is two shifted np.maximum per axis (0.07 s where scipy took
    0.3 s on 100x408x408): the same array, ties (integer values) and thin axes included; with NaN, scipy's."""
    from svision_big.compare import _max3

    rng = np.random.default_rng(6)
    vol = rng.integers(0, 5, shape).astype(np.float32)  # many ties
    assert np.array_equal(_max3(vol), ndimage.maximum_filter(vol, size=3, mode="nearest"))
    noisy = rng.normal(size=shape)
    assert np.array_equal(_max3(noisy), ndimage.maximum_filter(noisy, size=3, mode="nearest"))
    noisy.flat[0] = np.nan
    assert np.array_equal(_max3(noisy), ndimage.maximum_filter(noisy, size=3, mode="nearest"), equal_nan=True)


def test_compare_crops_big_volumes(tmp_path):
    from svision_big.compare import compare

    x = np.random.default_rng(5).random((8, 32, 32)).astype(np.float32)
    y = resize(torch.from_numpy(x.astype(np.float64))[None, None], (2, 2, 2), up=True)[0, 0].numpy()
    inp = write_ome_zarr(x, str(tmp_path / "in.ome.zarr"))
    res = write_ome_zarr(y.astype(np.float32), str(tmp_path / "res.ome.zarr"))
    rep = compare(res, inp, out_png=None, max_voxels=16 * 32 * 32, quiet=True)
    assert not rep["region"]["whole"]
    n = [b - a for a, b in rep["region"]["result"]]
    assert np.prod(n) <= 16 * 32 * 32
    # margins: the crop's cubic equals the whole volume's cubic inside it, so the result == cubic
    assert rep["result"] == rep["cubic"]


# --------------------------------------------------------------------------- 5. notebook


def test_compare_notebook_runs_and_draws(tmp_path, monkeypatch):
    """notebooks/quickstart.ipynb runs top to bottom (30 training steps) and shows at least two images."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    here = os.path.dirname(os.path.abspath(__file__))
    nb = nbformat.read(os.path.join(here, "..", "notebooks", "quickstart.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped in git
    monkeypatch.setenv("SVB_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2
    assert (tmp_path / "nb_compare.png").exists() and (tmp_path / "nb_self.json").exists()
    rep = json.load(open(tmp_path / "nb_compare.json"))
    assert rep["mode"] == "truth" and rep["result"]["psnr"] is not None and rep["cubic"]["psnr"] is not None
    last = [c for c in nb.cells if c.cell_type == "code"][-1]  # out of core vs in memory: the largest difference
    assert float(last.outputs[-1]["data"]["text/plain"]) <= 1e-4


def test_cli_run_on_a_tiff_then_compare(tmp_path):
    """The CLI end to end: `run` takes an OME-TIFF (its voxel size kept), `compare` writes the
    figure and the JSON, and `convert` keeps the file's units when --unit is not given."""
    from svision_big.cli import main

    data = _rng((8, 24, 24), seed=3)
    tif = str(tmp_path / "stack.ome.tif")
    tifffile.imwrite(
        tif,
        data,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeZ": 1.0,
            "PhysicalSizeY": 200.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeX": 200.0,
            "PhysicalSizeXUnit": "nm",
        },
    )
    out = str(tmp_path / "out.ome.zarr")
    assert main(["run", tif, out, "--factor", "2", "--steps", "3", "--scheduler", "sync", "--quiet"]) == 0
    img = open_image(out)
    assert img.level(0).shape == (16, 48, 48) and img.scales[0] == [0.5, 100.0, 100.0]
    assert [a.get("unit") for a in img.axes] == ["micrometer", "nanometer", "nanometer"]
    src = next(str(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".ome.zarr") and f != "out.ome.zarr")
    png, js = str(tmp_path / "c.png"), str(tmp_path / "c.json")
    assert main(["compare", out, src, "--png", png, "--json", js]) == 0
    assert os.path.getsize(png) > 20_000 and json.load(open(js))
    assert main(["convert", tif, str(tmp_path / "conv.ome.zarr")]) == 0
    assert [a.get("unit") for a in open_image(str(tmp_path / "conv.ome.zarr")).axes][1:] == ["nanometer", "nanometer"]
