"""Errors meant for the user: the ``ssvae`` command prints their message on one line and exits non-zero."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable or of the wrong kind; the message names the file."""


class ImageReadError(ValueError):
    """An input image that cannot be read (corrupt, truncated, not an image); the message names the file."""


class ExportError(RuntimeError):
    """An exported model whose outputs differ from its checkpoint's; nothing is left at the export paths."""


class NumericalError(RuntimeError):
    """A training loss, gradient or weight that is NaN or infinite; the message names the step, epoch and metric."""


class OutputError(OSError):
    """A file the product writes that is in the way (it exists, and replacing it was not asked for) or that cannot be
    written (a full disk, a read-only folder); the message names the file and the fix."""
