"""The networks of the feature extractors (their weights: :mod:`metrics.extractor_weights`).

* :class:`RadImageNetResNet50`: RadImageNet ResNet-50 without top (2D), Keras layout, written to match
  the upstream state dict ``RadImageNet-ResNet50_notop.pth``;
* :class:`MedicalNetResNet` (:func:`medicalnet_resnet10`, :func:`medicalnet_resnet50`): MedicalNet's
  3D ResNet trunk, matching the "23 datasets" checkpoints;
* :class:`InDomainAutoEncoder`: the small convolutional autoencoder of the in-domain extractors
  (trained by :mod:`metrics.in_domain`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import MetricError

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


class InDomainAutoEncoder(nn.Module):
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

