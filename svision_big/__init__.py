"""svision_big: Self-Vision resolution enhancement for volumes larger than memory."""

__version__ = "0.1.0"

from .model import Model, ModelFileError, load_model  # noqa: E402
from .train import fit  # noqa: E402


def enhance(input, output, model, **kwargs) -> dict:
    """Enhance an OME-Zarr image (path or URL) into a new one; see :func:`svision_big.pipeline.enhance`."""
    from .pipeline import enhance as _enhance

    return _enhance(input, output, model, **kwargs)


def run(input, output, factor, **kwargs) -> dict:
    """Train one model per channel on a sampled region, then enhance; see :func:`svision_big.pipeline.run`."""
    from .pipeline import run as _run

    return _run(input, output, factor, **kwargs)


def train_model(input, factor, **kwargs) -> Model:
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
