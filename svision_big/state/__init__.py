"""The output's run state: its lock, its done-records, and ``OutputState``, the owner of
``OUT/svision_state/``, one concern per module:

- ``layout``: the state folder's names, and what an svision-big output consists of;
- ``lock``: ``OutputLock`` (one run at a time writes into an output), ``OutputLocked``;
- ``records``: ``DoneRecords`` (one empty object per finished block);
- ``output``: ``OutputState`` (preparing or refusing an output, scratch arrays, the models `run`
  trains), ``settings_differences``.

Every name is importable from ``svision_big.state`` as before the split.
"""

from __future__ import annotations

from .layout import _OUR_FILES, _STATE_ENTRY, LOCK_NAME, MODEL_FILE, SETUP_MARKER, STATE_DIR, _join, _our_file
from .lock import _HELD, REMOTE_SETTLE_S, OutputLock, OutputLocked, _parse, describe_owner, pid_alive, pid_start
from .output import KEEP_STATE_MODELS, OutputState, _no_step, settings_differences
from .records import DoneRecords

__all__ = [
    "LOCK_NAME",
    "MODEL_FILE",
    "SETUP_MARKER",
    "STATE_DIR",
    "KEEP_STATE_MODELS",
    "REMOTE_SETTLE_S",
    "OutputLock",
    "OutputLocked",
    "OutputState",
    "DoneRecords",
    "describe_owner",
    "pid_alive",
    "pid_start",
    "settings_differences",
    "_HELD",
    "_OUR_FILES",
    "_STATE_ENTRY",
    "_join",
    "_no_step",
    "_our_file",
    "_parse",
]
