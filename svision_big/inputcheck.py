"""What a block of the raw input must not silently carry: chunks that are missing, voxels that are
not finite. Counted over the block's own region (halos would count them twice), refused, or read as
the fill value, as the run asks (``--strict``, ``--nonfinite``).

One NaN voxel spreads over the network's whole receptive field; a missing chunk reads as the fill
value without a word (5.6% of a test output changed). An absent chunk is missing only where the
image's own pyramid shows data there (``chunks.empty_on_coarser_levels``): zarr leaves out empty
chunks by default.
"""

from __future__ import annotations

import numpy as np

from .chunks import absent_chunks, chunk_region, empty_on_coarser_levels

NONFINITE = ("error", "fill")


class InputDataError(ValueError):
    """The input holds what the run must not silently use (NaN/Inf, a missing chunk under --strict).
    Deterministic: never retried."""


def fill_value(arr) -> float:
    """The array's fill value as a finite float (0 where it has none, or none that is finite)."""
    try:
        fv = float(arr.fill_value)
    except (TypeError, ValueError):
        return 0.0
    return fv if np.isfinite(fv) else 0.0


def check_block(
    x: np.ndarray, src, sel: tuple, core: tuple[slice, ...], where: str, index: int, rules: dict, coarse: list
) -> dict:
    """The findings of one block's raw input ``x`` (read from ``src`` at ``sel``; ``core``: the
    block's own region within ``x``): ``{"missing": keys, "nonfinite": count}``, with non-finite
    voxels of ``x`` replaced in place where ``rules["nonfinite"]`` is "fill". ``rules["strict"]``
    refuses a missing chunk; ``coarse``: the levels above (array, ratio) that tell empty from lost."""
    note: dict = {}
    missing = [
        key
        for coords, key in absent_chunks(src, sel)
        if empty_on_coarser_levels(chunk_region(src, coords), coarse, src.fill_value) is not True
    ]
    if missing:
        if rules["strict"]:
            raise InputDataError(
                f"{where}: chunk {missing[0]} is missing (needed by block {index}; "
                f"{len(missing)} missing in its region); without --strict it reads as the fill "
                f"value {src.fill_value}"
            )
        note["missing"] = missing
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            n = int(np.count_nonzero(bad[core]))
            if rules["nonfinite"] != "fill":
                raise InputDataError(
                    f"{where}: {int(np.count_nonzero(bad)):,} NaN/Inf voxels in the region block {index} reads: "
                    f"a network spreads them over the output; pass --nonfinite fill to read them as "
                    f"the fill value ({fill_value(src)})"
                )
            x[bad] = fill_value(src)
            if n:
                note["nonfinite"] = n
    return note
