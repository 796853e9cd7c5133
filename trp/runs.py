"""Run and model folders: one writer at a time, nothing of an earlier run left, writable before work.

* :func:`locked`: a process holds a folder while it writes there (``fcntl.flock`` on
  ``.trp.lock``, released by the kernel when the process dies, SIGKILL included); a second process
  stops with one line naming the holder's pid. :func:`check_free` asks the same question without
  taking the folder, so a reader (``--resume``) can say "in use" rather than judge a run mid-write.
* :func:`clear_run`: ``--overwrite`` removes every file trp writes in a folder (:data:`RUN_FILES`:
  checkpoint, metrics, compressed model, plan, reports) and the temporaries a killed write left,
  so the folder then holds exactly the new run or model; nothing else in it is touched.
* :func:`check_writable`: an output that cannot be created or written is refused before any
  training, evaluation or timing.
* :func:`contents`: a folder's entries other than trp's own lock and temporaries, for "is it empty".

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "run"
    >>> with locked(d):
    ...     _ = (d / "metrics.csv").write_text("epoch\\n")
    ...     sorted(contents(d))
    ['metrics.csv']
    >>> clear_run(d), sorted(contents(d))
    (['metrics.csv'], [])
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

from trp.checkpoint import CHECKPOINT_FILE, MODEL_FILE
from trp.errors import TRPError
from trp.io import is_temp_name, remove_stale_temps

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["locked", "check_free", "clear_run", "check_writable", "contents", "RUN_FILES", "LOCK_FILE"]

#: Everything trp writes into a run or model folder; ``--overwrite`` removes them all first.
RUN_FILES = (CHECKPOINT_FILE, MODEL_FILE, "config.json", "metrics.csv", "plan.json", "report.json",
             "report/spectra.png", "report/ranks.png", "report")
LOCK_FILE = ".trp.lock"


def contents(folder: str | Path) -> set[str]:
    """The names in ``folder`` other than trp's lock and temporaries (empty for a missing folder).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / ".trp.lock").write_text("1")
        >>> contents(d), contents(d / "missing")
        (set(), set())
    """
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.name != LOCK_FILE and not is_temp_name(p.name)}


def check_writable(folder: str | Path, target: str | Path | None = None) -> None:
    """Refuse, before any work, a folder that cannot be created or written (one line naming the path).

    ``target`` is what the message says cannot be written (default ``folder``), e.g. a file to go in it.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "file"); _ = open(f, "w").close()
        >>> check_writable(os.path.join(f, "run"))
        Traceback (most recent call last):
        ...
        trp.errors.TRPError: cannot write .../file/run: .../file is a file, not a folder
    """
    folder = Path(folder)
    target = folder if target is None else target
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise TRPError(f"cannot write {target}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise TRPError(f"cannot write {target}: {p} is not writable (permission denied, or a read-only file system)")


def _in_use(path: Path, fd: int) -> TRPError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return TRPError(f"{path.parent} is in use by another trp process (pid {holder}); wait for it to end, "
                    "or choose another folder")


def check_free(folder: str | Path) -> None:
    """Raise the TRPError :func:`locked` would if another process holds ``folder``; take nothing.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_free(d)
        >>> with locked(d):
        ...     try:
        ...         check_free(d)
        ...     except TRPError as err:
        ...         print("in use by another trp process" in str(err))
        True
    """
    path = Path(folder) / LOCK_FILE
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (no holder), or an unreadable one: locked() will say
        return
    try:
        # A shared lock is granted unless someone holds the exclusive one; it is dropped at once.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(path, fd) from None
    finally:
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            err = _in_use(path, fd)
            os.close(fd)
            raise err from None
        try:
            current: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Hold a run or model folder for one process: ``fcntl.flock`` on ``folder/.trp.lock``.

    The folder is created if needed. The kernel releases the lock when the process ends in any way
    (SIGKILL too); while it is held, a second ``locked`` on the folder raises a TRPError naming the
    holder's pid. On release the lock file is removed, and a folder this call created is removed
    again if it stayed empty.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "run"
        >>> with locked(d):
        ...     try:
        ...         with locked(d):
        ...             pass
        ...     except TRPError as err:
        ...         print(str(err).split(" (")[0])
        ... # doctest: +ELLIPSIS
        /.../run is in use by another trp process
        >>> d.exists()
        False
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder / LOCK_FILE)
    except OSError as err:
        raise TRPError(f"cannot write {folder}: {err.strerror or err}") from None
    try:
        yield folder
    finally:
        # Unlink before close: a process that opened the old file re-checks it after locking.
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_FILE)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()


def clear_run(folder: str | Path) -> list[str]:
    """Remove every file trp writes in a run or model folder (:data:`RUN_FILES`) and stale temporaries.

    Only trp's own names go (an empty ``report/`` too); anything else stays. Call it while holding
    :func:`locked`, which is what makes every temporary in the folder stale. Returns what was removed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "metrics.csv").write_text("x"); _ = (d / "notes.txt").write_text("y")
        >>> clear_run(d), sorted(p.name for p in d.iterdir())
        (['metrics.csv'], ['notes.txt'])
    """
    folder = Path(folder)
    removed = [p.name for p in remove_stale_temps(folder, before=math.inf)]
    for name in RUN_FILES:
        p = folder / name
        try:
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            if p.is_dir():  # a report/ folder holding the user's own files stays
                continue
            raise TRPError(f"cannot remove {p}: {err.strerror or err}") from None
        removed.append(name)
    return removed

