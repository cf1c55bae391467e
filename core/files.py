"""Files written atomically, state dicts read with errors that say what to do, locks and hashes.

Every ``atomic_*`` writer creates the parent folders, writes a temporary file in the target's own
folder (same file system, so the rename is atomic), flushes it to disk and renames it over the
target with ``os.replace``: a reader, or a rerun after a kill, finds the old file or the new one,
never a torn one. When the writer fails the temporary file is removed and the target is untouched.
Temporary names are hidden (``.<name>.<pid>.<random>.tmp``) so that globs such as ``*.pt`` never
pick one up, and unique so that two processes writing the same target do not share one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:  # "x": never reuse a file; default permissions (mkstemp's are 0600)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: leave nothing behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return _atomic_write(path, lambda fh: fh.write(text.encode(encoding)))


def atomic_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                default: Callable[[Any], Any] | None = None) -> Path:
    """``json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)``, no trailing newline
    (the bytes ``benchmark.run.records.write_record`` and the pretraining summaries write)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)  # fails before any file exists
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_png(path: str | Path, figure: Any, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG of at most 256 colours: matplotlib's own is RGBA, 1.6-3x larger for
    the same picture (the cpu study's figures: 738 -> 227 kB, a montage 153 -> 94 kB), and a study
    commits dozens of them. A plot has a few colours, a montage the grey levels of its volumes."""
    from io import BytesIO

    from PIL import Image

    rendered = BytesIO()
    figure.savefig(rendered, format="png", dpi=dpi)
    image = Image.open(rendered).convert("RGB").quantize(256)
    return _atomic_write(path, lambda fh: image.save(fh, format="PNG", optimize=True))


def atomic_npz(path: str | Path, /, **arrays: Any) -> Path:
    """``np.savez_compressed`` (as the runner's samples files); written through a file object, so
    numpy does not append ``.npz`` to the temporary name."""
    return _atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def read_state_dict(path: str | Path, what: str, *, todo: str | None = None,
                    keys: tuple[str, ...] = ("state_dict", "model"), strip_prefix: str | None = None,
                    error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """The state dict of tensors in ``path`` (``torch.load(map_location="cpu", weights_only=True)``).

    The file may hold the state dict itself or a dict holding it under the first of ``keys`` present
    (``{"state_dict": ..., "meta": ...}`` as the judge and extractor caches, ``{"model": ...}``).
    ``strip_prefix`` (e.g. ``"module."``, DataParallel's) is removed from the names that carry it.
    A missing or unreadable file, or one that holds anything but a non-empty dict of tensors, raises
    ``error`` (default ``ValueError``; callers pass their own subclass) whose sentence names the file,
    ``what`` it should hold (e.g. ``"the autoencoder of BrainLDM"``) and ``todo``, what to do
    (default: put that file there).
    """
    path = Path(path)
    todo = todo or f"put {what} there"
    if not path.is_file():
        raise error(f"{path} does not exist; it should hold {what}: {todo}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the user's to replace
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise error(f"cannot read {path} as {what}, a PyTorch state dict ({type(err).__name__}: {first}); "
                    f"{todo}") from err
    if isinstance(blob, Mapping):
        blob = next((blob[k] for k in keys if isinstance(blob.get(k), Mapping)), blob)
    if not isinstance(blob, Mapping) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        kind = "an empty dict" if isinstance(blob, Mapping) and not blob else f"a {type(blob).__name__}"
        raise error(f"{path} holds {kind}, not {what} (a state dict of tensors); {todo}")
    if strip_prefix:
        return {k.removeprefix(strip_prefix): v for k, v in blob.items()}
    return dict(blob)


class LockHeld(RuntimeError):
    """:func:`file_lock` with ``wait=False`` found the lock held by another process."""


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (created, with its folder, if missing) for the
    duration of the block: a second process blocks until the first leaves it (or, with
    ``wait=False``, gets :class:`LockHeld` at once), so two processes never build the same cached
    artefact, or run the same run, at once. Without ``fcntl`` (not POSIX) the block runs unlocked.
    The lock file itself is left in place: deleting it would let a waiting process lock a file that
    a newcomer no longer sees."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(f"{path} is locked by another process") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: str | Path, prefix: int = 12) -> str:
    """The first ``prefix`` hex digits of the file's sha256 (64: all of it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:prefix]
