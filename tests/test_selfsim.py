"""The input's own blur and acquisition (``selfsim``), and training pairs blurred as the input is."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import svision_big as svb
from svision_big import harmcheck, noisecheck, selfsim, synthetic
from svision_big.degrade import blur, resize
from svision_big.metrics import psnr

T = importlib.import_module("svision_big.train")  # the module: svision_big.train is also a function

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.one_torch_thread


def _points(shape=(32, 48, 48), n=300, seed=0) -> np.ndarray:
    """Sparse single-voxel points: a white spectrum, so all the blur is the PSF's."""
    rng = np.random.default_rng(seed)
    x = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, s, n) for s in shape)
    x[idx] = rng.uniform(0.5, 1.0, n).astype(np.float32)
    return x


def test_pair_blur_makes_the_target_as_blurred_per_voxel_as_the_truth():
    """Blurring an input of blur p by ``pair_blur`` gives blur f*p (FWHMs add in quadrature): the
    premise of the pairs."""
    x = torch.from_numpy(_points((64, 8, 8), n=20, seed=1))
    p = 2.0
    once = blur(blur(x, (p, 0.0, 0.0)), selfsim.pair_blur((p, 0.0, 0.0), (2, 1, 1)))
    direct = blur(x, (2 * p, 0.0, 0.0))
    assert selfsim.pair_blur((p, 0.0), (2, 1)) == pytest.approx((p * 3**0.5, 0.0))
    assert float((once - direct).abs().max()) < 0.02 * float(direct.abs().max())


@pytest.mark.parametrize("fwhm", [2.0, 3.0])
def test_estimate_recovers_a_known_blur_on_the_resampled_axis_only(fwhm):
    """Points blurred along z by ``fwhm`` input voxels: the estimate finds it within 20% (the grid
    is 0.25 / sqrt(3) voxels), and reports 0 on the axes the factor does not resample."""
    x = blur(torch.from_numpy(_points()), (fwhm, 1.0, 1.0)).numpy()
    got = selfsim.estimate(x, (2, 1, 1), ("sample",))
    assert got.acquisition == "sample" and set(got.scores) == {"sample"}
    assert got.psf_fwhm[1:] == (0.0, 0.0)
    assert abs(got.psf_fwhm[0] - fwhm) <= 0.2 * fwhm, got


def test_estimate_finds_little_blur_in_sharp_data_and_picks_the_acquisition_that_made_it():
    """Sharp points, recorded by an antialiased cubic downscale: the cubic model explains them best
    (its own low-pass is the only blur), and the blur left over is small."""
    truth = _points((64, 96, 96), n=2000, seed=2)
    lr = resize(torch.from_numpy(truth), (2, 2, 2), up=False, acquisition="cubic").numpy()
    got = selfsim.estimate(lr, (2, 2, 2))
    assert set(got.scores) == {"cubic", "integrate", "sample"}
    assert got.acquisition == "cubic", got.scores
    assert max(got.psf_fwhm) < 1.2, got


def test_odd_lengths_are_estimated():
    """A 75-slice stack (the lattice light-sheet volume of benchmarks/quality.py) once raised here."""
    x = blur(torch.from_numpy(_points((33, 31, 48))), (2.0, 2.0, 1.0)).numpy()
    got = selfsim.estimate(x, (2, 2, 1), ("integrate",))
    assert got.psf_fwhm[2] == 0.0 and all(p > 0 for p in got.psf_fwhm[:2])


def test_short_axes_are_not_estimated():
    x = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    assert selfsim.estimate(x, (2, 2, 2), ("integrate",)).psf_fwhm[0] == 0.0


def _stage_report(model, i=0) -> dict:
    """The trained stage's report, also when the model fell back to its baseline."""
    rep = model.stages[-1].report
    return rep["trained"][i] if "trained" in rep else model.stages[i].report


def test_fit_records_the_estimate_and_a_given_psf_replaces_it():
    acq = synthetic.make_volume("beads", shape_lr=(16, 48, 48), factor=(2, 1, 1), seed=4)
    lr = acq.observed
    auto = svb.fit(lr, factor=(2, 1, 1), steps=2, quiet=True)
    info = auto.info["acquisition"]
    ss = info["self_similarity"]
    assert set(ss["scores"]) == {"cubic", "integrate", "sample"}
    assert info["trained_with"] == ss["acquisition"] == min(ss["scores"], key=ss["scores"].get)
    assert info["psf_fwhm"][1:] == [0.0, 0.0] and info["psf_fwhm"][0] > 0 and not info["psf_given"]
    p = info["psf_fwhm"][0]
    assert _stage_report(auto)["pair_blur"] == pytest.approx([p * 3**0.5, 0.0, 0.0])
    given = svb.fit(lr, factor=(2, 1, 1), steps=2, quiet=True, acquisition="sample", psf_fwhm=(1.5, 0.0, 0.0))
    gi = given.info["acquisition"]
    assert gi["psf_given"] and gi["self_similarity"] is None and gi["trained_with"] == "sample"
    assert _stage_report(given)["pair_blur"] == pytest.approx([1.5 * 3**0.5, 0.0, 0.0])
    assert all(st.degradation.psf_fwhm is None for st in given.stages)  # the PSF is in the truth: nothing to deconvolve


@pytest.mark.slow
def test_well_sampled_blurred_data_gain_over_cubic_at_defaults():
    """Point-sampled, PSF-blurred beads x(2,1,1) (axial FWHM about 1.9 input voxels): pairs built from
    the input alone over-sharpened them (-4.7 dB against cubic in benchmarks/quality.py); with
    pairs blurred as the input is, the default fit beats cubic against the truth."""
    rng = np.random.default_rng(5)
    truth = np.zeros((48, 64, 64), np.float32)
    n = 400
    truth[tuple(rng.integers(0, s, n) for s in truth.shape)] = rng.uniform(0.5, 1.0, n)
    truth = blur(torch.from_numpy(truth), (3.75, 1.5, 1.5)).numpy()
    truth /= truth.max()
    lr = resize(torch.from_numpy(truth), (2, 1, 1), up=False, acquisition="sample").numpy()  # at cell centres
    model = svb.fit(lr, factor=(2, 1, 1), steps=300, seed=0, quiet=True)
    out = np.asarray(model.enhance(lr))
    cub = resize(torch.from_numpy(lr), (2, 1, 1), up=True, acquisition="sample").numpy()
    b = model.info["baseline"]
    assert not b["used"] or b["back_projection"], b  # the network or a back-projected baseline, not a plain one
    assert psnr(truth, out, 1.0) > psnr(truth, cub, 1.0) + 1.0


def test_noise_the_filter_refuses_trains_as_clean_and_is_kept_in_the_check(monkeypatch):
    """When the noise model claims noise the blind filter will not remove, the SR stages train as
    clean (pairs blurred as the input is, no noise matching), while the held-aside check gets
    noise-matched sources and recorrupted targets built from that claim."""
    from svision_big.noise import NoiseModel

    claimed = NoiseModel(gain=1e-3, offset=1e-5)
    claim = lambda v, mode: claimed if mode not in (False, "off", None) else None  # noqa: E731
    monkeypatch.setattr(noisecheck, "choose_noise", claim)  # the input's noise ...
    monkeypatch.setattr(T, "choose_noise", claim)  # ... and each stage's

    def refuse(v, report, nm):
        report.update(used=False)
        return False

    monkeypatch.setattr(noisecheck, "worth_denoising", refuse)
    seen = {}
    real = harmcheck.do_no_harm

    def spy(model, deg, v, cfg, *a, **kw):
        seen["check"] = deg
        return real(model, deg, v, cfg, *a, **kw)

    monkeypatch.setattr(T, "do_no_harm", spy)
    acq = synthetic.make_volume("beads", shape_lr=(16, 48, 48), factor=2, seed=6)
    model = svb.fit(acq.observed, factor=2, steps=2, quiet=True)
    assert model.info["acquisition"]["self_similarity"] is not None
    assert model.info["noise_estimate"] is None and not model.info["denoiser"]
    assert _stage_report(model)["noise"] is None
    assert seen["check"].noise == (claimed.gain, claimed.offset)
    assert seen["check"].acquisition == model.info["acquisition"]["trained_with"]


def test_acquisitions_the_input_cannot_tell_apart_are_named(capsys):
    """Block means of blurred points match point samples almost as well (a box blurs like a Gaussian):
    ``fit`` says so and names the flag; sharp cubic-resized points have no rival."""
    from svision_big.settings import FitOptions, fit_request

    truth = _points((64, 96, 96), n=2000, seed=2)
    sharp = resize(torch.from_numpy(truth), (2, 2, 2), up=False, acquisition="cubic").numpy()
    assert selfsim.estimate(sharp, (2, 2, 2)).rivals() == {}
    lr = resize(blur(torch.from_numpy(truth), (6.0, 4.0, 4.0)), (2, 2, 2), up=False, acquisition="integrate").numpy()
    found = selfsim.estimate(lr, (2, 2, 2))
    assert found.acquisition == "integrate" and set(found.rivals()) == {"sample"}, found.scores
    assert found.record()["ambiguous_with"].keys() == {"sample"}
    T.decide_acquisition(lr, fit_request(lr, 2, FitOptions()), noisy=False)
    out = capsys.readouterr().out
    assert "acquisition ambiguous: sample" in out and "--acquisition" in out, out
    T.decide_acquisition(lr, fit_request(lr, 2, FitOptions(acquisition="integrate")), noisy=False)
    assert "ambiguous" not in capsys.readouterr().out  # given: nothing to say
