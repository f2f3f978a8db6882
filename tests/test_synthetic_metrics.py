"""Tests for synthetic volumes (svision_big.synthetic) and metrics (svision_big.metrics)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from svision_big import metrics, synthetic
from svision_big.metrics import bead_fwhm, fwhm_profile, psnr, ssim
from svision_big.synthetic import Acquisition, acquire, beads, filaments, make_volume, psf_blur

# ----------------------------------------------------------------------------- metrics


def test_psnr_identical_is_inf():
    a = np.random.default_rng(0).random((5, 6, 7))
    assert psnr(a, a.copy()) == math.inf


def test_psnr_hand_computation():
    ref = np.array([[0.0, 1.0], [2.0, 3.0]])
    test = np.array([[0.0, 1.0], [2.0, 5.0]])  # one error of 2 -> MSE = 4 / 4 = 1
    # default data range = 3 - 0 = 3 -> 10 log10(9 / 1)
    assert psnr(ref, test) == pytest.approx(10 * math.log10(9.0))
    assert psnr(ref, test, data_range=255) == pytest.approx(10 * math.log10(255.0**2))


def test_psnr_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((3, 3)), np.zeros((3, 4)))


def test_psnr_integer_inputs_do_not_overflow():
    ref = np.array([0, 255], dtype=np.uint8)
    test = np.array([255, 0], dtype=np.uint8)
    assert psnr(ref, test, data_range=255) == pytest.approx(0.0)


def test_ssim_identical_and_noisy():
    rng = np.random.default_rng(1)
    a = ndimage_smooth(rng.random((16, 24, 24)))
    assert abs(ssim(a, a.copy()) - 1.0) < 1e-12
    noisy = a + rng.normal(scale=0.05, size=a.shape)
    s = ssim(a, noisy)
    assert s < 0.99
    assert ssim(a, a + rng.normal(scale=0.2, size=a.shape)) < s


def ndimage_smooth(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(a, 1.0)


def _ssim_before(reference, test, data_range, sigma=1.5):
    """SSIM as metrics.ssim computed it before issue 28.2 made it faster: five whole-volume filters per pair."""
    from scipy import ndimage

    ref, tst = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(a):
        return ndimage.gaussian_filter(a, sigma=sigma, truncate=3.5, mode="reflect")

    ux, uy = filt(ref), filt(tst)
    vx, vy, vxy = filt(ref * ref) - ux * ux, filt(tst * tst) - uy * uy, filt(ref * tst) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = int(3.5 * sigma + 0.5)
    return float(s[tuple(slice(pad, n - pad) if n > 2 * pad else slice(None) for n in s.shape)].mean(dtype=np.float64))


@pytest.mark.parametrize("shape", [(16, 40, 36), (3, 30, 70), (48, 40), (5, 7, 9)])
def test_ssim_is_the_value_it_was_before_it_was_made_faster(shape):
    """Issue 28.2: SSIM was 11 s of compare's 16.6 s CPU. It now filters the reference once for
    several tests, crops after each separable pass and runs independent filters on threads; the value
    is the old implementation's to rounding (1e-12 here; the brief allowed 1e-6)."""
    rng = np.random.default_rng(3)
    ref = (rng.random(shape) * 255).astype(np.float32)
    tests = [ref + rng.normal(0, 6, shape).astype(np.float32), np.minimum(1.2 * ref, 255).astype(np.float32), ref]
    many = metrics.ssim_many(ref, tests, 255.0)
    for t, m in zip(tests, many):
        assert m == ssim(ref, t, 255.0)
        assert abs(m - _ssim_before(ref, t, 255.0)) < 1e-12
        assert psnr(ref, t, 255.0) == pytest.approx(
            10 * math.log10(255.0**2 / np.mean((ref.astype(np.float64) - t.astype(np.float64)) ** 2))
            if not np.array_equal(ref, t)
            else math.inf,
            rel=1e-15,
        )
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.ssim_many(ref, [ref[:-1]])


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("shape", [(23, 30, 26), (40, 33), (3, 30, 70)])
def test_ssim_in_slabs_is_the_value_of_the_whole_volume(monkeypatch, shape, rows):
    """Issue 28: SSIM sums its map slab by slab along axis 0, each slab read with the rows its filter needs
    around it (a few MiB per intermediate, not a volume's page faults). Slabs of 1, 3 and 7 rows, a last slab
    shorter than the rest, and an axis 0 too short to crop (one slab, reflected) give the whole-volume value."""
    rng = np.random.default_rng(5)
    ref = (rng.random(shape) * 255).astype(np.float32)
    tests = [ref + rng.normal(0, 6, shape).astype(np.float32), np.minimum(1.2 * ref, 255).astype(np.float32)]
    monkeypatch.setattr(metrics, "SLAB_BYTES", rows * 8 * math.prod(shape[1:]))
    for t, m in zip(tests, metrics.ssim_many(ref, tests, 255.0)):
        assert abs(m - _ssim_before(ref, t, 255.0)) < 1e-12


@pytest.mark.parametrize("shape", [(14, 20, 22), (30, 27)])
def test_ssim_matches_skimage(shape):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    ref = rng.random(shape)
    test = ref + rng.normal(scale=0.3, size=shape)
    ours = ssim(ref, test, data_range=1.0)
    theirs = skm.structural_similarity(
        ref, test, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ours == pytest.approx(theirs, abs=1e-10)


def test_metrics_does_not_import_skimage():
    import subprocess
    import sys

    code = "import sys, svision_big.metrics, svision_big.synthetic; print('skimage' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("sigma", [3.0, 4.5, 7.0])
def test_fwhm_of_sampled_gaussian(sigma):
    x = np.arange(201) - 100.3  # off-grid centre
    profile = 5.0 + 2.0 * np.exp(-0.5 * (x / sigma) ** 2)  # baseline is ignored
    assert fwhm_profile(profile) == pytest.approx(2.3548 * sigma, rel=0.02)


def test_fwhm_unbracketed_is_nan():
    assert math.isnan(fwhm_profile(np.linspace(0, 1, 20)))  # monotonic: no right crossing


def test_bead_fwhm_grows_with_psf():
    obj = beads((48, 64, 64), n=12, radius=(0.5, 0.8), rng=3)
    measured = {}
    for f in (3.0, 6.0):
        vol = psf_blur(obj, (2 * f, f, f))
        measured[f] = (bead_fwhm(vol, axis=2), bead_fwhm(vol, axis=0))
    lat3, ax3 = measured[3.0]
    lat6, ax6 = measured[6.0]
    assert lat6 > 1.5 * lat3
    assert ax6 > 1.5 * ax3
    assert ax3 > 1.5 * lat3  # axial PSF is twice the lateral
    # A small bead blurred by FWHM f measures close to f.
    assert lat6 == pytest.approx(6.0, rel=0.15)
    assert ax6 == pytest.approx(12.0, rel=0.15)


# ----------------------------------------------------------------------------- synthetic


def test_psf_blur_single_point_fwhm():
    vol = np.zeros((41, 41, 81), dtype=np.float32)
    vol[20, 20, 40] = 1.0
    out = psf_blur(vol, (4.0, 6.0, 10.0))
    assert out.dtype == np.float32
    assert out.sum() == pytest.approx(1.0, rel=1e-4)
    assert fwhm_profile(out[:, 20, 40]) == pytest.approx(4.0, rel=0.05)
    assert fwhm_profile(out[20, :, 40]) == pytest.approx(6.0, rel=0.05)
    assert fwhm_profile(out[20, 20, :]) == pytest.approx(10.0, rel=0.05)


def test_beads_sparse_and_bounded():
    vol = beads((32, 64, 64), n=20, radius=(1.0, 2.0), rng=0)
    assert vol.dtype == np.float32 and vol.shape == (32, 64, 64)
    assert 0.0 <= vol.min() and vol.max() <= 1.0
    assert 0 < np.count_nonzero(vol) / vol.size < 0.01


def test_beads_sub_voxel_antialiasing():
    vol = beads((16, 16), n=1, radius=(2.0, 2.0), rng=5, intensity=(1.0, 1.0))
    levels = np.unique(vol)
    assert ((levels > 0) & (levels < 1)).any()  # partial-volume edge voxels exist


def test_filaments_connected_smooth_curves():
    from scipy import ndimage

    vol = filaments((32, 64, 64), n=1, thickness=1.5, rng=4)
    assert vol.dtype == np.float32
    frac = np.count_nonzero(vol) / vol.size
    assert 0.002 < frac < 0.1
    _, n_components = ndimage.label(vol > 0.2)
    assert n_components == 1  # a single filament is one connected tube


def test_acquire_shapes_and_truth():
    obj = beads((16, 32, 48), n=10, rng=0)
    acq = acquire(obj, factor=(2, 4, 2), psf_fwhm=(6.0, 3.0, 3.0))
    assert isinstance(acq, Acquisition)
    assert acq.truth.shape == obj.shape and acq.truth.dtype == np.float32
    assert acq.observed.shape == (8, 8, 24) and acq.observed.dtype == np.float32
    assert acq.factor == (2, 4, 2) and acq.psf_fwhm == (6.0, 3.0, 3.0)
    # Noise-free observed = block average of truth (pixel-centre aligned).
    expect = acq.truth.reshape(8, 2, 8, 4, 24, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(acq.observed, expect, rtol=1e-5, atol=1e-7)


def test_acquire_indivisible_shape_raises():
    with pytest.raises(ValueError, match="not divisible"):
        acquire(np.zeros((10, 33, 32), np.float32), factor=2, psf_fwhm=2.0)
    with pytest.raises(ValueError, match="3 axes"):
        acquire(np.zeros((10, 32, 32), np.float32), factor=(2, 2), psf_fwhm=2.0)


def test_acquire_deterministic_and_noise():
    obj = beads((16, 32, 32), n=10, rng=0)
    a = acquire(obj, 2, 3.0, noise=0.05, poisson_peak=50, seed=7)
    b = acquire(obj, 2, 3.0, noise=0.05, poisson_peak=50, seed=7)
    c = acquire(obj, 2, 3.0, noise=0.05, poisson_peak=50, seed=8)
    np.testing.assert_array_equal(a.observed, b.observed)
    assert not np.array_equal(a.observed, c.observed)
    assert a.observed.min() >= 0
    clean = acquire(obj, 2, 3.0)
    assert not np.allclose(a.observed, clean.observed)
    np.testing.assert_array_equal(a.truth, clean.truth)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_acquire_integer_dtype(dtype):
    obj = filaments((16, 32, 32), n=3, rng=1)
    acq = acquire(obj, 2, 3.0, noise=0.02, poisson_peak=200, dtype=dtype, seed=0)
    top = np.iinfo(dtype).max
    assert acq.observed.dtype == dtype
    assert acq.observed.min() >= 0
    assert 0.85 * top <= acq.observed.max() <= 0.95 * top
    # Truth is in the same units as observed.
    assert acq.scale > 1
    clean = synthetic.downsample_mean(acq.truth, 2)
    assert np.corrcoef(clean.ravel(), acq.observed.ravel().astype(float))[0, 1] > 0.9
    assert acq.observed.astype(float).mean() == pytest.approx(clean.mean(), rel=0.1)


def test_make_volume_deterministic_3d():
    a = make_volume("mixed", shape_lr=(8, 24, 24), factor=2, noise=0.02, seed=3)
    b = make_volume("mixed", shape_lr=(8, 24, 24), factor=2, noise=0.02, seed=3)
    c = make_volume("mixed", shape_lr=(8, 24, 24), factor=2, noise=0.02, seed=4)
    np.testing.assert_array_equal(a.observed, b.observed)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert not np.array_equal(a.truth, c.truth)
    assert a.observed.shape == (8, 24, 24) and a.truth.shape == (16, 48, 48)
    assert a.truth.max() == pytest.approx(1.0)
    lateral = a.psf_fwhm[1]
    assert a.psf_fwhm == (2.5 * lateral, lateral, lateral)


@pytest.mark.parametrize("kind", ["beads", "filaments", "mixed"])
def test_make_volume_2d_kinds(kind):
    acq = make_volume(kind, shape_lr=(32, 40), factor=(2, 3))
    assert acq.observed.shape == (32, 40) and acq.truth.shape == (64, 120)
    assert acq.factor == (2, 3) and len(acq.psf_fwhm) == 2
    assert acq.observed.max() > 0


def test_make_volume_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        make_volume("stars")


def test_make_volume_sparse_dim_beads():
    acq = make_volume("beads", shape_lr=(16, 48, 48), factor=2, n=6, intensity=0.05, poisson_peak=200, seed=1)
    t = acq.truth
    assert t.max() == pytest.approx(0.05)
    assert np.mean(t > 0.1 * t.max()) < 0.02  # beads occupy a small fraction
    assert acq.observed.max() < 0.2  # dim, shot-noise-limited (about 10 photons at peak)


def test_make_volume_fast():
    t0 = time.perf_counter()
    acq = make_volume(shape_lr=(32, 128, 128), factor=2)
    dt = time.perf_counter() - t0
    assert acq.observed.shape == (32, 128, 128)
    assert dt < 2.0, f"make_volume took {dt:.2f} s"


def test_bead_fwhm_on_acquired_volume_tracks_psf():
    acq = make_volume("beads", shape_lr=(16, 48, 48), factor=2, psf_fwhm=(10.0, 4.0, 4.0), seed=2)
    lat = bead_fwhm(acq.truth, axis=2)
    ax = bead_fwhm(acq.truth, axis=0)
    assert 4.0 < lat < 7.0  # PSF 4 widened by the bead's own size
    assert 10.0 < ax < 13.0
    assert metrics.bead_fwhm(acq.observed, axis=2) * 2 > lat  # coarse sampling is no sharper
