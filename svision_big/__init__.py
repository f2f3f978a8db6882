"""svision_big: Self-Vision resolution enhancement for volumes larger than memory."""

__version__ = "0.1.0"

from .model import Model, ModelFileError, load_model  # noqa: E402
from .train import fit  # noqa: E402

__all__ = ["Model", "ModelFileError", "fit", "load_model", "__version__"]
