"""svision_big: Self-Vision resolution enhancement for volumes larger than memory."""

from __future__ import annotations

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import svision_big` and the commands that need no network
# (`--help`, `info`, `convert`, `compare`, `view`) start without importing torch (1.9 s -> see
# benchmarks/README.md, "Start-up").
_LAZY = {"Model": "model", "ModelFileError": "model", "load_model": "model", "fit": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enhance(input, output, model, **kwargs) -> dict:
    """Enhance an OME-Zarr image (path or URL) into a new one; see :func:`svision_big.pipeline.enhance`."""
    from .pipeline import enhance as _enhance

    return _enhance(input, output, model, **kwargs)


def run(input, output, factor, **kwargs) -> dict:
    """Train one model per channel on a sampled region, then enhance; see :func:`svision_big.pipeline.run`."""
    from .pipeline import run as _run

    return _run(input, output, factor, **kwargs)


def train_model(input, factor, **kwargs) -> Model:  # noqa: F821 - imported on first use
    """Train a model on a sampled region of an OME-Zarr image (path or URL); ``fit`` trains on an
    array. See :func:`svision_big.pipeline.train`. (Not ``train``: that name is the module
    ``svision_big.train``.)"""
    from .pipeline import train

    return train(input, factor, **kwargs)


def convert(tiff_path, output, **kwargs) -> str:
    """TIFF -> OME-Zarr pyramid; see :func:`svision_big.convert.convert_tiff`."""
    from .convert import convert_tiff

    return convert_tiff(tiff_path, output, **kwargs)


__all__ = ["Model", "ModelFileError", "fit", "load_model", "enhance", "run", "train_model", "convert", "__version__"]
