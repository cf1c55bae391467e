"""The suite's judge: a small 3D segmenter trained on real training volumes, used to measure how well
generated volumes follow their spatial condition (Dice of its segmentation against the input mask).

Network: ``monai.networks.nets.UNet(spatial_dims=3, channels=(8, 16, 32, 64), strides=(1, 2, 2),
num_res_units=0)`` (instance norm, PReLU; the first level works at full resolution because the
lateral ventricles are only a few voxels thick at small profiles). Task ``lv``: 2 classes (background, LV). Task
``multimodal``: 5 classes (semantic labels 0-4). Training: ``steps`` (the profile's ``metrics.judge.steps``) of
``DiceCELoss(softmax, one-hot, include_background=False)``, AdamW (lr 5e-3, weight decay 1e-4),
one-cycle learning rate, batches of real training volumes with random left-right flips (X) and a
random intensity gain/offset (x U[0.9, 1.1] + U[-0.05, 0.05], then clipped to [0, 1]) so the judge
does not depend on the exact grey levels of the real scans; fixed seed. Volumes are zero-padded to a
multiple of the total stride (4) and cropped back. The trained weights are cached under ``cache_dir/metrics/`` keyed by
a hash of (num_classes, data shape, data id or content hash, config).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.files import atomic_torch_save, file_lock, read_state_dict
from core.loop import LoopSettings, TrainingLoop

from .common import (DeferredVolumes, MetricError, WeightsError, array_digest, as_label_maps, as_volumes,
                     default_device, materialise, sha256_bytes, sha256_file, trained_weights_path,
                     weights_remedy)
from .dice import condition_to_labels, dice_score

JUDGE_VERSION = 1

# The judge's network and optimiser are fixed, not profile keys: a new profile key would change every
# resolved profile and so the config hash of every finished record. They are in the judge's cache key.
JUDGE_CHANNELS = (8, 16, 32, 64)
JUDGE_STRIDES = (1, 2, 2)  # first level at full resolution: the LV is thin
JUDGE_RES_UNITS = 0
JUDGE_BATCH_SIZE = 4
JUDGE_LR = 5e-3
JUDGE_WEIGHT_DECAY = 1e-4
JUDGE_GAIN_JITTER = 0.1  # intensity augmentation: x U[1 - g, 1 + g] + U[-o, o]
JUDGE_OFFSET_JITTER = 0.05
JUDGE_SEED = 0


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is trained (its cache key). ``steps`` is the profile's ``metrics.judge.steps``;
    the rest are the fixed constants above (tests shrink them)."""

    steps: int
    channels: tuple[int, ...] = JUDGE_CHANNELS
    strides: tuple[int, ...] = JUDGE_STRIDES
    num_res_units: int = JUDGE_RES_UNITS
    batch_size: int = JUDGE_BATCH_SIZE
    lr: float = JUDGE_LR
    weight_decay: float = JUDGE_WEIGHT_DECAY
    gain_jitter: float = JUDGE_GAIN_JITTER
    offset_jitter: float = JUDGE_OFFSET_JITTER
    seed: int = JUDGE_SEED


def _build(num_classes: int, cfg: JudgeConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_classes,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )


def _multiple(cfg: JudgeConfig) -> int:
    return int(np.prod(cfg.strides))


def _pad(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    shape = tuple(x.shape[2:])
    pads: list[int] = []
    for s in reversed(shape):
        pads += [0, (-s) % m]
    return (F.pad(x, pads) if any(pads) else x), shape


class Judge:
    """A trained segmenter. :meth:`segment` maps volumes (N, 1, X, Y, Z) in [0, 1] to label maps."""

    name = "judge-unet"

    def __init__(self, net: torch.nn.Module, num_classes: int, config: JudgeConfig, weights_hash: str,
                 source: str, meta: dict[str, Any], device: torch.device | str | None = None):
        self.net = net.eval()
        self.num_classes = num_classes
        self.config = config
        self.weights_hash = weights_hash
        self.source = source
        self.meta = meta
        self.device = torch.device(device) if device is not None else default_device()
        self.net.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "source": self.source,
            "num_classes": self.num_classes,
            "architecture": f"monai UNet 3D channels={self.config.channels} strides={self.config.strides} "
            f"num_res_units={self.config.num_res_units}",
            "trained_on": {k: self.meta.get(k) for k in ("data_id", "train_shape")},
            "train_seconds": self.meta.get("train_seconds"),
        }

    @torch.no_grad()
    def segment(self, volumes: Any, batch_size: int = 4) -> torch.Tensor:
        vols = as_volumes(volumes, "volumes to segment")
        out = []
        for i in range(0, vols.shape[0], batch_size):
            x, shape = _pad(vols[i : i + batch_size], _multiple(self.config))
            logits = self.net(x.to(self.device))
            lab = logits.argmax(dim=1, keepdim=True)[..., : shape[0], : shape[1], : shape[2]]
            out.append(lab.to(torch.uint8).cpu())
        return torch.cat(out)

    def dice(self, volumes: Any, reference_labels: Any) -> dict[str, Any]:
        """Dice of the judge's segmentation of ``volumes`` against ``reference_labels``."""
        res = dice_score(self.segment(volumes), reference_labels, self.num_classes)
        res["protocol"]["judge"] = self.describe()
        return res


def _train(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: JudgeConfig,
           device: torch.device, progress: bool = False) -> tuple[torch.nn.Module, list[float]]:
    from monai.losses import DiceCELoss

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = _build(num_classes, cfg).to(device)
    x_all, _ = _pad(images, _multiple(cfg))
    y_all, _ = _pad(labels.float(), _multiple(cfg))
    y_all = y_all.long()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    n = x_all.shape[0]
    order = torch.randperm(n, generator=g)
    pos = 0

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        nonlocal order, pos
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + min(cfg.batch_size, n)]
        pos += cfg.batch_size
        x, y = x_all[idx].clone(), y_all[idx].clone()
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x[flip] = x[flip].flip(2)  # left-right (X)
        y[flip] = y[flip].flip(2)
        gain = 1 + (torch.rand(x.shape[0], 1, 1, 1, 1, generator=g) * 2 - 1) * cfg.gain_jitter
        off = (torch.rand(x.shape[0], 1, 1, 1, 1, generator=g) * 2 - 1) * cfg.offset_jitter
        x = (x * gain + off).clamp(0, 1)
        return loss_fn(net(x.to(device)), y.to(device)), {}

    def report(done: int, loss: float, logs: dict) -> None:
        if done % 50 == 0:
            print(f"judge step {done}/{cfg.steps} loss {np.mean(loop.losses[-50:]):.4f}", flush=True)

    loop = TrainingLoop(net, opt, step_fn, LoopSettings(cfg.steps, check_finite=False, progress=False),
                        schedule=sched, rngs=[g], on_step=report if progress else None)
    losses = loop.run().losses
    net.eval()
    return net.cpu(), losses


def judge_cache_key(num_classes: int, shape: Sequence[int], data_id: str, cfg: JudgeConfig) -> str:
    payload = json.dumps({"classes": num_classes, "shape": list(shape), "data": data_id, "config": asdict(cfg),
                          "v": JUDGE_VERSION}, sort_keys=True)
    return sha256_bytes(payload.encode(), 16)


def _checked_training_data(images: Any, labels: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Judge training images and labels as tensors, checked against each other and the class count."""
    imgs = as_volumes(images, "judge training images")
    labs = as_label_maps(labels, "judge training labels")
    if imgs.shape != labs.shape:
        raise MetricError(f"judge images {tuple(imgs.shape)} and labels {tuple(labs.shape)} differ in shape")
    if labs.min() < 0 or labs.max() >= num_classes:
        raise MetricError(f"judge labels lie in {int(labs.min())}..{int(labs.max())}, outside 0..{num_classes - 1}")
    return imgs, labs


def train_judge(
    images: Any,
    labels: Any,
    num_classes: int,
    cache_dir: str | Path,
    *,
    config: JudgeConfig,
    data_id: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    shipped_dirs: Sequence[str | Path] = (),
) -> Judge:
    """Train (or load from ``shipped_dirs`` or the cache, see :func:`metrics.common.trained_weights_path`)
    a judge on real ``images`` (N, 1, X, Y, Z) in [0, 1] with integer ``labels`` (N, 1, X, Y, Z) in
    0..num_classes-1. Both may be :class:`metrics.common.DeferredVolumes` (with ``data_id``): read
    only if the judge must be trained."""
    if isinstance(images, DeferredVolumes):  # read only if no shipped or cached judge matches
        if data_id is None:
            raise MetricError("deferred judge training images need a data_id (the judge's cache key)")
        shape, did, checked = images.shape, data_id, None
    else:
        checked = _checked_training_data(images, labels, num_classes)
        shape = tuple(checked[0].shape)
        did = data_id if data_id is not None else "sha:" + array_digest(checked[0]) + array_digest(checked[1])
    key = judge_cache_key(num_classes, shape, did, config)
    path = trained_weights_path(f"judge-{num_classes}cls-{key}.pt", cache_dir, shipped_dirs)
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):  # concurrent jobs: one trains, the others wait and load
            if not path.exists():
                if checked is None:
                    checked = _checked_training_data(materialise(images), materialise(labels), num_classes)
                imgs, labs = checked
                dev = torch.device(device) if device is not None else default_device()
                t0 = time.perf_counter()
                net, losses = _train(imgs, labs, num_classes, config, dev, progress)
                meta = {"data_id": did, "train_shape": list(imgs.shape), "config": asdict(config),
                        "final_loss": float(np.mean(losses[-20:])), "train_seconds": time.perf_counter() - t0,
                        "device": str(dev)}
                atomic_torch_save({"state_dict": net.state_dict(), "meta": json.dumps(meta)}, path)
    todo = weights_remedy(path, cache_dir)
    state = read_state_dict(path, "a trained judge", todo=todo, keys=("state_dict",), error=WeightsError)
    try:
        net = _build(num_classes, config)
        net.load_state_dict(state, strict=True)
        meta = json.loads(torch.load(path, map_location="cpu", weights_only=True)["meta"])
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"judge weights {path} could not be loaded ({type(e).__name__}); {todo}") from e
    return Judge(net, num_classes, config, sha256_file(path), str(path), meta, device)


def get_judge(
    num_classes: int,
    images: Any,
    conditions: Any,
    cache_dir: str | Path,
    *,
    config: JudgeConfig,
    data_id: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    shipped_dirs: Sequence[str | Path] = (),
) -> Judge:
    """A judge of ``num_classes`` classes from its conditions: a mask (2 classes), or a label map given
    as labels (N, 1, ...) or one-hot over 1..num_classes-1 (e.g. the semantic map: 5 classes, one-hot
    over 1-4)."""
    labels = condition_to_labels(conditions, num_classes)
    return train_judge(images, labels, num_classes, cache_dir, data_id=data_id, config=config, device=device, progress=progress,
                       shipped_dirs=shipped_dirs)
