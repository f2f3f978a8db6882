"""The lateral-to-axial stage (``fit(axial="lateral")``): z resolution learnt from the lateral planes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import svision_big as svb
from svision_big import lateral, pipeline, synthetic
from svision_big import train as T
from svision_big.convert import write_ome_zarr
from svision_big.metrics import psnr
from svision_big.model import load_model
from svision_big.network import NetConfig, SVNet
from svision_big.ngff import open_image


def _bspline_z(lr: np.ndarray, f: int) -> np.ndarray:
    from scipy import ndimage

    return np.maximum(ndimage.zoom(lr, (f, 1, 1), order=3, grid_mode=True, mode="grid-mirror"), 0)


def _blockwise_error(model, lr: np.ndarray, tmp_path) -> float:
    """Largest difference, over the result's peak, between the pipeline's blocks and the whole-volume
    output, on an odd-sized crop (outer faces and partial blocks)."""
    crop = lr[:13, :37, :29]
    write_ome_zarr(crop, str(tmp_path / "in.ome.zarr"), axes="zyx")
    pipeline.enhance(
        str(tmp_path / "in.ome.zarr"),
        str(tmp_path / "o"),
        model,
        block=(4, 16, 16),
        dtype="float32",
        scheduler="sync",
        progress=False,
    )
    whole = model.enhance(crop, dtype="float32")
    return float(np.abs(open_image(str(tmp_path / "o")).level(0)[...] - whole).max()) / float(whole.max())


def _random_2d_nets():
    """(factor, 2D net with random weights): x2 with grouped mapping layers, x4 with dense ones."""
    for f, groups in ((2, 2), (4, 1)):
        torch.manual_seed(f)
        net2d = SVNet(NetConfig(factors=(f, 1), interpolation="bspline", groups=groups, mapping=2 + groups))
        for p in net2d.parameters():
            p.data.normal_(0.0, 0.3)
        yield f, net2d


def test_embedded_net_is_the_mean_of_the_2d_net_along_both_lateral_axes():
    """The 3D net the model file keeps computes exactly the 2D net run on every (z, y) plane and on
    every (z, x) plane, averaged: random weights, x2 and x4, grouped and dense mapping layers."""
    for f, net2d in _random_2d_nets():
        net3 = lateral.embed(net2d)
        x = torch.rand(1, 1, 9, 14, 11)
        with torch.no_grad():
            y = net3(x)[0, 0]
            along_y = net2d(x[0, 0].permute(2, 0, 1)[:, None])[:, 0].permute(1, 2, 0)
            along_x = net2d(x[0, 0].permute(1, 0, 2)[:, None])[:, 0].permute(1, 0, 2)
        assert y.shape == (9 * f, 14, 11)
        assert float((y - 0.5 * (along_y + along_x)).abs().max()) <= 1e-5 * float(y.abs().max())


def test_planar_inference_equals_the_embedded_net_on_blocks_and_faces():
    """What the model runs (``PlanarNet``: the two 2D branches on planes, no zero taps) computes the
    embedded 3D net it is stored as: whole volume and a block with halo sides, every ensemble size,
    from the grouped and from the densified embedding."""
    from svision_big.operator import predict

    for _, net2d in _random_2d_nets():
        net3 = lateral.embed(net2d)
        x = torch.rand(40, 45, 41)
        with torch.no_grad():
            for src in (net3, net3.densified()):
                planar = lateral.PlanarNet(src)
                for faces in (None, ((True, False), (False, True), (False, False))):
                    for e in (1, 4, 8):
                        want = predict(net3, x, e, faces, zflip=True)
                        got = predict(planar, x, e, faces, zflip=True)
                        assert got.shape == want.shape
                        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_axial_blur_is_estimated_from_the_lateral_planes():
    """Filaments blurred 2 voxels laterally and 5 axially, z block-averaged by 2: the extra axial blur
    that makes the lateral planes look like z is sqrt(5^2 - 2^2) = 4.58 voxels."""
    acq = synthetic.make_volume("filaments", shape_lr=(32, 64, 64), factor=(2, 1, 1), seed=1)
    assert acq.psf_fwhm == (5.0, 2.0, 2.0)
    am = lateral.estimate_axial(acq.observed, 2, 2.0, ("integrate",))
    assert am.estimated and am.acquisition == "integrate"
    assert abs(am.extra_fwhm - math.sqrt(21.0)) <= 0.75, am


def test_lateral_stage_gains_over_the_bspline_and_runs_in_blocks(tmp_path):
    """Filaments x(2,1,1), axial PSF 2.5x the lateral: the lateral stage beats the B-spline against the
    truth, its model file keeps the stage's kind and output, and the pipeline computes it in blocks
    exactly as on the whole volume."""
    acq = synthetic.make_volume("filaments", shape_lr=(24, 64, 64), factor=(2, 1, 1), seed=2)
    lr = acq.observed.astype(np.float32)
    model = svb.fit(lr, factor=(2, 1, 1), steps=200, seed=0, quiet=True, axial="lateral", acquisition="integrate")
    assert model.stages[0].kind == "lateral" and model.info["axial"]["stage"] == "lateral"
    out = model.enhance(lr, dtype="float32")
    r = float(acq.truth.max())
    assert psnr(acq.truth, out, r) > psnr(acq.truth, _bspline_z(lr, 2), r) + 0.5
    path = tmp_path / "m.svb"
    model.save(path)
    again = load_model(path)
    assert again.stages[0].kind == "lateral"
    assert isinstance(again.spec().stages[0].net, lateral.PlanarNet)  # run on planes, not as the stored 3D net
    assert np.array_equal(again.enhance(lr, dtype="float32"), out)
    assert _blockwise_error(model, lr, tmp_path) == 0.0  # planes run one by one: blocks are bit-equal


@pytest.mark.parametrize(
    "factor,options,message",
    [
        ((2, 2, 2), {}, "needs a z-only factor"),
        ((1, 2, 2), {}, "needs a z-only factor"),
        ((2, 1, 1), {"z_spacing": 1.0}, "at least 2 lateral voxels apart"),
        ((2, 1, 1), {"z_spacing": -1}, "positive number"),
    ],
)
def test_axial_lateral_refuses_what_it_cannot_do(factor, options, message):
    v = np.random.default_rng(0).random((16, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        svb.fit(v, factor=factor, steps=1, quiet=True, axial="lateral", **options)


def test_unknown_axial_choice_is_named():
    v = np.random.default_rng(0).random((16, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="axial 'iso': choose one of 3d, lateral"):
        svb.fit(v, factor=(2, 1, 1), steps=1, quiet=True, axial="iso")


def test_a_denoised_input_gets_the_denoiser_then_the_lateral_stage_in_blocks(tmp_path):
    """Where the noise decision denoises (here asked for), the lateral stage learns from the filter's
    output and runs after it: the model is [denoiser, lateral or its baseline], and blocks equal the
    whole volume through both stages."""
    acq = synthetic.make_volume("filaments", shape_lr=(24, 64, 64), factor=(2, 1, 1), poisson_peak=100.0, seed=5)
    lr = acq.observed.astype(np.float32)
    model = svb.fit(lr, factor=(2, 1, 1), steps=60, seed=0, quiet=True, axial="lateral", denoise="on")
    assert [s.kind for s in model.stages][0] == "denoiser" and model.stages[1].kind in ("lateral", "baseline")
    assert model.info["denoiser"] and model.info["baseline"]["verdict"].startswith("denoised, then ")
    assert _blockwise_error(model, lr, tmp_path) == 0.0  # planes run one by one: blocks are bit-equal


def test_operator_and_ensemble_choices_reach_the_lateral_stage():
    """--operator baseline gives the better cubic whatever the check says, network the lateral stage,
    --ensemble 8 is kept (scored by the 2D check as 4), and projected is refused in one line."""
    acq = synthetic.make_volume("filaments", shape_lr=(16, 48, 48), factor=(2, 1, 1), seed=7)
    lr = acq.observed.astype(np.float32)
    base = svb.fit(lr, factor=(2, 1, 1), steps=5, quiet=True, axial="lateral", operator="baseline")
    assert [s.kind for s in base.stages] == ["baseline"] and base.info["baseline"]["verdict"].endswith(
        "(--operator baseline)"
    )
    net = svb.fit(lr, factor=(2, 1, 1), steps=5, quiet=True, axial="lateral", operator="network", ensemble=8)
    assert [s.kind for s in net.stages] == ["lateral"] and net.stages[0].ensemble == 8
    assert net.info["baseline"]["verdict"] == "lateral stage x2 in z, ensemble 8 (--operator network)"
    with pytest.raises(ValueError, match="^operator projected is not offered with axial lateral"):
        svb.fit(lr, factor=(2, 1, 1), steps=1, quiet=True, axial="lateral", operator="projected")


def test_the_lateral_check_picks_the_residual_interpolation():
    """The 2D stage is trained once per residual interpolation and scored on the held-aside lateral
    planes; the lower one is kept, recorded, and is what the stored net corrects. A config that names
    the interpolation trains only that one."""
    acq = synthetic.make_volume("filaments", shape_lr=(16, 48, 48), factor=(2, 1, 1), seed=7)
    lr = acq.observed.astype(np.float32)
    model = svb.fit(lr, factor=(2, 1, 1), steps=20, seed=0, quiet=True, axial="lateral", operator="network")
    report = model.stages[0].report
    tried = report["residual_scores"]
    assert set(tried) == set(lateral.LATERAL_RESIDUALS) == {"bspline", "keys"}
    assert report["residual"] == min(tried, key=tried.get) == model.stages[0].config.interpolation
    one = svb.fit(
        lr,
        factor=(2, 1, 1),
        steps=20,
        seed=0,
        quiet=True,
        axial="lateral",
        operator="network",
        config=T.TrainConfig(steps=20, net={"interpolation": "keys"}),
    )
    assert set(one.stages[0].report["residual_scores"]) == {"keys"} and one.stages[0].config.interpolation == "keys"
