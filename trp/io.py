"""Atomic file writes: a temporary file in the same folder, flushed, then renamed over the target.

An interrupted write (a crash, SIGKILL, a full disk) therefore never leaves a file that looks
valid: either the old file is still there or the new one is complete. Only a SIGKILL (which no
``finally`` survives) can leave the hidden temporary ``.<name>.<random>.tmp`` behind; callers that
own a folder (resume, ``--overwrite``) sweep those with :func:`remove_stale_temps`.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from trp.errors import TRPError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "is_temp_name", "remove_stale_temps",
           "PROCESS_START"]

# When this process started (as near as a library can tell: when trp was first imported). A
# temporary older than this was left by an earlier process, since this one had not written yet.
PROCESS_START = time.time()

# atomic_write's temporaries: mkstemp(prefix=".<target>.", suffix=".tmp") puts a random part of
# letters, digits and "_" between them (8 characters in CPython; a range, not to depend on it).
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{6,16}\.tmp")


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
        # The naming is what remove_stale_temps recognizes (_TEMP_NAME): keep the two in step.
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


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary that :func:`atomic_write` creates (``.<target>.<random>.tmp``).

    Example:
        >>> is_temp_name(".checkpoint.safetensors.k2j_x9qa.tmp"), is_temp_name("checkpoint.safetensors")
        (True, False)
    """
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temps(folder: str | Path, before: float | None = None) -> list[Path]:
    """Remove the temporaries an interrupted :func:`atomic_write` left in ``folder``; return them.

    A SIGKILL during a write leaves the hidden temporary (as large as the file it was to become).
    Only regular files of atomic_write's own naming (:func:`is_temp_name`) last modified before
    ``before`` (default :data:`PROCESS_START`, so a write of this very process is never touched)
    are removed; anything else in the folder, and the folder's subfolders, are left alone. A
    missing folder has nothing to remove.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> open(os.path.join(d, ".model.safetensors.abcd1234.tmp"), "w").close()
        >>> open(os.path.join(d, "notes.tmp"), "w").close()
        >>> [p.name for p in remove_stale_temps(d, before=float("inf"))], sorted(os.listdir(d))
        (['.model.safetensors.abcd1234.tmp'], ['notes.tmp'])
    """
    folder = Path(folder)
    cutoff = PROCESS_START if before is None else before
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    except OSError as err:
        raise TRPError(f"cannot list {folder}: {err.strerror or err}") from None
    for entry in entries:
        try:
            stale = (is_temp_name(entry.name) and entry.is_file(follow_symlinks=False)
                     and entry.stat(follow_symlinks=False).st_mtime < cutoff)
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # removed meanwhile by someone else: nothing left to do
            continue
        except OSError as err:
            raise TRPError(f"cannot remove the stale temporary {entry.path}: {err.strerror or err}") from None
    return removed
