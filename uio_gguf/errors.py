"""The exception types users see: the CLI prints the message as one line and exits non-zero. And
Stopped, which a caller's should_stop() asks for."""


class UIOError(Exception):
    pass


class ContextLengthError(UIOError):
    """A text longer than the memory holds in the decoder window (the server's code context_length_exceeded)."""


class Stopped(Exception):
    """should_stop() turned true while a book or a turn was still being read (compressed or decoded), before
    any answer: the work is dropped half done (its client left, or the server is shutting down). Not a
    UIOError: nothing in the request was wrong."""
