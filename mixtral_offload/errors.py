"""The one exception type for errors a user can cause (bad files, bad flags, too small a budget)."""


class MixtralOffloadError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""
