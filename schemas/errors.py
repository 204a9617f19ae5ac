"""Error types shared across packages."""


class UsageError(Exception):
    """A problem the user can fix (bad option, missing input or weights).

    The command line prints it as one line and exits with status 2.
    """
