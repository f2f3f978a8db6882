"""Noise2Void denoising of one 3D volume with CAREamics, for the peer baseline of quality.py.

Runs in the benchmark's own environment (``benchmarks/.venv-peers``, made by
``benchmarks/setup_peers.sh``), never in svision_big's: quality.py writes the noisy low-res
volume to a .npy file, runs this script as a subprocess, reads the denoised volume back and
cubic-upsamples it ("N2V + cubic").

    benchmarks/.venv-peers/bin/python benchmarks/n2v_baseline.py IN.npy OUT.npy [--budget-voxels V]
        [--epochs E] [--steps S] [--patch Z,Y,X] [--batch B] [--seed 0] [--threads T]
    benchmarks/.venv-peers/bin/python benchmarks/n2v_baseline.py --check    # import test only

CAREamics API used (careamics 0.3.5): ``careamics.config.create_n2v_config`` (the factory that
older releases called ``create_n2v_configuration``; both names are tried) and
``careamics.CAREamist(config).train(train_data=array)`` / ``.predict(array)``. Plain N2V
(not N2V2), 3D ("ZYX"), mean/std normalisation, CAREamics' default UNet (depth 2) and masking
(0.2% of the voxels, 11-voxel ROI), x/y flips and 90-degree rotations as augmentation, 8 patches
held aside for validation. The prediction of the last checkpoint (CAREamics' default for N2V)
over the whole volume (no tiling) is written as float32.

Budget: a fixed number of training voxels, 52.4 M (``--budget-voxels``): 800 batches of 8
patches of 8x32x32, or 400 of 16x32x32, as 20 batches per epoch (``--steps``), batch 8 (the batch
normalisation of CAREamics' UNet warns below 8). Patches are the largest powers of 2 (>= 8,
CAREamics' rule) up to 16x32x32 and at most half the volume per axis. Measured here on 2 CPU
cores: 24x96x96 Poisson-100 volume, patch 8x32x32, 800 batches: 90 s of training, 1.5 s of
prediction, +1.8 dB over the noisy input (200 batches: -1.1 dB, so the budget matters); in
quality.py's cases (patch 16x32x32 or 8x32x32) 40-66 s of training, 50-80 s per call with the
imports. That is a short training by N2V standards (published recipes train for hours on a GPU).
N2V cannot restore what its blind spot cannot predict from the neighbours: isolated bright
voxels (sub-resolution beads lose up to half their peak) and texture that is nearly independent
from voxel to voxel (an unblurred dense texture came out 4.5 dB worse than the noisy input);
on nuclei at 50 photons it gained +3.6 dB.

torchvision: every careamics release on PyPI requires torchvision, and imports it at module
level in code that N2V never runs (the LVAE/HDN models and the BioImage Model Zoo export).
PyPI's Linux torchvision wheels are CUDA builds: against the CPU torch 2.13.0 that this
environment pins (to avoid a multi-GB CUDA download) they fail at import ("operator
torchvision::nms does not exist", their _C.so links libtorch_cuda). setup_peers.sh therefore
leaves torchvision out, and if it cannot be imported this script registers an empty
placeholder module under that name before importing careamics, whose attributes raise if
anything ever calls them. N2V training and prediction touch none of them; a run that did would
fail loudly, not silently change the baseline.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import tempfile
import time
import types


def _torchvision_placeholder() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # not installed, or a CUDA build that cannot load against CPU torch
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]

    class _Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(
                f"{self.__name__}.{name}: torchvision is not available in this "
                "environment (see benchmarks/n2v_baseline.py); N2V should not need it"
            )

    # torchmetrics and lightning probe for torchvision when first imported: import them before the
    # placeholder exists, so they record it as absent and skip their torchvision-based features.
    import lightning.pytorch  # noqa: F401
    import torchmetrics  # noqa: F401

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    mods = {}
    for n in names:
        m = _Missing(n)
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
        m.__path__ = []  # a package, so submodule imports resolve from sys.modules
        mods[n] = m
        sys.modules[n] = m
    mods["torchvision"].__version__ = "unavailable"
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]


BUDGET_VOXELS = 800 * 8 * 8 * 32 * 32  # 52.4 M patch voxels


def _pow2_at_most(n: int, cap: int) -> int:
    p = 8
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def default_patch(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Largest power-of-2 patch (>= 8, CAREamics' rule) up to 16x32x32 and at most half the
    volume per axis: CAREamics draws patches from a grid and holds whole grid cells aside for
    validation, so the volume must hold several of them."""
    z, y, x = shape
    return (_pow2_at_most(z // 2, 16), _pow2_at_most(y // 2, 32), _pow2_at_most(x // 2, 32))


def n_val_patches(shape: tuple[int, ...], patch: tuple[int, ...]) -> int:
    """Validation patches: one grid cell in six, between 2 and 8 (CAREamics' default)."""
    cells = 1
    for n, p in zip(shape, patch):
        cells *= max(1, n // p)
    return max(1, min(8, cells // 6))


def denoise(volume, epochs: int, steps: int, patch: tuple[int, int, int], batch: int, seed: int, work_dir: str):
    import numpy as np
    from careamics import CAREamist
    from careamics import config as cfgmod

    make = getattr(cfgmod, "create_n2v_config", None) or cfgmod.create_n2v_configuration
    kwargs = dict(
        experiment_name="n2v_baseline",
        data_type="array",
        axes="ZYX",
        patch_size=list(patch),
        batch_size=batch,
        num_epochs=epochs,
        num_steps=steps,
        n_val_patches=n_val_patches(volume.shape, patch),
    )
    try:  # the advanced factory takes a seed and the dataloader workers
        make_adv = cfgmod.create_advanced_n2v_config
        config = make_adv(**kwargs, seed=seed + 1, num_workers=0, logger="none")  # seed must be > 0
    except (AttributeError, TypeError):
        config = make(**kwargs)
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    engine = CAREamist(config, work_dir=work_dir, enable_progress_bar=False)
    t0 = time.perf_counter()
    engine.train(train_data=vol)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = engine.predict(vol)
    if isinstance(pred, tuple):  # (predictions, source names) in 0.3.x
        pred = pred[0]
    if isinstance(pred, list):
        pred = pred[0]
    out = np.asarray(pred, dtype=np.float32).reshape(vol.shape)
    return out, {"train_seconds": round(train_s, 1), "predict_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Noise2Void (CAREamics) denoising of a 3D .npy volume")
    p.add_argument("input", nargs="?")
    p.add_argument("output", nargs="?")
    p.add_argument("--epochs", type=int, default=None, help="default: from --budget-voxels")
    p.add_argument("--steps", type=int, default=20, help="batches per epoch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--budget-voxels",
        type=float,
        default=BUDGET_VOXELS,
        help="training patch voxels in all (epochs = budget / (steps * batch * patch voxels))",
    )
    p.add_argument("--patch", default=None, help="Z,Y,X (powers of 2, >= 8); default fits the volume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--check", action="store_true", help="only import careamics and report versions")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _torchvision_placeholder()
    import careamics
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = {
        "careamics": careamics.__version__,
        "torch": torch.__version__,
        "torchvision": getattr(sys.modules.get("torchvision"), "__version__", None),
    }
    if args.check:
        print(json.dumps(info))
        return 0
    if not args.input or not args.output:
        p.error("input and output .npy paths are required")

    vol = np.load(args.input)
    if vol.ndim != 3:
        p.error(f"expected a 3D volume, got shape {vol.shape}")
    patch = tuple(int(v) for v in args.patch.split(",")) if args.patch else default_patch(vol.shape)
    if args.epochs is None:
        per_epoch = args.steps * args.batch * patch[0] * patch[1] * patch[2]
        args.epochs = max(1, int(round(args.budget_voxels / per_epoch)))
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="n2v_") as wd:
        out, times = denoise(vol, args.epochs, args.steps, patch, args.batch, args.seed, wd)
    np.save(args.output, out)
    info.update(
        times,
        seconds=round(time.perf_counter() - t0, 1),
        patch=list(patch),
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch=args.batch,
        shape=list(vol.shape),
    )
    print("N2V_RESULT " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
