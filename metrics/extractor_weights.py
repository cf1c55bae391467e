"""The weights of the pretrained feature extractors: file names, where they are looked for, loading.

Looked for in ``weights_dir`` (canonical names in :data:`WEIGHT_FILES`, then upstream's), then in the
torch.hub cache (:data:`HUB_FILES`); read as state dicts (never by running hub code) into the suite's
own copies of the architectures (:mod:`metrics.extractor_nets`). A file that exists but cannot be used
raises :class:`~metrics.common.WeightsError` saying what to put there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from core.files import read_state_dict

from .common import MetricError, WeightsError
from .extractor_nets import RadImageNetResNet50, medicalnet_resnet10, medicalnet_resnet50

#: canonical file name in ``weights_dir`` and accepted upstream aliases
WEIGHT_FILES: dict[str, tuple[str, ...]] = {
    "radimagenet": ("radimagenet_resnet50.pt", "RadImageNet-ResNet50_notop.pth"),
    "medicalnet-resnet10": (
        "medicalnet_resnet10_23datasets.pt",
        "resnet_10_23dataset.pth",
        "medicalnet_resnet_10_23dataset.pth",
    ),
    "medicalnet-resnet50": (
        "medicalnet_resnet50_23datasets.pt",
        "resnet_50_23dataset.pth",
        "medicalnet_resnet50_23datasets.pth",
    ),
}

#: where the torch.hub entry points cache the same checkpoints, relative to ``torch.hub.get_dir()``
HUB_FILES: dict[str, tuple[str, ...]] = {
    # Warvito/radimagenet-models: <hub>/checkpoints/; Project-MONAI/perceptual-models: <hub>/ and <hub>/monai_checkpoints/
    "radimagenet": (
        "checkpoints/RadImageNet-ResNet50_notop.pth",
        "RadImageNet-ResNet50_notop.pth",
        "monai_checkpoints/RadImageNet-ResNet50_notop.pth",
    ),
    # warvito/MedicalNet-models: <hub>/medicalnet/; Project-MONAI/perceptual-models: <hub>/monai_checkpoints/
    "medicalnet-resnet10": (
        "medicalnet/resnet_10_23dataset.pth",
        "monai_checkpoints/medicalnet_resnet_10_23dataset.pth",
    ),
    "medicalnet-resnet50": (
        "medicalnet/resnet_50_23dataset.pth",
        "monai_checkpoints/medicalnet_resnet50_23datasets.pth",
    ),
}

_WHAT_TO_PUT = {
    "radimagenet": (
        "the RadImageNet ResNet-50 (no top) state dict as torch.save'd by Warvito/radimagenet-models "
        "('RadImageNet-ResNet50_notop.pth'), saved as 'radimagenet_resnet50.pt'"
    ),
    "medicalnet-resnet10": (
        "the MedicalNet ResNet-10 '23 datasets' checkpoint ('resnet_10_23dataset.pth' from "
        "warvito/MedicalNet-models, a dict {'state_dict': {...}}), saved as 'medicalnet_resnet10_23datasets.pt'"
    ),
    "medicalnet-resnet50": (
        "the MedicalNet ResNet-50 '23 datasets' checkpoint ('resnet_50_23dataset.pth' from "
        "warvito/MedicalNet-models, a dict {'state_dict': {...}}), saved as 'medicalnet_resnet50_23datasets.pt'"
    ),
}

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "radimagenet": RadImageNetResNet50,
    "medicalnet-resnet10": medicalnet_resnet10,
    "medicalnet-resnet50": medicalnet_resnet50,
}


def find_weights(name: str, weights_dir: str | Path | None = None, hub_dir: str | Path | None = None) -> Path | None:
    """The first existing weights file for extractor ``name``: ``weights_dir`` first (canonical
    name, then upstream aliases), then the torch.hub cache. ``None`` when there is none."""
    if name not in WEIGHT_FILES:
        raise MetricError(f"unknown extractor '{name}'; known: {', '.join(WEIGHT_FILES)}")
    if weights_dir is not None:
        for fname in WEIGHT_FILES[name]:
            p = Path(weights_dir) / fname
            if p.exists():
                return p
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    for rel in HUB_FILES[name]:
        p = hub / rel
        if p.exists():
            return p
    return None


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict of extractor ``name`` in ``path`` (the tensors themselves or upstream's
    ``{"state_dict": ...}``; DataParallel's ``module.`` prefix removed); :class:`WeightsError` otherwise."""
    return read_state_dict(path, f"the weights of extractor '{name}'", error=WeightsError, keys=("state_dict",),
                           strip_prefix="module.", todo=f"put there {_WHAT_TO_PUT[name]}, or remove the file to "
                           "score with the in-domain extractor instead")


def build_pretrained_net(name: str, path: str | Path) -> nn.Module:
    """Build the architecture of ``name`` and load the state dict at ``path`` (strictly)."""
    path = Path(path)
    sd = _read_state_dict(path, name)
    net = _BUILDERS[name]()
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} tensors of the wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)})")
        raise WeightsError(
            f"weights file {path} does not match the {name} architecture: {'; '.join(parts)}; "
            f"put there {_WHAT_TO_PUT[name]}"
        )
    net.load_state_dict(sd, strict=True)
    return net

