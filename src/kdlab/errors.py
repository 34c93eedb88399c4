"""Error types shared by every layer.

`KdlabInputError` marks bad input from the user (config, CLI flag, data file, checkpoint): the CLI turns
it into one `error: ...` line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class KdlabInputError(Exception):
    """Bad user input; the message is one line naming what is wrong and how to fix it."""


class ConfigError(KdlabInputError):
    """An invalid configuration: unknown key, wrong type or out-of-range value."""


class DataError(KdlabInputError):
    """A missing, broken or unusable dataset file."""


class CheckpointError(KdlabInputError):
    """A missing, unreadable or mismatched checkpoint."""


class KdlabRunFailure(Exception):
    """An expected failure of a run that is not bad input (e.g. ONNX parity above tolerance): exit 1, one line."""


class NonFiniteLossError(KdlabRunFailure):
    """Too many non-finite (NaN/inf) training steps in a row; the last good checkpoint is kept."""


class CheckpointWriteError(KdlabRunFailure):
    """A checkpoint could not be written (disk full, quota, I/O error); the file it would replace is intact."""
