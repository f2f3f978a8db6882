"""The state folder's layout: its name, the names svision-big creates in it, and what an
svision-big output consists of (``--overwrite`` deletes only these)."""

from __future__ import annotations

import re

LOCK_NAME = "lock"

STATE_DIR = "svision_state"
SETUP_MARKER = "setup"  # svision_state/setup: written first, so a half set-up output is known as ours
MODEL_FILE = "svision_model.svb"  # where `run` keeps the model it trained (per channel: svision_model_c<c>.svb)

# What an svision-big output consists of (paths relative to the output): the image group, its
# pyramid levels and their chunks, and the state folder. `--overwrite` deletes only these; any other
# file (a thesis.docx beside zarr.json) makes it refuse, and delete nothing.
_OUR_FILES = re.compile(r"""(?x)^(?:
    zarr\.json | \.zgroup | \.zattrs                                             # the image group
  | \d+/(?:zarr\.json | \.zarray | \.zattrs | c | (?:c[/.])?\d+(?:[/.]\d+)*)      # levels and their chunks
  | svision_state/(?:
        lock(?:\.[0-9a-f]+)?                                  # the lock (and a killed run's private copy)
      | setup                                                 # the setup marker
      | done-[0-9a-f]+/p\d+/\d+(?:\.json)?                    # done-records (and their notes)
      | done-[0-9a-f]+/l\d+/\d+                                # pyramid levels' done-records
      | work-[0-9a-f]+/p\d+/(?:zarr\.json | c(?:/\d+)*)        # staged pass outputs
      | models-[0-9a-f]+/c\d+\.svb(?:\.part)?                 # models `run` trained for this output
      | models-[0-9a-f]+/c\d+\.ckpt/s\d+\.pt(?:\.part)?      # their training checkpoints (a resumed training)
    )
  | svision_model(?:_c\d+)?\.svb                             # ... and where they stay once it is complete
)$""")


# The names svision-big creates in the state folder: cleaning up removes these and nothing else.
_STATE_ENTRY = re.compile(r"^(?:lock|lock\.[0-9a-f]+|setup|(?:done|work|models)-[0-9a-f]+)$")


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _our_file(rel: str) -> bool:
    return bool(_OUR_FILES.match(rel))
