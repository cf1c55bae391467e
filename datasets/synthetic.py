"""The embedded synthetic brain population: whole-head T1w volumes built on real anatomy (MNI152 2009).

SyntheticPopulation gives the subjects of one image shape, by index, and caches them on disk in
blocks of BLOCK subjects (uint16 images), generating missing blocks in worker processes. A block is
one subject: a training subset is a prefix of a random permutation of the pool, so larger blocks
made a 50-subject subset generate ~15 blocks of 32. One
subject's draw (sex, age, head, ageing, layers, intensities, noise, and its scalars) is in
datasets/subject_draw.py; the scalars' ranges and scaling (AGE_RANGE, VENTRICLE_RANGE_ML,
BRAIN_RANGE_ML, scale_age, scale_volume, unscale) are defined there and re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from core.files import atomic_npz, file_lock
from core.processes import worker_context

# GENERATOR_VERSION is re-exported: other parts key their own caches on it.
from .anatomy import GENERATOR_VERSION, load_reference, source_version
from .subject import DataError, Subject, skull_image
# The scalars' ranges and scaling are re-exported: other parts import them from here.
from .subject_draw import (AGE_RANGE, BRAIN_RANGE_ML, VENTRICLE_RANGE_ML, _QUANT, _Generator, scale_age,
                           scale_volume, unscale)

BLOCK = 1                           # subjects per cache file (see above)


def subject_id(seed: int, index: int) -> str:
    return f"syn{seed}-{index:05d}"


def _default_workers() -> int:
    """Generation processes: ``SCB_DATA_WORKERS`` (a many-core GPU box), else up to 2."""
    value = os.environ.get("SCB_DATA_WORKERS")
    if value is None:
        return max(1, min(2, os.cpu_count() or 1))
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"SCB_DATA_WORKERS must be a positive whole number of processes, got {value!r}")
    return int(value)


def _cache_key(shape, seed) -> str:
    blob = json.dumps({"version": source_version(), "shape": list(map(int, shape)), "seed": int(seed),
                       "block": BLOCK}).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _write_block(path: Path, indices: Sequence[int], generator: _Generator, seed: int) -> None:
    images, labels, scalars = [], [], []
    for i in indices:
        img, lab, sc = generator.draw(seed, i)
        images.append(np.round(img * _QUANT).astype(np.uint16))
        labels.append(lab)
        scalars.append(sc)
    # atomic: a concurrent reader sees the old file or the whole new one
    atomic_npz(path, indices=np.asarray(indices, dtype=np.int64), image=np.stack(images),
               semantics=np.stack(labels), scalars=np.stack(scalars))


@lru_cache(maxsize=2)
def _worker_generator(shape, cache_dir: str) -> _Generator:
    return _Generator(load_reference(shape, cache_dir))


def _worker_block(args) -> int:
    shape, seed, cache_dir, block, path = args
    generator = _worker_generator(shape, cache_dir)  # one per worker process, not one per block
    _write_block(Path(path), range(block * BLOCK, (block + 1) * BLOCK), generator, seed)
    return block


def _die_with_parent(parent: int | None) -> None:
    """Pool initializer (Linux): the worker is killed when the process that started it ends. A worker
    that outlived a killed run could hold the cache's file locks, and the rerun would wait on them.
    ``parent``: the pid the worker must still have as its parent (None: the forkserver, which itself
    ends when the process that started it ends)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc: no such guard
        return
    if parent is not None and os.getppid() != parent:  # the parent ended before the guard was set
        os._exit(1)


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` generation processes (numpy and scipy only; each loads the reference from the cache),
    from :func:`core.processes.worker_context`: never a plain fork of this process and its threads."""
    context = worker_context()
    if context.get_start_method() == "forkserver":
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(None,))
    return ProcessPoolExecutor(workers, mp_context=context)


class SyntheticPopulation:
    """An unbounded population of synthetic subjects at one image shape, cached on disk.

    ``workers`` processes generate missing cache blocks (default: the environment variable
    ``SCB_DATA_WORKERS``, else up to 2, the CPU budget the suite
    plans for); ``progress`` shows a tqdm bar while generating.
    """

    def __init__(self, shape: tuple[int, int, int], seed: int = 0, cache_dir: str | Path = ".cache",
                 workers: int | None = None, progress: bool = False):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 8:
            raise DataError(f"synthetic image shape must be three sizes of at least 8 voxels, got {shape}")
        self.shape = shape
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self.workers = _default_workers() if workers is None else max(1, int(workers))
        self.progress = progress
        self._generator: _Generator | None = None
        self.block_dir = self.cache_dir / "synthetic" / f"subjects_{_cache_key(shape, seed)}"

    @property
    def generator(self) -> _Generator:
        if self._generator is None:
            self._generator = _Generator(load_reference(self.shape, self.cache_dir))
        return self._generator

    @property
    def affine(self) -> np.ndarray:
        return self.generator.ref.affine.copy()

    def _subject(self, index: int, image: np.ndarray, semantics: np.ndarray, scalars: np.ndarray) -> Subject:
        image = image[None].astype(np.float32, copy=False)
        semantics = semantics[None].astype(np.uint8, copy=False)
        return Subject(id=subject_id(self.seed, index), image=image,
                       lv_mask=(semantics == 4).astype(np.uint8), semantics=semantics,
                       skull=skull_image(image, semantics), scalars=scalars.astype(np.float32),
                       affine=self.affine)

    @staticmethod
    def _check_index(index) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
            raise DataError(f"subject index must be a non-negative integer, got {index!r}")
        return int(index)

    def subject(self, index: int) -> Subject:
        """Generate one subject (no cache)."""
        index = self._check_index(index)
        return self._subject(index, *self.generator.draw(self.seed, index))

    def _block_path(self, block: int) -> Path:
        return self.block_dir / f"block_{block:05d}.npz"

    def _load_block(self, block: int) -> dict | None:
        path = self._block_path(block)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                data = {k: z[k] for k in ("indices", "image", "semantics", "scalars")}
        except (OSError, ValueError, KeyError, EOFError):
            return None  # damaged (e.g. an interrupted copy): regenerate
        if data["image"].shape[1:] != self.shape or len(data["indices"]) != BLOCK:
            return None
        return data

    def ensure(self, indices: Sequence[int]) -> None:
        """Generate and cache every block that holds one of ``indices``."""
        blocks = sorted({self._check_index(i) // BLOCK for i in indices})
        if all(self._block_path(b).is_file() for b in blocks):
            return
        with file_lock(self.block_dir / "lock"):  # concurrent jobs: one generates, the others wait and read
            self._generate_missing(blocks)

    def _generate_missing(self, blocks: list[int]) -> None:
        missing = [b for b in blocks if not self._block_path(b).is_file()]
        if not missing:
            return
        load_reference(self.shape, self.cache_dir)  # build once here, not in every worker
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(missing) * BLOCK, desc=f"synthetic subjects {self.shape}", unit="subj")
        try:
            if self.workers > 1 and len(missing) > 1:
                missing = self._generate_in_pool(missing, bar)
            for b in missing:  # single worker, or what a failed pool left
                _write_block(self._block_path(b), range(b * BLOCK, (b + 1) * BLOCK), self.generator, self.seed)
                if bar is not None:
                    bar.update(BLOCK)
        finally:
            if bar is not None:
                bar.close()

    def _generate_in_pool(self, missing: list[int], bar) -> list[int]:
        """Generate blocks in worker processes; returns the blocks still missing if the pool failed."""
        jobs = [(self.shape, self.seed, str(self.cache_dir), b, str(self._block_path(b))) for b in missing]
        try:
            with _worker_pool(min(self.workers, len(missing))) as pool:
                for _ in pool.map(_worker_block, jobs):
                    if bar is not None:
                        bar.update(BLOCK)
        except (BrokenProcessPool, OSError, RuntimeError) as err:
            left = [b for b in missing if not self._block_path(b).is_file()]
            warnings.warn(f"synthetic data: the worker pool failed ({err}); generating the {len(left)} "
                          "remaining blocks in this process", RuntimeWarning, stacklevel=3)
            return left
        return []

    def subjects(self, indices: Sequence[int]) -> list[Subject]:
        """The subjects at ``indices`` (in that order), from the on-disk cache, generating what is missing."""
        indices = [self._check_index(i) for i in indices]
        self.ensure(indices)
        blocks: dict[int, dict] = {}
        out = []
        for i in indices:
            b = i // BLOCK
            if b not in blocks:
                data = self._load_block(b)
                if data is None:  # damaged file: regenerate it in this process
                    _write_block(self._block_path(b), range(b * BLOCK, (b + 1) * BLOCK), self.generator, self.seed)
                    data = self._load_block(b)
                blocks[b] = data
            data = blocks[b]
            k = i - b * BLOCK
            image = data["image"][k].astype(np.float32) / np.float32(_QUANT)
            out.append(self._subject(i, image, data["semantics"][k], data["scalars"][k]))
        return out
