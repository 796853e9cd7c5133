"""Atomic file writes: a temporary file in the same folder, flushed, then renamed over the target.

An interrupted write (a crash, SIGKILL, a full disk) therefore never leaves a file that looks
valid: either the old file is still there or the new one is complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from trp.errors import TRPError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only if it succeeded.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "x.txt")
        >>> atomic_write(target, lambda p: open(p, "w").write("hi"))
        >>> open(target).read()
        'hi'
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        # mkstemp creates the file 0600; give the result the permissions an ordinary write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except OSError as err:
        raise TRPError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise TRPError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "b.bin")
        >>> atomic_write_bytes(target, b"ok"); open(target, "rb").read()
        b'ok'
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) atomically.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "t.json")
        >>> atomic_write_text(target, "{}"); open(target).read()
        '{}'
    """
    atomic_write_bytes(path, text.encode("utf-8"))
