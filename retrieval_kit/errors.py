"""User-facing errors: one class per kind of mistake.

The library raises these; the CLI prints ``str(err)`` as one line and exits non-zero.
Anything else that escapes is a bug in rkit, not in the user's input.
"""


class RkitError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class InputError(RkitError):
    """A path, file or flag the user gave is missing, empty or malformed."""


class CorpusError(InputError):
    """A corpus file or folder cannot be read (missing, empty, binary, bad UTF-8/JSON)."""


class ModelError(RkitError):
    """A backbone, teacher or adapter cannot be found or loaded (offline, wrong name, bad folder)."""


class IndexError_(RkitError):
    """An index is missing, corrupt, or does not match the encoder used to open it."""


class IndexLockedError(IndexError_):
    """Another process is writing this index (one writer at a time)."""

    exit_code = 3


class IndexMismatchError(IndexError_):
    """The index was built with a different encoder (fingerprint or dimension differ)."""


class TrainError(RkitError):
    """Training inputs or outputs are unusable (empty query file, unwritable output folder...)."""


class BenchError(RkitError):
    """A benchmark's data is missing or malformed."""
