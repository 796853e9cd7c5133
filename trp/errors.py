"""The one exception type that reaches users as a one-line message.

Every check on user input (a path, a flag value, a checkpoint) raises :class:`TRPError`; the command
line prints ``trp: error: <message>`` and exits with status 2, with no traceback.
"""

from __future__ import annotations

__all__ = ["TRPError", "first_line"]


class TRPError(Exception):
    """A user-facing error: bad input, an unsupported layer, a damaged file.

    Example:
        >>> try:
        ...     raise TRPError("energy must be in (0, 1], got 1.5")
        ... except TRPError as err:
        ...     print(err)
        energy must be in (0, 1], got 1.5
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a
    one-line error keeps of a library's long one.

    Example:
        >>> first_line(RuntimeError("shape mismatch\\n  at layer 3")), first_line(KeyError())
        ('shape mismatch', 'KeyError')
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
