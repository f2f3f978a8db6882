"""OME-Zarr I/O: formats, transforms, pyramid, TIFF conversion, remote (S3) stores."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import zarr

from svision_big.convert import convert_tiff, write_ome_zarr
from svision_big.ngff import (
    FormatV04,
    FormatV05,
    NgffError,
    describe,
    downsampled_transform,
    format_for,
    multiscales_metadata,
    open_image,
    open_output_group,
    upsampled_transform,
)
from svision_big.pyramid import (
    build_pyramid,
    cumulative_factors,
    level_chunks,
    pyramid_datasets,
    pyramid_factors,
)


def _rng_image(shape, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, 4000, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _json(*parts) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _block_mean(a: np.ndarray, factors) -> np.ndarray:
    """Reference: floor-trimmed block mean in plain numpy."""
    trimmed = a[tuple(slice(0, (n // f) * f) for n, f in zip(a.shape, factors))]
    shape = []
    for n, f in zip(trimmed.shape, factors):
        shape += [n // f, f]
    return trimmed.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)), dtype=np.float64)


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------

CASES = {
    "2d": ("yx", (150, 133), (0.5, 0.25)),
    "3d": ("zyx", (21, 140, 131), (2.0, 0.5, 0.5)),
    "4d": ("czyx", (2, 9, 70, 67), (3.0, 1.0, 1.0)),
}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("case", list(CASES))
def test_write_round_trip(tmp_path, version, case):
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    axes, shape, voxel = CASES[case]
    data = _rng_image(shape)
    out = str(tmp_path / "img.ome.zarr")
    chunks = tuple(1 if a == "c" else 32 for a in axes)
    write_ome_zarr(data, out, axes=axes, voxel_size=voxel, ngff=version, chunks=chunks, name="synthetic")

    # Independent validators / readers agree.
    model = ome_zarr_models.open_ome_zarr(out)
    assert model.ome_zarr_version == version
    nodes = list(Reader(parse_url(out))())
    assert nodes, "ome-zarr-py found no image"
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), data)

    img = open_image(out)
    assert img.fmt.version == version
    assert img.axis_names == list(axes)
    assert img.spatial_axes == [i for i, a in enumerate(axes) if a != "c"]
    assert img.name == "synthetic"
    assert img.shape == shape and img.dtype == np.uint16 and img.ndim == len(axes)
    assert img.group.store.read_only
    for a in img.axes:
        assert a.get("unit") == ("micrometer" if a["name"] != "c" else None)
    scale0 = [1.0] * (len(axes) - len(voxel)) + list(voxel)
    assert img.scales[0] == scale0
    assert img.translations[0] == [0.0] * len(axes)
    assert img.nlevels >= 2
    for i in range(1, img.nlevels):
        D = [n0 // n for n0, n in zip(img.shape, img.level(i).shape)]
        s, t = downsampled_transform(scale0, [0.0] * len(axes), D)
        assert img.scales[i] == pytest.approx(s)
        assert img.translations[i] == pytest.approx(t)
    np.testing.assert_array_equal(img.level(0)[...], data)
    nch = shape[0] if axes[0] == "c" else 1
    assert len(img.omero["channels"]) == nch

    # On-disk layout of each version.
    if version == "0.4":
        attrs = _json(out, ".zattrs")
        assert attrs["multiscales"][0]["version"] == "0.4"
        assert _json(out, "0", ".zarray")["dimension_separator"] == "/"
        assert os.path.isdir(os.path.join(out, "0", "0"))  # nested "/" chunk keys
        assert not os.path.exists(os.path.join(out, "zarr.json"))
    else:
        meta = _json(out, "zarr.json")
        assert meta["zarr_format"] == 3
        assert meta["attributes"]["ome"]["version"] == "0.5"
        assert "multiscales" in meta["attributes"]["ome"]
        assert "version" not in meta["attributes"]["ome"]["multiscales"][0]
        for p in img.paths:
            arr_meta = _json(out, p, "zarr.json")
            assert arr_meta["dimension_names"] == list(axes)
        assert not os.path.exists(os.path.join(out, ".zattrs"))

    text = describe(out)
    assert f"NGFF version: {version}" in text and "micrometer" in text and "synthetic" in text


def test_axes_reordered_and_sharded(tmp_path):
    """Non-NGFF axis order is transposed to t,c,z,y,x; sharded 0.5 output validates."""
    import ome_zarr_models

    data = _rng_image((9, 2, 40, 36))  # z, c, y, x
    out = str(tmp_path / "s.ome.zarr")
    write_ome_zarr(data, out, axes="zcyx", chunks=(1, 4, 8, 8), shards=(1, 8, 16, 16))
    ome_zarr_models.open_ome_zarr(out)
    img = open_image(out)
    assert img.axis_names == ["c", "z", "y", "x"]
    assert img.shards == (1, 8, 16, 16) and img.chunks == (1, 4, 8, 8)
    np.testing.assert_array_equal(img.level(0)[...], data.transpose(1, 0, 2, 3))
    with pytest.raises(NgffError, match="sharding needs NGFF 0.5"):
        write_ome_zarr(data, str(tmp_path / "v4.zarr"), axes="zcyx", ngff="0.4", shards=(1, 8, 16, 16))


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------


def test_transforms_numeric():
    assert upsampled_transform([1.0], [0.0], [2]) == ([0.5], [-0.25])
    s, t = upsampled_transform([2.0, 0.5, 0.5], [10.0, 0.0, 1.0], [4, 2, 1])
    assert s == pytest.approx([0.5, 0.25, 0.5])
    assert t == pytest.approx([10.0 - 0.75, -0.125, 1.0])
    assert downsampled_transform([1.0], [0.0], [2]) == ([2.0], [0.5])
    s, t = downsampled_transform([0.5, 0.25], [1.0, -1.0], [4, 2])
    assert s == pytest.approx([2.0, 0.5])
    assert t == pytest.approx([1.75, -0.875])
    # Upsample then downsample by the same factor is the identity.
    s1, t1 = upsampled_transform([3.0, 0.7], [5.0, -2.0], 2)
    assert downsampled_transform(s1, t1, 2) == (pytest.approx([3.0, 0.7]), pytest.approx([5.0, -2.0]))


def _centre(scale, translation, shape):
    """Physical centre of the image extent (voxel i covers t + s*i +- s/2)."""
    return [t + s * (n - 1) / 2 for s, t, n in zip(scale, translation, shape)]


@pytest.mark.parametrize("f", [[2, 2, 2], [4, 2, 1], [3, 1, 5]])
def test_transforms_preserve_physical_centre(f):
    scale, trans, shape = [2.0, 0.4, 0.3], [7.0, -3.0, 0.25], [12, 30, 60]
    centre = _centre(scale, trans, shape)
    s_up, t_up = upsampled_transform(scale, trans, f)
    assert _centre(s_up, t_up, [n * k for n, k in zip(shape, f)]) == pytest.approx(centre)
    s_dn, t_dn = downsampled_transform(scale, trans, f)
    assert _centre(s_dn, t_dn, [n // k for n, k in zip(shape, f)]) == pytest.approx(centre)
    # Voxel edges line up too: the first upsampled voxel starts where the old one did.
    for s, t, su, tu in zip(scale, trans, s_up, t_up):
        assert tu - su / 2 == pytest.approx(t - s / 2)


# --------------------------------------------------------------------------
# Pyramid
# --------------------------------------------------------------------------


def test_pyramid_factors():
    # Thin z stops halving first; stops when all spatial axes <= 64.
    f = pyramid_factors((20, 300, 129), [0, 1, 2])
    assert f == [(1, 2, 2), (1, 2, 1), (1, 2, 1)]
    # Channel axis untouched; factors are per spatial axis.
    assert pyramid_factors((3, 100, 100), [1, 2]) == [(2, 2)]
    assert pyramid_factors((10, 10), [0, 1]) == []
    # until_shape forces going coarser than min_shape (e.g. an input's coarsest level).
    f = pyramid_factors((64, 256, 256), [0, 1, 2], min_shape=64, until_shape=(16, 32, 32))
    assert f == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert cumulative_factors(f, 3, [0, 1, 2])[-1] == (4, 8, 8)
    assert level_chunks((5, 100), (8, 32), (16, 64)) == ((5, 32), (5, 64))
    assert level_chunks((5, 40), (8, 32), (16, 128)) == ((5, 32), (5, 64))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_build_pyramid_block_mean(tmp_path, dtype, version):
    fmt = format_for(version)
    data = _rng_image((1, 23, 77, 51), dtype=dtype, seed=3)  # odd sizes everywhere
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    group = open_output_group(str(tmp_path / "p.zarr"), fmt, mode="w-")
    a0 = fmt.create_array(group, "0", data.shape, (1, 8, 16, 16), dtype, ["c", "z", "y", "x"])
    a0[...] = data
    factors = [(2, 2, 2), (1, 2, 2)]
    paths = build_pyramid(group, fmt, axes, "0", [1, 2, 3], factors, (1, 8, 16, 16), dtype)
    assert paths == ["1", "2"]
    assert group["1"].shape == (1, 11, 38, 25)
    assert group["2"].shape == (1, 11, 19, 12)
    expect = data.astype(np.float64)
    for p, f in zip(paths, factors):
        expect = _block_mean(expect if p == "1" else group["1"][...].astype(np.float64), (1, *f))
        got = group[p][...]
        assert got.dtype == dtype
        if np.issubdtype(dtype, np.integer):
            np.testing.assert_array_equal(got, np.round(expect).astype(dtype))
        else:
            np.testing.assert_allclose(got, expect, rtol=1e-6)

    scale0, t0 = [1.0, 2.0, 0.5, 0.5], [0.0, 5.0, 0.0, 0.0]
    datasets = pyramid_datasets(scale0, t0, [1, 2, 3], factors, paths)
    fmt.write_ome_attrs(group, multiscales_metadata(axes, datasets, name="p", version=version))
    img = open_image(str(tmp_path / "p.zarr"))
    assert img.paths == ["0", "1", "2"]
    assert img.scales[2] == pytest.approx([1.0, 4.0, 2.0, 2.0])
    assert img.translations[2] == pytest.approx([0.0, 6.0, 0.75, 0.75])
    for i in range(3):  # each level's first voxel centre = centre of its level-0 block
        D = [n0 // n for n0, n in zip(img.shape, img.level(i).shape)]
        for s, t, d, s0, tt0 in zip(img.scales[i], img.translations[i], D, scale0, t0):
            assert t == pytest.approx(tt0 + s0 * (d - 1) / 2)
            assert s == pytest.approx(s0 * d)


class _RecordingFormat(FormatV05):
    """Records every region written into arrays it creates (to check write alignment)."""

    def __init__(self):
        self.regions: list[tuple] = []
        self.lock = threading.Lock()

    def create_array(self, *args, **kwargs):
        arr = super().create_array(*args, **kwargs)
        fmt = self

        class Recorder:
            shape, dtype, ndim = arr.shape, arr.dtype, arr.ndim

            def __setitem__(self, key, value):
                with fmt.lock:
                    fmt.regions.append(key)
                arr[key] = value

        return Recorder()


def test_build_pyramid_sharded_writes(tmp_path):
    """Each task writes whole shards, and no shard is written twice (invariant 5)."""
    fmt = FormatV05()
    data = _rng_image((40, 70, 70), seed=5)
    group = open_output_group(str(tmp_path / "sh.zarr"), fmt, mode="w-")
    a0 = fmt.create_array(group, "0", data.shape, (8, 8, 8), data.dtype, "zyx", shards=(16, 16, 16))
    a0[...] = data
    rec = _RecordingFormat()
    build_pyramid(group, rec, list("zyx"), "0", [0, 1, 2], [(2, 2, 2)], (8, 8, 8), data.dtype, shards=(16, 16, 16))
    assert group["1"].shards == (16, 16, 16) and group["1"].shape == (20, 35, 35)
    np.testing.assert_array_equal(group["1"][...], np.round(_block_mean(data, (2, 2, 2))).astype(data.dtype))
    starts = []
    for region in rec.regions:
        for sl, n in zip(region, (20, 35, 35)):
            assert sl.start % 16 == 0 and sl.stop == min(sl.start + 16, n)
        starts.append(tuple(sl.start for sl in region))
    assert len(starts) == len(set(starts)) == 2 * 3 * 3  # one write per shard


# --------------------------------------------------------------------------
# TIFF conversion and errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_convert_tiff(tmp_path, compression):
    import ome_zarr_models
    import tifffile

    data = _rng_image((19, 90, 70), seed=7)
    tif = str(tmp_path / "stack.tif")
    tifffile.imwrite(tif, data, compression=compression, metadata={"axes": "ZYX"})
    out = str(tmp_path / "stack.ome.zarr")
    convert_tiff(tif, out, voxel_size=(2.0, 0.3, 0.3), chunks=(8, 32, 32))
    ome_zarr_models.open_ome_zarr(out)
    img = open_image(out)
    assert img.axis_names == ["z", "y", "x"]
    assert img.scales[0] == [2.0, 0.3, 0.3]
    assert img.name == "stack"
    assert img.chunks == (8, 32, 32)
    np.testing.assert_array_equal(img.level(0)[...], data)
    assert img.nlevels == 2 and img.level(1).shape == (19, 45, 35)

    with pytest.raises(NgffError, match="already exists: pass --overwrite"):
        convert_tiff(tif, out)
    convert_tiff(tif, out, overwrite=True, ngff="0.4")
    assert open_image(out).fmt.version == "0.4"
    assert not os.path.exists(os.path.join(out, "zarr.json"))  # old store fully replaced


def test_convert_tiff_inferred_axes_and_channels(tmp_path):
    import tifffile

    tif = str(tmp_path / "plain.tif")
    data = _rng_image((6, 40, 30), seed=2)
    tifffile.imwrite(tif, data, photometric="minisblack")  # tifffile axes "QYX"
    img = open_image(convert_tiff(tif, str(tmp_path / "a.zarr")))
    assert img.axis_names == ["z", "y", "x"]
    # Explicit axes in the TIFF's order: channels first after transposition.
    img = open_image(convert_tiff(tif, str(tmp_path / "b.zarr"), axes="cyx"))
    assert img.axis_names == ["c", "y", "x"] and len(img.omero["channels"]) == 6
    np.testing.assert_array_equal(img.level(0)[...], data)


def _plain_group(tmp_path):
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w-", zarr_format=3)
    plain.create_array("0", shape=(4, 4), dtype="u1")
    return str(tmp_path / "plain.zarr")


def _old_group(tmp_path, multiscales):
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w-", zarr_format=2)
    old.create_array("0", shape=(4, 4, 4), dtype="u1")
    old.attrs["multiscales"] = multiscales
    return str(tmp_path / "old.zarr")


def _bad_tiff(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    return str(bad)


def _dir_with_file(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("precious")
    return str(tmp_path / "dir")


# Each case: (call on tmp_path, exception, message, path that must not exist afterwards or None).
_ERRORS = {
    "missing tiff": (
        lambda t: convert_tiff(str(t / "missing.tif"), str(t / "o.zarr")),
        NgffError,
        "does not exist",
        "o.zarr",
    ),
    "not a tiff": (lambda t: convert_tiff(_bad_tiff(t), str(t / "o.zarr")), NgffError, "not a readable TIFF", "o.zarr"),
    "missing image": (lambda t: open_image(str(t / "nothing.zarr")), NgffError, r"does not exist$", "nothing.zarr"),
    "no multiscales": (lambda t: open_image(_plain_group(t)), NgffError, "no 'multiscales' metadata", None),
    "not a group": (lambda t: open_image(_dir_with_file(t)), NgffError, "not a zarr group", None),
    "version 0.3": (
        lambda t: open_image(_old_group(t, [{"version": "0.3", "axes": ["z", "y", "x"], "datasets": [{"path": "0"}]}])),
        NgffError,
        "unsupported NGFF version 0.3",
        None,
    ),
    "no axes (0.1/0.2)": (
        lambda t: open_image(_old_group(t, [{"datasets": [{"path": "0"}]}])),
        NgffError,
        "unsupported NGFF version",
        None,
    ),
    "format 0.3": (lambda t: format_for("0.3"), ValueError, "unsupported NGFF version '0.3': use 0.4 or 0.5", None),
    # Never truncate an existing store; never delete something that is not zarr.
    "mode w on a store": (
        lambda t: open_output_group(_plain_group(t), FormatV05(), mode="w"),
        NgffError,
        "mode 'w'",
        None,
    ),
    "v2 format on a v3 store": (
        lambda t: open_output_group(_plain_group(t), FormatV04()),
        NgffError,
        "needs zarr v2",
        None,
    ),
    "overwrite a non-zarr folder": (
        lambda t: write_ome_zarr(np.zeros((4, 4), np.uint8), _dir_with_file(t), axes="yx", overwrite=True),
        NgffError,
        "not a zarr store",
        None,
    ),
    "voxel_size length": (
        lambda t: write_ome_zarr(np.zeros((4, 4, 4), np.uint8), str(t / "v.zarr"), voxel_size=(1, 1)),
        ValueError,
        "voxel_size",
        None,
    ),
}


@pytest.mark.parametrize("case", list(_ERRORS))
def test_errors(tmp_path, case):
    call, exc, message, absent = _ERRORS[case]
    with pytest.raises(exc, match=message):
        call(tmp_path)
    if absent is not None:
        assert not (tmp_path / absent).exists()
    if (tmp_path / "dir").exists():  # nothing that is not zarr is deleted
        assert (tmp_path / "dir" / "keep.txt").read_text() == "precious"
    if (tmp_path / "plain.zarr").exists():  # an existing store is not truncated
        assert zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")["0"].shape == (4, 4)


def test_format_for_known_versions():
    assert isinstance(format_for("0.4"), FormatV04) and format_for("0.5").zarr_format == 3


# --------------------------------------------------------------------------
# Remote store (S3 on loopback)
# --------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_round_trip(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("bucket")
    data = _rng_image((10, 40, 36), seed=11)
    url = "s3://bucket/img.ome.zarr"
    write_ome_zarr(data, url, voxel_size=(2, 1, 1), chunks=(8, 16, 16), storage_options=s3_server)
    assert fs.exists("bucket/img.ome.zarr/zarr.json")
    img = open_image(url, storage_options=s3_server)
    assert img.fmt.version == "0.5" and img.axis_names == ["z", "y", "x"]
    assert img.group.store.read_only
    assert img.scales[0] == [2.0, 1.0, 1.0]
    np.testing.assert_array_equal(img.level(0)[...], data)
    with pytest.raises(NgffError, match="already exists"):
        write_ome_zarr(data, url, storage_options=s3_server)
    with pytest.raises(NgffError, match="does not exist"):
        open_image("s3://bucket/missing.ome.zarr", storage_options=s3_server)


def test_a_new_ngff_version_is_one_registered_subclass(tmp_path, monkeypatch):
    """Issue 29.4: version differences live in the format classes, which also say how reading finds
    them; a version registered in ``_FORMATS`` is written, detected and read with no other change,
    and the command line's --ngff choices are the registry's."""
    from svision_big import cli, ngff
    from svision_big.convert import write_ome_zarr

    class FormatV06(ngff.FormatV05):
        version = "0.6"

    vol = np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16)
    monkeypatch.setattr(ngff.format, "_FORMATS", {**ngff._FORMATS, "0.6": FormatV06()})
    url = write_ome_zarr(vol, str(tmp_path / "v06.ome.zarr"), ngff="0.6")
    img = ngff.open_image(url)
    assert img.fmt.version == "0.6" and img.group.attrs["ome"]["version"] == "0.6"
    np.testing.assert_array_equal(img.read(0), vol)
    monkeypatch.undo()  # unregistered again: named, not misread as 0.5
    with pytest.raises(ngff.NgffError, match="unsupported NGFF version 0.6"):
        ngff.open_image(url)
    parser = cli.build_parser()
    for cmd in (["convert", "a.tif", "b"], ["enhance", "a", "b", "--model", "m"]):
        action = next(a for a in parser._subparsers._group_actions[0].choices[cmd[0]]._actions if a.dest == "ngff")
        assert tuple(action.choices) == ngff.SUPPORTED_VERSIONS
