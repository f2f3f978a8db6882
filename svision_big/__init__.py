"""svision_big: Self-Vision resolution enhancement for volumes larger than memory."""

__version__ = "0.1.0"
