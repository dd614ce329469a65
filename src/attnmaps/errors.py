"""The project's error types: user-facing problems that the command line reports in one line
(naming the file, key or value and the fix) with exit code 2, instead of a traceback.

They subclass the built-in type a caller would catch (``ValueError``, ``RuntimeError``), so code
that caught those before keeps working.
"""

from __future__ import annotations


class AttnmapsError(Exception):
    """Base of every error attnmaps raises on purpose for bad input or a failed run."""


class ConfigError(AttnmapsError, ValueError):
    """A config file, key or value that cannot be used."""


class DataError(AttnmapsError, ValueError):
    """A dataset file or folder that cannot be read as the config says."""


class CheckpointError(AttnmapsError, ValueError):
    """A checkpoint that is missing, damaged, or does not fit the model or the run."""


class RunInUse(AttnmapsError, RuntimeError):
    """Another process is training into the same run directory."""


class TrainingDiverged(AttnmapsError, FloatingPointError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept."""
