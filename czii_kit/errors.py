"""Exceptions raised by czii_kit.

Every error about user input derives from :class:`CziiKitError`; the CLI turns these into one clear
line and exit code 2 instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class CziiKitError(Exception):
    """Base class of every error czii_kit raises on purpose."""


class DataError(CziiKitError, ValueError):
    """A file or folder is missing or malformed.

    Parameters
    ----------
    path : path-like, list of path-like, or None
        The offending file or folder (or the folders pooled); named at the start of the message.
    message : str
        What is wrong with it.
    """

    def __init__(self, path: str | Path | list | tuple | None, message: str):
        if isinstance(path, (list, tuple)) and len(path) == 1:
            path = path[0]
        pooled = isinstance(path, (list, tuple))  # several folders pooled: name them all, no single .path
        where = (", ".join(map(str, path)) or None) if pooled else path
        self.path = None if pooled or path is None else Path(path)
        self.message = message
        super().__init__(f"{where}: {message}" if where is not None else message)


class UnknownParticleError(CziiKitError, ValueError):
    """A particle type name that is not in the catalog."""


class SubmissionError(DataError):
    """A submission file or table that does not follow ``id,experiment,particle_type,x,y,z``."""


class FileExistsNoForce(CziiKitError, FileExistsError):
    """An output file exists and the caller did not ask to overwrite it."""


class SettingsError(DataError):
    """A settings file (or mapping) with an unknown key, a wrong type or an out-of-range value.

    The message names the file and the key, e.g. ``czii_kit_thresholds.json: rescore.config.mix: must
    lie in [0, 1], got 2``.
    """
