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

This module holds the :class:`FeatureExtractor` interface, the preprocessing and the fallback policy
(:func:`get_extractors`); the networks are in :mod:`metrics.extractor_nets`, the weight files
(:data:`WEIGHT_FILES`, ``HUB_FILES``, loading) in :mod:`metrics.extractor_weights`, the training and
cache of the in-domain extractors in :mod:`metrics.in_domain`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .common import DeferredVolumes, MetricError, array_digest, as_volumes, default_device, sha256_file, warn_once
from .extractor_weights import WEIGHT_FILES, build_pretrained_net, find_weights
from .in_domain import InDomainConfig, in_domain_network


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
# The extractors: pretrained (weights: metrics.extractor_weights), in-domain (metrics.in_domain)
# --------------------------------------------------------------------------------------------


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


def train_in_domain(
    kind: str,
    train_volumes: Any,
    cache_dir: str | Path,
    *,
    config: InDomainConfig,
    data_id: str | None = None,
    device: torch.device | str | None = None,
    shipped_dirs: Sequence[str | Path] = (),
) -> FeatureExtractor:
    """The in-domain extractor ``kind`` ('2d' or '3d'), trained on ``train_volumes`` (N, 1, X, Y, Z) in
    [0, 1] (or :class:`metrics.common.DeferredVolumes` of them, with ``data_id``) and cached under ``cache_dir/metrics/`` by a hash of (kind, data shape, ``data_id`` or the
    data's content hash, config). Training: MSE autoencoder, Adam with a one-cycle schedule,
    random left-right flips, fixed seed; then per-feature standardisation statistics over training
    samples (see ``docs/METRICS.md``). A cache file that exists but cannot be loaded raises
    :class:`WeightsError` naming it (delete it to retrain)."""
    if kind not in ("2d", "3d"):
        raise MetricError(f"in-domain extractor kind must be '2d' or '3d', got {kind!r}")
    if isinstance(train_volumes, DeferredVolumes):  # read only if no shipped or cached network matches
        if data_id is None:
            raise MetricError("deferred in-domain training volumes need a data_id (the extractor's cache key)")
        vols = train_volumes
    else:
        vols = as_volumes(train_volumes, "in-domain training volumes")
    if vols.shape[0] < 2:
        raise MetricError("in-domain extractors need at least 2 real training volumes to train on")
    did = data_id if data_id is not None else "sha:" + array_digest(vols)
    net, path = in_domain_network(kind, vols, cache_dir, did, config, device, shipped_dirs)
    what = "slice" if kind == "2d" else "volume"
    return FeatureExtractor(
        f"in-domain-{kind}",
        net,
        2 if kind == "2d" else 3,
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
    in-domain extractors need ``config`` (the profile's ``metrics.in_domain``) and ``train_volumes`` (real training volumes; train them on the same
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
            if config is None:
                raise MetricError(f"no weights for extractor '{pname}' and no config to train the in-domain fallback "
                                  "with; pass config=InDomainConfig(...) (the profile's metrics.in_domain)")
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
