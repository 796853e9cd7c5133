"""Character data every machine has: the Python standard library's own ``.py`` files.

The files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and the ``test``/``tests``
folders left out: the test suite holds files written to be undecodable or unusual on purpose) are
split *by file* with a seeded permutation into train and validation, so no file contributes
characters to both sides. The vocabulary is the set of characters of the train files, sorted; id 0
stands for every character outside it (rare non-ASCII characters of the validation files).

The split is recorded by two SHA-256 hashes per side: of the sorted relative file names, and of
their contents in that order, so a results file says exactly which text it was measured on (the
standard library differs between Python versions).

Example:
    >>> corpus = load_corpus(val_fraction=0.5, seed=0, max_files=6)
    >>> len(corpus.train_files) + len(corpus.val_files), set(corpus.train_files) & set(corpus.val_files)
    (6, set())
    >>> corpus.vocab.decode(corpus.vocab.encode("def f():")) == "def f():"
    True
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from trp.errors import TRPError

__all__ = ["EXCLUDED_DIRS", "Vocab", "Corpus", "stdlib_root", "stdlib_files", "split_files", "names_hash",
           "content_hash", "load_corpus", "random_windows", "eval_windows"]

#: Folder names whose files are not used (installed packages; test data written to be odd).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
UNKNOWN = "\ufffd"  # shown for id 0 when decoding


def stdlib_root() -> Path:
    """The standard library's folder of this Python (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths (POSIX) of the ``.py`` files under ``root`` outside :data:`EXCLUDED_DIRS`.

    Example:
        >>> files = stdlib_files()
        >>> "os.py" in files, any(f.startswith("site-packages/") for f in files)
        (True, False)
    """
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise TRPError(f"no standard library folder at {root}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]) and path.is_file():
            out.append(rel.as_posix())
    if not out:
        raise TRPError(f"no .py files under {root}")
    return sorted(out)


def split_files(files: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split file names into (train, validation) by a seeded permutation; each side sorted.

    Example:
        >>> train, val = split_files([f"f{i}.py" for i in range(10)], 0.2, seed=1)
        >>> len(train), len(val), sorted(train + val) == sorted(f"f{i}.py" for i in range(10))
        (8, 2, True)
    """
    if not 0.0 < val_fraction < 1.0:
        raise TRPError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = sorted(files)
    n_val = max(1, round(len(files) * val_fraction))
    if n_val >= len(files):
        raise TRPError(f"{len(files)} files are too few to split with val_fraction {val_fraction}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def names_hash(files: Sequence[str]) -> str:
    """SHA-256 of the sorted relative file names, one per line."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def content_hash(texts: Sequence[str]) -> str:
    """SHA-256 of the texts in order, each followed by a NUL byte (so boundaries count)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Vocab:
    """Characters to ids: ``chars[i - 1]`` has id ``i``; id 0 is every unknown character."""

    chars: str

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text`` (unknown characters map to 0)."""
        table = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([table.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of ``ids`` (0 shown as U+FFFD)."""
        return "".join(self.chars[i - 1] if i > 0 else UNKNOWN for i in (int(v) for v in ids))


@dataclass
class Corpus:
    """The split text as id streams, with what identifies it."""

    root: str
    train_files: list[str]
    val_files: list[str]
    vocab: Vocab
    train_ids: torch.Tensor = field(repr=False)
    val_ids: torch.Tensor = field(repr=False)
    info: dict = field(default_factory=dict)


def _read(root: Path, files: Sequence[str]) -> tuple[list[str], list[str]]:
    """Texts of the files that decode as UTF-8, and the names of those that do not (skipped)."""
    texts, bad = [], []
    for rel in files:
        try:
            texts.append((root / rel).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            bad.append(rel)
    return texts, bad


def load_corpus(val_fraction: float = 0.1, seed: int = 0, root: Path | None = None,
                max_files: int | None = None) -> Corpus:
    """Read, split and encode the standard library's ``.py`` files.

    ``max_files`` keeps only the first files of the sorted list (for quick tests). Files that do not
    decode as UTF-8 are dropped from the split before hashing and counted in ``info``.
    """
    root = stdlib_root() if root is None else Path(root)
    files = stdlib_files(root)
    if max_files is not None:
        files = files[:max_files]
    _, bad = _read(root, files)
    files = [f for f in files if f not in set(bad)]
    train_files, val_files = split_files(files, val_fraction, seed)
    train_texts, _ = _read(root, train_files)
    val_texts, _ = _read(root, val_files)
    train_text, val_text = "\n".join(train_texts), "\n".join(val_texts)
    vocab = Vocab("".join(sorted(set(train_text))))
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    info = {
        "root": "sysconfig stdlib" if root == stdlib_root() else str(root),
        "files_train": len(train_files), "files_val": len(val_files), "files_undecodable": len(bad),
        "chars_train": int(train_ids.numel()), "chars_val": int(val_ids.numel()), "vocab_size": vocab.size,
        "val_unknown_fraction": float((val_ids == 0).float().mean()) if val_ids.numel() else 0.0,
        "train_names_sha256": names_hash(train_files), "val_names_sha256": names_hash(val_files),
        "train_content_sha256": content_hash(train_texts), "val_content_sha256": content_hash(val_texts),
        "excluded_dirs": sorted(EXCLUDED_DIRS), "split_seed": seed, "val_fraction": val_fraction,
    }
    return Corpus(str(root), train_files, val_files, vocab, train_ids, val_ids, info)


def random_windows(ids: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batch`` random windows: inputs ``[B, ctx]`` and next-character targets ``[B, ctx]``.

    Example:
        >>> x, y = random_windows(torch.arange(100), 4, 8, torch.Generator().manual_seed(0))
        >>> x.shape, bool((y == x + 1).all())
        (torch.Size([4, 8]), True)
    """
    if ids.numel() <= ctx + 1:
        raise TRPError(f"{ids.numel()} characters are too few for windows of {ctx}")
    start = torch.randint(0, ids.numel() - ctx - 1, (batch,), generator=gen)
    offsets = start[:, None] + torch.arange(ctx + 1)
    w = ids[offsets]
    return w[:, :-1], w[:, 1:]


def eval_windows(ids: torch.Tensor, ctx: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fixed windows spread evenly over ``ids`` (non-overlapping when the text is long
    enough): the same characters for every model, so validation losses compare exactly.

    Example:
        >>> x, y = eval_windows(torch.arange(1000), 10, 5)
        >>> x[:, 0].tolist()
        [0, 247, 494, 742, 989]
    """
    last = ids.numel() - ctx - 1
    if last < 0:
        raise TRPError(f"{ids.numel()} characters are too few for windows of {ctx}")
    start = torch.linspace(0, last, count).round().long()
    w = ids[start[:, None] + torch.arange(ctx + 1)]
    return w[:, :-1], w[:, 1:]
