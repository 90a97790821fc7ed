"""Exception types that the command line maps to exit codes.

Library code raises these; `sdprune.cli` turns `InvalidValueError` into a usage
error (exit 2) and every other `SdpruneError` into a failure (exit 1).
"""


class SdpruneError(Exception):
    """A failure the user can act on, reported as one line without a traceback."""


class InvalidValueError(SdpruneError, ValueError):
    """A value supplied by the user is out of range, unknown or points nowhere."""


class RunFolderError(SdpruneError):
    """A run folder, checkpoint or report is missing, truncated, unsafe or foreign."""


class DataError(SdpruneError):
    """A data set could not be found or read."""


class TrainingDivergedError(SdpruneError):
    """The training loss became NaN or infinite."""


class ReplicaMismatchError(SdpruneError):
    """DDP processes ended a step of training with different weights."""
