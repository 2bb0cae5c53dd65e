"""The exception types users see: the CLI prints the message as one line and exits non-zero."""


class UIOError(Exception):
    pass


class ContextLengthError(UIOError):
    """A text longer than the memory holds in the decoder window (the server's code context_length_exceeded)."""
