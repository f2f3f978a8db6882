"""The networks' arithmetic: its names and the one default every path shares.

Torch-free, so the command line can build its help without importing torch; the dtypes and the
``auto`` rule live in ``operator``.
"""

from __future__ import annotations

NAMES = ("auto", "float32", "bfloat16", "float16")

# The one default of every path (``Model.enhance``, ``pipeline.enhance``, the command line): float32,
# the reference that chunked output is tested against, and the same bytes on every machine. "auto"
# (bfloat16 where the CPU has it natively, 1.3x faster) is opt-in: a default that depends on the CPU
# gave the Python API and the command line outputs 2.4e-3 of the range apart, and a resume on another
# machine a different fingerprint.
DEFAULT_PRECISION = "float32"
