"""Geometry of real scans: reading a NIfTI file and resampling it onto the profile's grid, with MONAI.

The target grid is a box in world (scanner / MNI) millimetres: ``voxel_mm`` per axis, ``shape`` voxels,
centred at ``centre_mm``, axes along R, A, S. The suite does not register scans: it assumes they are
already in MNI space (docs/REAL_DATA.md), so a field of view in MNI mm picks the same anatomy in
every scan.

Steps, per file:

1. ``LoadImage`` (nibabel reader) reads the volume and its full voxel-to-world affine;
   ``EnsureChannelFirst`` adds the channel axis; ``Orientation`` turns it to RAS by flips and axis swaps
   (exact; any remaining rotation of an oblique scan is left to step 3).
2. Images only, when the target voxel is coarser than the file's along an axis: ``GaussianSmooth``
   with sigma 0.4 x (target / source voxel size) source voxels along it, so the shrink does not alias.
3. ``SpatialResample`` onto the target affine and shape, images linearly, labels by nearest neighbour.
   This one step does what ``Spacingd`` + a crop/pad to the field of view would do, but with a single
   interpolation (the two would interpolate twice when the field of view falls between voxels) and with
   the field of view placed at a world position (a crop/pad counts voxels, which differ between scans). It uses the
   full affine, so an oblique scan is rotated properly, not snapped to its nearest axes.
4. Images not already in [0, 1]: ``ScaleIntensityRangePercentiles`` from the minimum to the
   99.5th percentile, clipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .subject import DataError

INTENSITY_TOP_PERCENTILE = 99.5  # of the resampled image: maps to 1 (bright fat and vessels clip)
ANTI_ALIAS_SIGMA = 0.4           # Gaussian sigma per unit of shrink factor, in source voxels


@dataclass(frozen=True)
class Grid:
    """The profile's target grid: shape (X, Y, Z), voxel size (mm) and the world centre of the box."""

    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]

    @classmethod
    def from_settings(cls, shape, voxel_mm, field_of_view_mm, centre_mm) -> "Grid":
        """From a profile's ``image_shape``, ``data.voxel_mm``, ``data.field_of_view_mm`` and
        ``data.field_of_view_centre_mm``; the field of view must be the shape times the voxel size."""
        shape = tuple(int(s) for s in shape)
        voxel = np.array(voxel_mm, dtype=float).reshape(-1)
        fov = np.array(field_of_view_mm, dtype=float).reshape(-1)
        if voxel.size != 3 or fov.size != 3 or len(centre_mm) != 3 or np.any(voxel <= 0):
            raise DataError(f"profile data.voxel_mm {voxel_mm}, data.field_of_view_mm {field_of_view_mm} and "
                            f"data.field_of_view_centre_mm {centre_mm} must be three positive sizes (mm) each")
        if np.any(np.abs(voxel * np.array(shape) - fov) > voxel / 2):
            raise DataError(f"profile data.field_of_view_mm {list(fov)} is not image_shape {list(shape)} times "
                            f"data.voxel_mm {list(voxel)}; make the three agree")
        return cls(shape, tuple(float(v) for v in voxel), tuple(float(c) for c in centre_mm))

    @classmethod
    def synthetic(cls, shape) -> "Grid":
        """The synthetic population's grid at ``shape`` (what ``data export`` writes)."""
        from .anatomy import FOV_CENTRE_MM, output_geometry

        spacing, _ = output_geometry(tuple(int(s) for s in shape))
        return cls(tuple(int(s) for s in shape), (spacing,) * 3, tuple(float(c) for c in FOV_CENTRE_MM))

    @property
    def affine(self) -> np.ndarray:
        affine = np.eye(4)
        voxel = np.array(self.voxel_mm)
        affine[:3, :3] = np.diag(voxel)
        affine[:3, 3] = np.array(self.centre_mm) - voxel * (np.array(self.shape) - 1) / 2
        return affine


def load_volume(sid: str, column: str, path: Path):
    """The file as a MONAI MetaTensor (1, X, Y, Z) float32 with its affine; a 4D file must hold one volume."""
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    if not path.is_file():
        raise DataError(f"subject '{sid}': the {column} file {path} does not exist; fix the path in the manifest "
                        "(relative paths are read from the manifest's folder)")
    try:
        volume = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
    except Exception as err:  # the readers raise many kinds for a damaged or foreign file
        raise DataError(f"subject '{sid}': the {column} file {path} cannot be read as NIfTI or "
                        f"MGH ({str(err).splitlines()[0][:160]}); re-export it as .nii.gz (or .mgz)") from None
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        what = "a 4D series" if volume.ndim == 4 else f"a {volume.ndim}D image"
        raise DataError(f"subject '{sid}': the {column} file {path} is {what} of shape {tuple(volume.shape)}; "
                        "give one 3D volume (split a series with fslsplit or nibabel and pick one)")
    # Orientation to RAS by flips and axis swaps alone: exact, and a file already on the target grid
    # in another orientation then needs no interpolation at all.
    return Orientation(axcodes="RAS", labels=None)(EnsureChannelFirst(channel_dim="no_channel")(volume))


def voxel_sizes(volume) -> np.ndarray:
    return np.linalg.norm(np.asarray(volume.affine, dtype=float)[:3, :3], axis=0)


def world_box(volume) -> np.ndarray:
    """(2, 3) world bounds (mm) of the volume's voxel box (voxel edges, not centres)."""
    n = np.array(volume.shape[1:], dtype=float)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ np.asarray(volume.affine, dtype=float)[:3, :3].T + np.asarray(volume.affine, dtype=float)[:3, 3]
    return np.stack([world.min(0), world.max(0)])


def check_same_field_of_view(sid: str, column: str, path: Path, volume, ref_path: Path, ref) -> None:
    """Label maps may lie on another grid (SynthSeg writes 1 mm) but must cover the image's box."""
    tolerance = max(voxel_sizes(volume).max(), voxel_sizes(ref).max()) / 2
    gap = np.abs(world_box(volume) - world_box(ref)).max()
    if gap > tolerance:
        raise DataError(f"subject '{sid}': the {column} file {path} covers a different field of view from the "
                        f"image {ref_path} (bounds differ by {gap:.1f} mm); the label maps must be computed from "
                        "this image (or resampled onto it by nearest neighbour)")


def resample(volume, grid: Grid, labels: bool) -> np.ndarray:
    """The volume on the target grid, (X, Y, Z) float32: labels by nearest neighbour, images linearly."""
    import torch
    from monai.transforms import GaussianSmooth, SpatialResample

    if not labels:
        shrink = max(grid.voxel_mm) / voxel_sizes(volume)
        if np.any(shrink > 1.0):
            sigma = [ANTI_ALIAS_SIGMA * s if s > 1.0 else 0.0 for s in shrink]
            volume = GaussianSmooth(sigma=sigma)(volume)
    out = SpatialResample(mode="nearest" if labels else "bilinear", padding_mode="zeros", align_corners=True,
                          dtype=torch.float64)(volume, dst_affine=torch.as_tensor(grid.affine),
                                               spatial_size=grid.shape)
    return np.asarray(out[0].numpy() if hasattr(out, "numpy") else out[0], dtype=np.float32)


def scale_intensity(image: np.ndarray) -> np.ndarray:
    """An image already in [0, 1] as it is; otherwise its minimum to 0 and its top percentile to 1."""
    from monai.transforms import ScaleIntensityRangePercentiles

    if float(image.min()) >= 0.0 and float(image.max()) <= 1.0:
        return image.astype(np.float32)
    scaler = ScaleIntensityRangePercentiles(lower=0.0, upper=INTENSITY_TOP_PERCENTILE, b_min=0.0, b_max=1.0,
                                            clip=True)
    return np.asarray(scaler(image[None])[0], dtype=np.float32)
