"""The errors rankfed raises for bad input and for runs that cannot go on (a leaf module).

Every message names the bad key, value or file, so the command line can print it as one
line (``rankfed: error: ...``) and a Python user can read it without a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "WireError", "DataNotFoundError", "DataFormatError", "Diverged"]


class ConfigError(ValueError):
    """An option, a configuration key or an argument is invalid. The message names it and its value."""


class WireError(ValueError):
    """A payload cannot be encoded, or bytes are not a valid payload."""


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked.

    The message names the folder or file that was searched and how to obtain the data.
    """


class DataFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or not in the expected format.

    The message names the file and what is wrong with it.
    """


class Diverged(RuntimeError):
    """Training diverged: the global model, every client's upload, or the evaluation loss is
    non-finite after round ``round``. ``names`` lists the non-finite entries."""

    def __init__(self, rnd: int, names: list[str], where: str = "the global model has"):
        self.round, self.names, self.where = rnd, list(names), where
        shown = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
        super().__init__(f"training diverged in round {rnd}: {where} non-finite values in {shown} (try a lower learning rate, client.lr)")

    def __reduce__(self):  # picklable with its arguments (resume states, worker processes)
        return (type(self), (self.round, self.names, self.where))
