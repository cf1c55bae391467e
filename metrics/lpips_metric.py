"""LPIPS (Zhang et al. 2018) on slices in three orientations (2.5D), with the ``lpips`` package.

Network: ``lpips.LPIPS(net="alex", version="0.1")``. Its linear heads ship inside the lpips wheel
(``lpips/weights/v0.1/alex.pth``) and are always loaded from there. Its AlexNet trunk is torchvision's
ImageNet AlexNet, which torchvision would download; this machine cannot, so the trunk is built with
random weights (``pnet_rand=True``) and then overwritten from a local file:

1. ``weights_dir/alexnet.pt`` or ``weights_dir/alexnet-owt-7be5be79.pth``, else
2. torchvision's own cache file ``<torch.hub dir>/checkpoints/alexnet-owt-7be5be79.pth``.

Format: torchvision's AlexNet state dict (``torch.save(torchvision.models.alexnet(weights=...).state_dict())``,
exactly the file torchvision downloads); only the ``features.*`` tensors are used. Without such a file
LPIPS is reported as unavailable (value ``None`` plus the reason); it is never computed with a random
trunk. A file that exists but is unusable raises :class:`WeightsError`.

Protocol: per orientation take ``max(1, round(fraction * depth))`` slices evenly spaced over the
central ``central_fraction`` of the axis (defaults: 25% of the slices from the central 80%); scale to
[-1, 1]; repeat grey to 3 channels; slices whose shorter side is below ``min_side`` (64) are
bilinearly upsampled so that it is ``min_side`` (AlexNet cannot take slices under 31 pixels and its
deep layers collapse to 1x1 on tiny slices). The LPIPS of two volumes is the mean over all selected
slices of all three orientations. Diversity = mean over pairs of generated volumes (all pairs up to
``max_pairs``, else a seeded random subset); fidelity = mean over (generated, ground truth) pairs.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import (
    ORIENTATIONS,
    MetricError,
    WeightsError,
    as_volumes,
    central_slice_indices,
    default_device,
    extract_slices,
    pick_pairs,
    sha256_file,
)

ALEXNET_FILES = ("alexnet.pt", "alexnet-owt-7be5be79.pth")
ALEXNET_HUB_FILE = "checkpoints/alexnet-owt-7be5be79.pth"

DEFAULT_FRACTION = 0.25
DEFAULT_CENTRAL_FRACTION = 0.8
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_PAIRS = 100


def find_alexnet_weights(weights_dir: str | Path | None = None, hub_dir: str | Path | None = None) -> Path | None:
    if weights_dir is not None:
        for f in ALEXNET_FILES:
            p = Path(weights_dir) / f
            if p.exists():
                return p
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    p = hub / ALEXNET_HUB_FILE
    return p if p.exists() else None


class LPIPSModel:
    """An ``lpips.LPIPS`` network with a real AlexNet trunk, or an unavailable placeholder.

    ``available`` tells which; ``reason`` says why not; ``weights_hash`` identifies the trunk file.
    """

    def __init__(self, net: torch.nn.Module | None, reason: str | None, trunk_path: str | None,
                 weights_hash: str | None, device: torch.device | str | None = None):
        self.net = net
        self.reason = reason
        self.trunk_path = trunk_path
        self.weights_hash = weights_hash
        self.device = torch.device(device) if device is not None else default_device()
        if net is not None:
            self.net = net.eval().to(self.device)

    @property
    def available(self) -> bool:
        return self.net is not None

    def describe(self) -> dict[str, Any]:
        return {
            "network": "lpips.LPIPS(net='alex', version='0.1'), linear heads from the lpips wheel",
            "trunk_weights": self.trunk_path,
            "trunk_weights_hash": self.weights_hash,
            "available": self.available,
            "reason": self.reason,
        }

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """LPIPS between slice batches (B, 1|3, H, W) already scaled to [-1, 1]; returns (B,)."""
        if self.net is None:
            raise MetricError(f"LPIPS is unavailable: {self.reason}")
        out = []
        for i in range(0, a.shape[0], batch_size):
            xa = a[i : i + batch_size].to(self.device)
            xb = b[i : i + batch_size].to(self.device)
            if xa.shape[1] == 1:
                xa, xb = xa.repeat(1, 3, 1, 1), xb.repeat(1, 3, 1, 1)
            out.append(self.net(xa, xb).reshape(-1).cpu())
        return torch.cat(out)


def build_lpips_with_trunk(trunk_path: str | Path | None) -> torch.nn.Module:
    """``lpips.LPIPS(net='alex', pretrained=True, pnet_rand=True)`` with the AlexNet ``features.*``
    tensors of ``trunk_path`` copied into its trunk. ``trunk_path=None`` keeps the random trunk
    (tests only)."""
    import lpips

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation note on 'pretrained'
        net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if trunk_path is None:
        return net
    path = Path(trunk_path)
    what = (
        "torchvision's AlexNet state dict (the file torchvision downloads as alexnet-owt-7be5be79.pth, or "
        "torch.save(torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict(), 'alexnet.pt'))"
    )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"AlexNet weights file {path} could not be read as a PyTorch state dict ({type(e).__name__}); put there "
            f"{what}, or remove it (LPIPS is then reported as unavailable)"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"AlexNet weights file {path} does not hold a state dict of tensors; put there {what}")
    trunk = net.net
    target = trunk.state_dict()  # keys like slice1.0.weight, slice2.3.weight: module index = features index
    mapped = {}
    for k in target:
        idx_and_param = k.split(".", 1)[1]  # "0.weight"
        src = f"features.{idx_and_param}"
        if src not in sd:
            raise WeightsError(f"AlexNet weights file {path} lacks tensor '{src}'; put there {what}")
        if tuple(sd[src].shape) != tuple(target[k].shape):
            raise WeightsError(
                f"AlexNet weights file {path} has '{src}' of shape {tuple(sd[src].shape)}, expected "
                f"{tuple(target[k].shape)}; put there {what}"
            )
        mapped[k] = sd[src]
    trunk.load_state_dict(mapped, strict=True)
    return net


def load_lpips(
    weights_dir: str | Path | None = None,
    hub_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> LPIPSModel:
    """The LPIPS model if AlexNet trunk weights are found, else an unavailable :class:`LPIPSModel`
    whose ``reason`` says what to provide."""
    path = find_alexnet_weights(weights_dir, hub_dir)
    if path is None:
        hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
        reason = (
            "no AlexNet trunk weights for LPIPS (looked for "
            f"{' or '.join(ALEXNET_FILES)} in {weights_dir or '(no weights_dir)'} and {hub / ALEXNET_HUB_FILE}); "
            "torchvision cannot download them here. Put torchvision's AlexNet state dict there to enable LPIPS"
        )
        return LPIPSModel(None, reason, None, None, device)
    net = build_lpips_with_trunk(path)
    return LPIPSModel(net, None, str(path), sha256_file(path), device)


def _lpips_slices(vol: torch.Tensor, fraction: float, central_fraction: float, min_side: int) -> dict[str, torch.Tensor]:
    """Selected slices of each orientation, scaled to [-1, 1] and upsampled if small: {orient: (N*k,1,H,W)}."""
    out = {}
    for orient, ax in ORIENTATIONS.items():
        depth = vol.shape[2 + ax]
        idx = central_slice_indices(depth, max(1, int(round(fraction * depth))), central_fraction)
        s = extract_slices(vol, orient, idx) * 2.0 - 1.0
        short = min(s.shape[-2:])
        if short < min_side:
            f = min_side / short
            size = (int(round(s.shape[-2] * f)), int(round(s.shape[-1] * f)))
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        out[orient] = s
    return out


def _slice_counts(shape, fraction, central_fraction) -> dict[str, int]:
    return {
        o: len(central_slice_indices(shape[ax], max(1, int(round(fraction * shape[ax]))), central_fraction))
        for o, ax in ORIENTATIONS.items()
    }


def lpips_volume_pairs(
    model: LPIPSModel,
    a: torch.Tensor,
    b: torch.Tensor,
    fraction: float = DEFAULT_FRACTION,
    central_fraction: float = DEFAULT_CENTRAL_FRACTION,
    min_side: int = DEFAULT_MIN_SIDE,
) -> torch.Tensor:
    """LPIPS of each volume pair (a[i], b[i]): mean over the selected slices of all orientations. (N,)"""
    sa = _lpips_slices(a, fraction, central_fraction, min_side)
    sb = _lpips_slices(b, fraction, central_fraction, min_side)
    n = a.shape[0]
    per_vol = []
    for orient in ORIENTATIONS:
        d = model.distance(sa[orient], sb[orient]).view(n, -1)
        per_vol.append(d)
    return torch.cat(per_vol, dim=1).mean(dim=1)


def _protocol(model, shape, fraction, central_fraction, min_side, **extra) -> dict[str, Any]:
    return {
        "network": model.describe(),
        "slice_rule": (
            f"per orientation round({fraction:g} x depth) slices evenly spaced over the central "
            f"{central_fraction:.0%} of the axis"
        ),
        "slices_per_axis": _slice_counts(shape, fraction, central_fraction),
        "preprocessing": (
            f"[0,1] -> [-1,1], grey repeated to 3 channels, slices with shorter side < {min_side} upsampled "
            f"bilinearly to {min_side}; LPIPS of a volume pair = mean over its selected slices"
        ),
        **extra,
    }


def lpips_diversity(
    samples: Any,
    model: LPIPSModel,
    fraction: float = DEFAULT_FRACTION,
    central_fraction: float = DEFAULT_CENTRAL_FRACTION,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    batch_pairs: int = 16,
) -> dict[str, Any]:
    """``{"LPIPS diversity": float | None, "reason": str | None, "protocol": {...}}``: mean LPIPS over
    pairs of generated volumes (higher = more diverse)."""
    x = as_volumes(samples, "generated volumes")
    pairs = pick_pairs(x.shape[0], max_pairs, seed)
    proto = _protocol(model, tuple(x.shape[2:]), fraction, central_fraction, min_side,
                      n_generated_volumes=int(x.shape[0]), n_pairs=len(pairs),
                      pairs=f"all pairs if at most {max_pairs}, else {max_pairs} drawn with seed {seed}")
    if not model.available:
        return {"LPIPS diversity": None, "reason": model.reason, "protocol": proto}
    vals = []
    for k in range(0, len(pairs), batch_pairs):
        chunk = pairs[k : k + batch_pairs]
        i = torch.tensor([p[0] for p in chunk])
        j = torch.tensor([p[1] for p in chunk])
        vals.append(lpips_volume_pairs(model, x[i], x[j], fraction, central_fraction, min_side))
    return {"LPIPS diversity": float(torch.cat(vals).mean()), "reason": None, "protocol": proto}


def lpips_fidelity(
    fake: Any,
    real: Any,
    model: LPIPSModel,
    fraction: float = DEFAULT_FRACTION,
    central_fraction: float = DEFAULT_CENTRAL_FRACTION,
    min_side: int = DEFAULT_MIN_SIDE,
    batch: int = 16,
) -> dict[str, Any]:
    """``{"LPIPS fidelity": float | None, "reason", "protocol"}``: mean LPIPS between each generated
    volume and its ground truth (lower = closer)."""
    f = as_volumes(fake, "generated volumes")
    r = as_volumes(real, "ground-truth volumes")
    if f.shape != r.shape:
        raise MetricError(f"LPIPS fidelity pairs volumes one to one; got {tuple(f.shape)} and {tuple(r.shape)}")
    proto = _protocol(model, tuple(f.shape[2:]), fraction, central_fraction, min_side,
                      n_generated_volumes=int(f.shape[0]), n_real_volumes=int(r.shape[0]),
                      pairs="generated volume i with ground truth i")
    if not model.available:
        return {"LPIPS fidelity": None, "reason": model.reason, "protocol": proto}
    vals = [lpips_volume_pairs(model, f[k : k + batch], r[k : k + batch], fraction, central_fraction, min_side)
            for k in range(0, f.shape[0], batch)]
    return {"LPIPS fidelity": float(torch.cat(vals).mean()), "reason": None, "protocol": proto}
