"""A tiny analytic brain phantom, a fixture of the metrics' own tests.

It is *not* the suite's synthetic population (that is ``datasets.synthetic``); it exists so that the
metrics package can be tested without depending on it. Each subject is a deterministic
function of (shape, seed, index): a head ellipsoid with skull and scalp, a brain with a CSF rim, a
folded grey-matter ribbon, white matter, and two lateral ventricles whose size varies by subject,
under a smooth random deformation, a bias field and Rician-like noise.

Labels follow the suite's semantic convention: 0 background (outside the brain), 1 CSF, 2 grey
matter, 3 white matter, 4 lateral ventricles; the LV mask is label 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PhantomSubject:
    image: np.ndarray  # (1, X, Y, Z) float32 in [0, 1]
    lv_mask: np.ndarray  # (1, X, Y, Z) uint8
    semantics: np.ndarray  # (1, X, Y, Z) uint8, labels 0-4


def phantom_subject(shape: tuple[int, int, int], seed: int, index: int) -> PhantomSubject:
    rng = np.random.default_rng([seed, index, 7919])
    X, Y, Z = shape
    gx, gy, gz = np.meshgrid(
        np.linspace(-1, 1, X, dtype=np.float32),
        np.linspace(-1, 1, Y, dtype=np.float32),
        np.linspace(-1, 1, Z, dtype=np.float32),
        indexing="ij",
    )
    # smooth random deformation (low-frequency sinusoids) and a small shift / head-size scaling
    amp = 0.04
    ph = rng.uniform(0, 2 * np.pi, size=6)
    dx = amp * np.sin(2.0 * gy + ph[0]) * np.cos(1.5 * gz + ph[1])
    dy = amp * np.sin(2.0 * gz + ph[2]) * np.cos(1.5 * gx + ph[3])
    dz = amp * np.sin(2.0 * gx + ph[4]) * np.cos(1.5 * gy + ph[5])
    scale = rng.uniform(0.92, 1.04)
    shift = rng.uniform(-0.03, 0.03, size=3)
    x = (gx + dx - shift[0]) / scale
    y = (gy + dy - shift[1]) / scale
    z = (gz + dz - shift[2]) / scale

    r_head = np.sqrt((x / 0.92) ** 2 + (y / 0.92) ** 2 + (z / 0.9) ** 2)
    r_brain = np.sqrt((x / 0.74) ** 2 + (y / 0.78) ** 2 + (z / 0.72) ** 2)
    fold = 0.05 * np.sin(9 * np.arctan2(y, x) + ph[0]) * np.cos(7 * np.arctan2(z, np.hypot(x, y)) + ph[1])

    sem = np.zeros(shape, np.uint8)
    img = np.zeros(shape, np.float32)
    head = r_head < 1.0
    img[head] = 0.35  # scalp
    skull = head & (r_head > 0.86) & (r_head < 0.94)
    img[skull] = 0.12  # bone (dark) ...
    img[skull & (np.abs(r_head - 0.9) < 0.015)] = 0.5  # ... with marrow

    brain = r_brain < 1.0
    csf_rim = brain & (r_brain > 0.93)
    gm = brain & ~csf_rim & (r_brain > 0.72 + fold)
    wm = brain & ~csf_rim & ~gm
    sem[csf_rim] = 1
    sem[gm] = 2
    sem[wm] = 3
    img[csf_rim] = 0.15
    img[gm] = 0.5
    img[wm] = 0.78

    # lateral ventricles: two ellipsoids either side of the midline, size varies by subject
    v = rng.uniform(0.7, 1.5)
    for side in (-1.0, 1.0):
        cx, cy, cz = side * 0.13, 0.05, 0.08
        r_v = np.sqrt(((x - cx) / (0.09 * v)) ** 2 + ((y - cy) / (0.34 * v**0.5)) ** 2 + ((z - cz) / (0.12 * v)) ** 2)
        lv = brain & (r_v < 1.0)
        sem[lv] = 4
        img[lv] = 0.12

    # contrast, bias field, noise
    gamma = rng.uniform(0.85, 1.15)
    img = np.clip(img, 0, 1) ** gamma
    bias = 1.0 + 0.08 * (rng.uniform(-1, 1) * gx + rng.uniform(-1, 1) * gy + rng.uniform(-1, 1) * gz)
    img = img * bias
    noise = rng.normal(0, 0.02, size=(2,) + shape).astype(np.float32)
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    img = np.clip(img, 0, 1).astype(np.float32)
    return PhantomSubject(img[None], (sem == 4).astype(np.uint8)[None], sem[None])


def phantom_population(shape: tuple[int, int, int], n: int, seed: int = 0, start: int = 0) -> dict[str, np.ndarray]:
    """``{"image": (n,1,X,Y,Z) float32, "lv_mask": (n,1,X,Y,Z) uint8, "semantics": (n,1,X,Y,Z) uint8}``."""
    subs = [phantom_subject(tuple(shape), seed, start + i) for i in range(n)]
    return {
        "image": np.stack([s.image for s in subs]),
        "lv_mask": np.stack([s.lv_mask for s in subs]),
        "semantics": np.stack([s.semantics for s in subs]),
    }
