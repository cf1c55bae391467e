"""Feature extractors for FID-2D and FID-3D, and how their weights are found.

Pretrained extractors (the ones the field uses):

* ``radimagenet``: RadImageNet ResNet-50 (2D), the Keras-converted network that
  ``torch.hub.load("Warvito/radimagenet-models", "radimagenet_resnet50")`` (and MONAI's
  ``Project-MONAI/perceptual-models``) builds: a ResNet-50 trunk *without* the classifier, convolutions
  with biases, the stride on the first 1x1 convolution of each bottleneck (Keras layout), BatchNorm
  eps 1.001e-5. Preprocessing as in MONAI's ``RadImageNetPerceptualSimilarity``: slices in [0, 1],
  grey repeated to 3 channels, RGB -> BGR, subtract (0.406, 0.456, 0.485). Features: global average
  of the last stage (2048 values per slice).
* ``medicalnet-resnet10`` / ``medicalnet-resnet50``: MedicalNet ResNet-10 / ResNet-50 "23 datasets"
  (3D, Chen et al. "Med3D"), as ``warvito/MedicalNet-models`` builds them (dilated layer3/layer4,
  no classifier). Preprocessing as MedicalNet (and MONAI's ``MedicalNetPerceptualSimilarity``):
  z-score over each whole volume. Features: global average of the last stage (512 / 2048 values).

Where weights are looked for, in this order:

1. ``weights_dir`` (a folder the user fills), file names in :data:`WEIGHT_FILES`:
   ``radimagenet_resnet50.pt``, ``medicalnet_resnet10_23datasets.pt``,
   ``medicalnet_resnet50_23datasets.pt`` (the upstream file names are accepted too).
2. The torch.hub cache (``torch.hub.get_dir()``, or ``hub_dir``): the checkpoint files that the hub
   entry points above download (:data:`HUB_FILES`). The suite reads these files with its own copy of
   the architecture; it never runs hub code, because the entry points download when a file is absent
   and this machine cannot reach the network.
3. Otherwise: warn once, and use in-domain extractors the suite trains itself
   (:func:`train_in_domain`): ``in-domain-2d`` (slices) and ``in-domain-3d`` (volumes).

File format (one format, the one upstream ships): a ``torch.save``-d state dict loadable with
``torch.load(..., weights_only=True)``. For RadImageNet the plain state dict of the network above
(keys ``conv1.weight``, ``conv1.bias``, ``bn1.*``, ``layer1.0.conv1.weight``, ...). For MedicalNet the
upstream checkpoint ``{"state_dict": {"module.conv1.weight": ...}}`` (the ``module.`` prefix and the
wrapper are optional). A file that exists but cannot be used raises :class:`WeightsError`; it never
falls back silently.

Every extractor has a ``name`` and a ``weights_hash`` (first 12 hex digits of the sha256 of the
weights file), which go into column headers and the scoring protocol.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    ORIENTATIONS,
    MetricError,
    WeightsError,
    array_digest,
    as_volumes,
    central_slice_indices,
    default_device,
    extract_slices,
    sha256_bytes,
    sha256_file,
    trained_weights_path,
    warn_once,
)

# --------------------------------------------------------------------------------------------
# Architectures of the pretrained networks (written to match the upstream state dicts)
# --------------------------------------------------------------------------------------------


class _KerasBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(planes, eps=1.001e-5, momentum=0.99)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes, eps=1.001e-5, momentum=0.99)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(planes * 4, eps=1.001e-5, momentum=0.99)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class RadImageNetResNet50(nn.Module):
    """RadImageNet ResNet-50 without top, Keras layout (state-dict compatible with
    ``RadImageNet-ResNet50_notop.pth``). Output: the last feature map (B, 2048, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5, momentum=0.01)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=2)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=True),
                nn.BatchNorm2d(planes * 4, eps=1.001e-5, momentum=0.99),
            )
        layers = [_KerasBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_KerasBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _MedBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = _conv3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + residual)


class _MedBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + residual)


class MedicalNetResNet(nn.Module):
    """MedicalNet 3D ResNet trunk (Chen et al. 2019), state-dict compatible with the "23 datasets"
    checkpoints. Output: the last feature map (B, 512 * expansion, x/8, y/8, z/8)."""

    def __init__(self, block: type, layers: Sequence[int]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride=stride, downsample=downsample, dilation=dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def medicalnet_resnet10() -> MedicalNetResNet:
    return MedicalNetResNet(_MedBasicBlock, [1, 1, 1, 1])


def medicalnet_resnet50() -> MedicalNetResNet:
    return MedicalNetResNet(_MedBottleneck, [3, 4, 6, 3])


# --------------------------------------------------------------------------------------------
# In-domain extractors: small convolutional autoencoders trained on real training volumes
# --------------------------------------------------------------------------------------------


class _AutoEncoder(nn.Module):
    """Plain convolutional autoencoder (no normalisation layers, so features of one input never
    depend on the rest of the batch). Encoder: a 3x3 convolution then three stride-2 4x4
    convolutions; decoder mirrors it. Features: global averages of the last two encoder stages."""

    def __init__(self, spatial_dims: int, channels: Sequence[int]):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        convt = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        c = list(channels)
        if len(c) != 4:
            raise MetricError(f"in-domain autoencoder needs 4 channel widths, got {c}")
        self.spatial_dims = spatial_dims
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.enc = nn.ModuleList(
            [
                nn.Sequential(conv(1, c[0], 3, padding=1), act()),
                nn.Sequential(conv(c[0], c[1], 4, stride=2, padding=1), act()),
                nn.Sequential(conv(c[1], c[2], 4, stride=2, padding=1), act()),
                nn.Sequential(conv(c[2], c[3], 4, stride=2, padding=1), act()),
            ]
        )
        self.dec = nn.Sequential(
            convt(c[3], c[2], 4, stride=2, padding=1), act(),
            convt(c[2], c[1], 4, stride=2, padding=1), act(),
            convt(c[1], c[0], 4, stride=2, padding=1), act(),
            conv(c[0], 1, 3, padding=1),
        )
        self.feature_dim = c[2] + c[3]
        # per-feature standardisation measured on the training data after training
        self.register_buffer("feat_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feat_std", torch.ones(self.feature_dim))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.enc:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.encode(x)[-1])

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.encode(x)
        dims = tuple(range(2, x.ndim))
        return torch.cat([outs[2].mean(dims), outs[3].mean(dims)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw_features(x) - self.feat_mean) / self.feat_std

    @torch.no_grad()
    def set_standardisation(self, pools: Sequence[torch.Tensor], batch: int = 64) -> None:
        """Per-feature mean and std over all training samples in ``pools`` (std floored at 1e-3 of its
        mean over features, so that dead features are not blown up)."""
        feats = torch.cat([self.raw_features(p[i : i + batch]) for p in pools for i in range(0, p.shape[0], batch)])
        mean, std = feats.mean(0), feats.std(0)
        floor = 1e-3 * float(std.mean()) + 1e-12
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(floor))


@dataclass(frozen=True)
class InDomainConfig:
    """How the in-domain extractors are trained (part of their cache key)."""

    channels_2d: tuple[int, int, int, int] = (16, 32, 64, 64)
    channels_3d: tuple[int, int, int, int] = (8, 16, 32, 64)
    steps_2d: int = 300
    steps_3d: int = 150
    batch_2d: int = 32
    batch_3d: int = 4
    lr: float = 2e-3
    slice_central_fraction: float = 0.8  # 2D training slices come from this central part of each axis
    seed: int = 0


IN_DOMAIN_VERSION = 2


# --------------------------------------------------------------------------------------------
# The extractor object
# --------------------------------------------------------------------------------------------


class FeatureExtractor:
    """A network plus its preprocessing that maps images to one feature vector each.

    ``spatial_dims`` is 2 (takes slices (B, 1, H, W)) or 3 (takes volumes (B, 1, X, Y, Z));
    inputs are in [0, 1]. :meth:`features` returns (B, F) float32 on the CPU.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        spatial_dims: int,
        weights_hash: str,
        source: str,
        pretrained: bool,
        preprocessing: str,
        feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        feature_dim: int,
        device: torch.device | str | None = None,
        batch_size: int = 64,
    ):
        self.name = name
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.spatial_dims = spatial_dims
        self.weights_hash = weights_hash
        self.source = source
        self.pretrained = pretrained
        self.preprocessing = preprocessing
        self._feature_fn = feature_fn
        self.feature_dim = feature_dim
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        self.net.to(self.device)

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, weights_hash={self.weights_hash!r}, source={self.source!r})"

    @property
    def label(self) -> str:
        """Text used in column headers, e.g. ``FID-3D [medicalnet-resnet10]``."""
        return self.name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "source": self.source,
            "pretrained": self.pretrained,
            "spatial_dims": self.spatial_dims,
            "feature_dim": self.feature_dim,
            "preprocessing": self.preprocessing,
        }

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 1:
            raise MetricError(
                f"extractor '{self.name}' takes {'slices (B, 1, H, W)' if self.spatial_dims == 2 else 'volumes (B, 1, X, Y, Z)'}"
                f", got shape {tuple(x.shape)}"
            )
        bs = self.batch_size if self.spatial_dims == 2 else max(1, self.batch_size // 16)
        out = []
        for i in range(0, x.shape[0], bs):
            xb = x[i : i + bs].to(self.device)
            out.append(self._feature_fn(self.net, xb).float().cpu())
        return torch.cat(out, 0)


def _radimagenet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.repeat(1, 3, 1, 1)[:, [2, 1, 0]]  # grey -> 3 channels, RGB -> BGR
    mean = torch.tensor([0.406, 0.456, 0.485], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return net(x - mean).mean(dim=(2, 3))


def medicalnet_intensity_normalisation(x: torch.Tensor) -> torch.Tensor:
    """z-score over each whole volume (MedicalNet's preprocessing), (B, 1, X, Y, Z)."""
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def _medicalnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(medicalnet_intensity_normalisation(x)).mean(dim=(2, 3, 4))


def _ae_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


RADIMAGENET_PREPROCESSING = (
    "slice in [0,1] at native size, grey repeated to 3 channels, RGB->BGR, "
    "subtract (0.406, 0.456, 0.485); features = global average of the last stage (2048)"
)
MEDICALNET_PREPROCESSING = (
    "volume at native size, z-score over the whole volume (MedicalNet); "
    "features = global average of the last stage ({dim})"
)
IN_DOMAIN_PREPROCESSING = (
    "{what} in [0,1] at native size, no normalisation; features = global averages of the last two "
    "encoder stages of an autoencoder trained on real training volumes ({dim}), standardised per "
    "feature with the mean and std over the training {what}s"
)

# --------------------------------------------------------------------------------------------
# Weight files: names, locations, loading
# --------------------------------------------------------------------------------------------

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
    what = _WHAT_TO_PUT[name]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(
            f"weights file {path} for extractor '{name}' could not be read as a PyTorch state-dict file "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); put there {what}, "
            "or remove the file to score with the in-domain extractor instead"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"weights file {path} for extractor '{name}' holds a {type(obj).__name__}, not a state dict of "
            f"tensors; put there {what}"
        )
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


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


def load_pretrained(
    name: str,
    weights_dir: str | Path | None = None,
    hub_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> FeatureExtractor | None:
    """The pretrained extractor ``name`` ('radimagenet', 'medicalnet-resnet10', 'medicalnet-resnet50')
    from ``weights_dir`` or the torch.hub cache; ``None`` when no file exists; :class:`WeightsError`
    when a file exists but is unusable."""
    path = find_weights(name, weights_dir, hub_dir)
    if path is None:
        return None
    net = build_pretrained_net(name, path)
    whash = sha256_file(path)
    if name == "radimagenet":
        return FeatureExtractor(
            name, net, 2, whash, str(path), True, RADIMAGENET_PREPROCESSING, _radimagenet_features, 2048, device
        )
    dim = 512 if name == "medicalnet-resnet10" else 2048
    return FeatureExtractor(
        name, net, 3, whash, str(path), True, MEDICALNET_PREPROCESSING.format(dim=dim), _medicalnet_features, dim, device
    )


# --------------------------------------------------------------------------------------------
# In-domain training and cache
# --------------------------------------------------------------------------------------------


def _pad_to_multiple(x: torch.Tensor, m: int = 8) -> torch.Tensor:
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % m]
    return F.pad(x, pads) if any(pads) else x


def in_domain_cache_key(kind: str, train_shape: Sequence[int], data_id: str, config: InDomainConfig) -> str:
    payload = json.dumps(
        {"kind": kind, "shape": list(train_shape), "data": data_id, "config": asdict(config), "v": IN_DOMAIN_VERSION},
        sort_keys=True,
    )
    return sha256_bytes(payload.encode(), 16)


def _train_ae(kind: str, vols: torch.Tensor, cfg: InDomainConfig, device: torch.device) -> tuple[_AutoEncoder, list[float]]:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = vols.shape[0]
    if kind == "2d":
        net = _AutoEncoder(2, cfg.channels_2d).to(device)
        steps, bs = cfg.steps_2d, cfg.batch_2d
        orients = list(ORIENTATIONS)
        ranges = {
            o: central_slice_indices(vols.shape[2 + ax], vols.shape[2 + ax], cfg.slice_central_fraction)
            for o, ax in ORIENTATIONS.items()
        }

        def batch(step: int) -> tuple[torch.Tensor, bool]:
            # orientations in turn; random volumes and random slices of the central part of the axis
            o = orients[step % len(orients)]
            vi = torch.randint(0, n, (bs,), generator=g).tolist()
            si = torch.randint(0, len(ranges[o]), (bs,), generator=g).tolist()
            ax = ORIENTATIONS[o]
            xb = torch.stack([vols[v].select(1 + ax, ranges[o][s]) for v, s in zip(vi, si)])
            return xb, o != "sagittal"  # axial (X, Y) and coronal (X, Z) slices have X first

        # standardisation: every central slice of each orientation of up to 32 training volumes
        sub = vols[torch.randperm(n, generator=g)[:32]]
        std_pools = [extract_slices(sub, o, ranges[o]) for o in orients]
    else:
        net = _AutoEncoder(3, cfg.channels_3d).to(device)
        steps, bs = cfg.steps_3d, cfg.batch_3d

        def batch(step: int) -> tuple[torch.Tensor, bool]:
            return vols[torch.randint(0, n, (min(bs, n),), generator=g)], True

        std_pools = [vols[torch.randperm(n, generator=g)[:64]]]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    losses = []
    net.train()
    for step in range(steps):
        xb, flippable = batch(step)
        if flippable and float(torch.rand((), generator=g)) < 0.5:  # left-right flip (flips X)
            xb = xb.flip(2)
        xb = _pad_to_multiple(xb).to(device)
        loss = F.mse_loss(net(xb), xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    net.set_standardisation([p.to(device) for p in std_pools], batch=64 if kind == "2d" else 4)
    return net.cpu(), losses


def train_in_domain(
    kind: str,
    train_volumes: Any,
    cache_dir: str | Path,
    data_id: str | None = None,
    config: InDomainConfig | None = None,
    device: torch.device | str | None = None,
    shipped_dirs: Sequence[str | Path] = (),
) -> FeatureExtractor:
    """The in-domain extractor ``kind`` ('2d' or '3d'), trained on ``train_volumes`` (N, 1, X, Y, Z) in
    [0, 1] and cached under ``cache_dir/metrics/`` by a hash of (kind, data shape, ``data_id`` or the
    data's content hash, config). Training: MSE autoencoder, Adam with a one-cycle schedule,
    random left-right flips, fixed seed; then per-feature standardisation statistics over training
    samples (see ``docs/METRICS.md``). A cache file that exists but cannot be loaded raises
    :class:`WeightsError` naming it (delete it to retrain)."""
    if kind not in ("2d", "3d"):
        raise MetricError(f"in-domain extractor kind must be '2d' or '3d', got {kind!r}")
    cfg = config or InDomainConfig()
    vols = as_volumes(train_volumes, "in-domain training volumes")
    if vols.shape[0] < 2:
        raise MetricError("in-domain extractors need at least 2 real training volumes to train on")
    did = data_id if data_id is not None else "sha:" + array_digest(vols)
    key = in_domain_cache_key(kind, tuple(vols.shape), did, cfg)
    name = f"in-domain-{kind}"
    path = trained_weights_path(f"{name}-{key}.pt", cache_dir, shipped_dirs)  # shipped, else the cache
    channels = cfg.channels_2d if kind == "2d" else cfg.channels_3d
    spatial = 2 if kind == "2d" else 3
    if path.exists():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            net = _AutoEncoder(spatial, channels)
            net.load_state_dict(ckpt["state_dict"], strict=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(
                f"cached in-domain extractor {path} could not be loaded ({type(e).__name__}); delete the file "
                "and the suite will retrain it"
            ) from e
    else:
        dev = torch.device(device) if device is not None else default_device()
        t0 = time.perf_counter()
        net, losses = _train_ae(kind, vols, cfg, dev)
        meta = {
            "kind": kind,
            "data_id": did,
            "train_shape": list(vols.shape),
            "config": asdict(cfg),
            "final_loss": float(np.mean(losses[-10:])),
            "train_seconds": time.perf_counter() - t0,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": net.state_dict(), "meta": json.dumps(meta)}, tmp)
        os.replace(tmp, path)
    what = "slice" if kind == "2d" else "volume"
    return FeatureExtractor(
        name,
        net,
        spatial,
        sha256_file(path),
        str(path),
        False,
        IN_DOMAIN_PREPROCESSING.format(what=what, dim=net.feature_dim),
        _ae_features,
        net.feature_dim,
        device,
    )


# --------------------------------------------------------------------------------------------
# The entry point: pretrained if present, else in-domain (announced once)
# --------------------------------------------------------------------------------------------


def get_extractors(
    weights_dir: str | Path | None = None,
    cache_dir: str | Path = ".cache",
    train_volumes: Any = None,
    data_id: str | None = None,
    medicalnet: str = "medicalnet-resnet10",
    hub_dir: str | Path | None = None,
    config: InDomainConfig | None = None,
    device: torch.device | str | None = None,
    shipped_dirs: Sequence[str | Path] = (),
) -> dict[str, FeatureExtractor]:
    """``{"2d": extractor, "3d": extractor}``.

    2D: RadImageNet ResNet-50 if its weights are found (``weights_dir``, then the torch.hub cache),
    else ``in-domain-2d``. 3D: ``medicalnet`` ('medicalnet-resnet10' or 'medicalnet-resnet50') if
    found, else ``in-domain-3d``. Each fallback is announced once per process with a warning. The
    in-domain extractors need ``train_volumes`` (real training volumes; train them on the same
    volumes for every row of a table, e.g. the full training pool, and pass a stable ``data_id``).
    A weights file that exists but is malformed raises :class:`WeightsError`.
    """
    if medicalnet not in ("medicalnet-resnet10", "medicalnet-resnet50"):
        raise MetricError(f"medicalnet must be 'medicalnet-resnet10' or 'medicalnet-resnet50', got {medicalnet!r}")
    out: dict[str, FeatureExtractor] = {}
    for kind, pname in (("2d", "radimagenet"), ("3d", medicalnet)):
        ext = load_pretrained(pname, weights_dir, hub_dir, device)
        if ext is None:
            if train_volumes is None:
                raise MetricError(
                    f"no weights for extractor '{pname}' (looked for {WEIGHT_FILES[pname][0]} in "
                    f"{weights_dir or '(no weights_dir)'} and the torch.hub cache) and no real training volumes "
                    "were given to train the in-domain fallback; pass train_volumes or put the weights file there"
                )
            warn_once(
                f"fallback-{pname}",
                f"Pretrained {pname} weights not found (looked for '{WEIGHT_FILES[pname][0]}' in "
                f"{weights_dir or '(no weights_dir)'} and in the torch.hub cache "
                f"{hub_dir or torch.hub.get_dir()}); scoring with the in-domain-{kind} extractor trained on real "
                f"training volumes instead. Its columns are labelled [in-domain-{kind}] and are not comparable "
                f"with [{pname}] numbers.",
            )
            ext = train_in_domain(kind, train_volumes, cache_dir, data_id=data_id, config=config, device=device,
                                  shipped_dirs=shipped_dirs)
        out[kind] = ext
    return out
