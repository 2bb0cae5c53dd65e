"""The one exception type users see: the CLI prints its message as one line and exits non-zero."""


class UIOError(Exception):
    pass
