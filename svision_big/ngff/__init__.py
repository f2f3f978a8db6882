"""OME-Zarr (NGFF 0.4 / 0.5) reading, writing and coordinate bookkeeping, in four layers:

- :mod:`.format`: one :class:`NgffFormat` subclass per NGFF version, and the registry
  (``format_for``, ``SUPPORTED_VERSIONS``, ``DEFAULT_VERSION``); each format detects itself
  (``matches``), so the rest of the package never branches on a version string;
- :mod:`.image`: reading an image (``open_image``, :class:`Image`, ``describe``);
- :mod:`.transforms`: coordinate transforms and the ``multiscales`` metadata;
- :mod:`.viewer`: axis and unit names, display windows (``omero``), image names.

Stores (local paths and fsspec URLs: ``make_store``, ``store_exists``, ``open_output_group``,
``remove_store``, ``foreign_file``) live in :mod:`svision_big.store`; their names, and
:class:`NgffError`, are re-exported here, so ``from svision_big.ngff import ...`` keeps working.
"""

from __future__ import annotations

from ..store import (
    NgffError,
    foreign_file,
    make_store,
    open_output_group,
    remove_store,
    store_exists,
)
from .format import (
    _FORMATS as _FORMATS,  # the registry, read by tests
)
from .format import (
    DEFAULT_VERSION,
    SUPPORTED_VERSIONS,
    FormatV04,
    FormatV05,
    NgffFormat,
    detect_format,
    format_for,
)
from .image import Image, describe, open_image
from .transforms import downsampled_transform, multiscales_metadata, upsampled_transform
from .viewer import (
    NGFF_SPACE_UNITS,
    NGFF_TIME_UNITS,
    WINDOW_VOXELS,
    display_window,
    enhanced_name,
    ngff_unit,
    omero_metadata,
    scale_label,
    spec_axes,
    usable_omero,
    viewer_metadata,
)

__all__ = [
    "NgffError",
    "NgffFormat",
    "FormatV04",
    "FormatV05",
    "format_for",
    "detect_format",
    "Image",
    "open_image",
    "upsampled_transform",
    "downsampled_transform",
    "multiscales_metadata",
    "open_output_group",
    "store_exists",
    "make_store",
    "remove_store",
    "foreign_file",
    "describe",
    "SUPPORTED_VERSIONS",
    "DEFAULT_VERSION",
    "NGFF_SPACE_UNITS",
    "NGFF_TIME_UNITS",
    "WINDOW_VOXELS",
    "display_window",
    "enhanced_name",
    "ngff_unit",
    "omero_metadata",
    "scale_label",
    "spec_axes",
    "usable_omero",
    "viewer_metadata",
]
