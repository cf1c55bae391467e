"""One subject of a population: a whole-head T1w volume, its label maps and its four scalars.

Arrays follow docs/CONVENTIONS.md: ``(C, X, Y, Z)`` in RAS, images float32 in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEMANTIC_LABELS = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter", 4: "lateral ventricles"}

# BrainLDM's order of the four conditioning values; each is scaled to [0, 1].
SCALAR_NAMES = ("sex", "age", "ventricular_volume", "brain_volume")


class DataError(ValueError):
    """Data the suite cannot use (a bad manifest, file, split or task name)."""


@dataclass
class Subject:
    id: str
    image: np.ndarray      # (1,X,Y,Z) float32 in [0,1], whole-head T1w
    lv_mask: np.ndarray    # (1,X,Y,Z) uint8 {0,1}
    semantics: np.ndarray  # (1,X,Y,Z) uint8, labels of SEMANTIC_LABELS
    skull: np.ndarray      # (1,X,Y,Z) float32: the image outside the brain mask, 0 inside
    scalars: np.ndarray    # (4,) float32 in [0,1]: sex, age, ventricular volume, brain volume
    affine: np.ndarray     # (4,4) float64 voxel->RAS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.affine)

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Voxel size along X, Y, Z (Z: the axial slices) in mm."""
        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (the affine is in mm)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def skull_image(image: np.ndarray, semantics: np.ndarray) -> np.ndarray:
    """The image outside the brain mask (label 0), zero inside: the multimodal task's partial image."""
    return np.where(semantics == 0, image, 0).astype(np.float32)
