"""Latents and conditions of a run's subjects: the encoded-latent cache and the condition store.

Latents of the training volumes (and of their left-right mirrors) are encoded once and cached;
the training conditions are built once per run (:class:`ConditionStore`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from core.files import atomic_torch_save, file_lock
from datasets.subject import Subject
from datasets.tasks import Task
from methods.base import Conditions, FrozenLDM

FLIP_AXIS = 2  # X (left-right) of a (B, C, X, Y, Z) batch: the "axial flip" of VCM B.2


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (e.g. run seed and subject id), the same on every machine."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---- latents ---------------------------------------------------------------------------


class LatentCache:
    """Posterior (mu, sigma) of each subject's image and of its mirror, encoded once.

    Stored in one file per base model, keyed by subject id, so nested training sets
    (10 ⊂ 50 ⊂ 500) share their encodings. Runs in several processes may share the file: a run
    that needs entries takes the file's lock, reads what others added meanwhile, encodes only what
    is still missing and writes the union (atomically), so no entry is lost and none is encoded twice.
    """

    def __init__(self, base: FrozenLDM, path: Path | None, batch_size: int = 8, device: str = "cpu"):
        self.base = base
        self.path = Path(path) if path else None
        self.batch_size = batch_size
        self.device = device
        self.entries: dict[str, torch.Tensor] = {}
        self._read_file()

    def _read_file(self) -> None:
        if self.path and self.path.is_file():
            self.entries.update(torch.load(self.path, map_location="cpu"))

    def get(self, subjects: Sequence[Subject], progress: bool = True) -> torch.Tensor:
        """(N, 2 [plain, mirrored], 2 [mu, sigma], C, x, y, z) for the subjects, in order."""
        if any(s.id not in self.entries for s in subjects):
            if self.path:
                with file_lock(self.path.with_suffix(".lock")):
                    self._read_file()  # what other processes encoded meanwhile
                    self._encode_missing(subjects, progress)
            else:
                self._encode_missing(subjects, progress)
        return torch.stack([self.entries[s.id] for s in subjects])

    @torch.no_grad()
    def _encode_missing(self, subjects: Sequence[Subject], progress: bool) -> None:
        missing = [s for s in subjects if s.id not in self.entries]
        for start in tqdm(range(0, len(missing), self.batch_size), desc="encoding latents",
                          disable=not progress or not missing, leave=False):
            chunk = missing[start : start + self.batch_size]
            images = torch.from_numpy(np.stack([s.image for s in chunk])).to(self.device)
            encoded = []
            for view in (images, images.flip(FLIP_AXIS)):
                mu, sigma = self.base.encode(view)
                encoded.append(torch.stack([mu, sigma], dim=1))
            stacked = torch.stack(encoded, dim=1).cpu()
            for subject, entry in zip(chunk, stacked):
                self.entries[subject.id] = entry.clone()
        if missing and self.path:
            atomic_torch_save(self.entries, self.path)


# ---- batches of conditions -------------------------------------------------------------


class ConditionStore:
    """The conditions of a fixed list of subjects, built once and indexed at every training step.

    Building conditions at image resolution every step (a float copy of each mask, an axial
    degradation, a stack, a copy to the GPU) costs more than a small method's whole step on a GPU.
    Each modality is built once and kept as uint8 when it is exactly binary (masks, one-hot maps:
    lossless) or float32 otherwise, on the CUDA device when it fits in a quarter of the device's free
    memory, else in host memory.
    """

    def __init__(self, task: Task, subjects: Sequence[Subject], device: str = "cpu"):
        self.task = task
        self.tensors: dict[str, torch.Tensor] = {}
        for name in task.modalities:
            stacked = None
            for i, subject in enumerate(subjects):
                array = task.conditions(subject)[name]
                if stacked is None:
                    stacked = np.empty((len(subjects), *array.shape), dtype=np.float32)
                stacked[i] = array
            if stacked is None:
                raise ValueError(f"task '{task.name}': no subjects to build conditions from")
            if ((stacked == 0) | (stacked == 1)).all():
                stacked = stacked.astype(np.uint8)
            self.tensors[name] = torch.from_numpy(stacked)
        target = torch.device(device)
        if target.type == "cuda":
            free, _ = torch.cuda.mem_get_info(target)
            if sum(t.nbytes for t in self.tensors.values()) <= free // 4:
                self.tensors = {name: t.to(target) for name, t in self.tensors.items()}

    def batch(self, indices: Sequence[int] | np.ndarray, present: dict[str, np.ndarray] | None = None,
              flip: np.ndarray | None = None, device: str = "cpu") -> Conditions:
        """Conditions of the subjects at ``indices`` (float32); mirrored where ``flip``, zeroed where dropped."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        n = len(index)
        if present is None:
            present = {name: np.ones(n, dtype=np.float32) for name in self.task.modalities}
        mirrored = torch.from_numpy(np.asarray(flip, dtype=bool)).to(device) if flip is not None and flip.any() else None
        tensors, flags = {}, {}
        for name, stored in self.tensors.items():
            batch = stored[index.to(stored.device)].to(device).float()
            if mirrored is not None:
                batch[mirrored] = batch[mirrored].flip(FLIP_AXIS)
            keep = torch.from_numpy(np.asarray(present[name], dtype=np.float32)).to(device)
            tensors[name] = batch * keep.view(-1, 1, 1, 1, 1)
            flags[name] = keep
        return Conditions(tensors, flags)


def condition_batch(
    task: Task,
    subjects: Sequence[Subject],
    present: dict[str, np.ndarray] | None = None,
    flip: np.ndarray | None = None,
    device: str = "cpu",
) -> Conditions:
    """Conditions of the subjects at image resolution; dropped modalities are zeroed."""
    return ConditionStore(task, subjects).batch(np.arange(len(subjects)), present, flip, device)


def scalar_batch(subjects: Sequence[Subject], device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.stack([s.scalars for s in subjects]).astype(np.float32)).to(device)
