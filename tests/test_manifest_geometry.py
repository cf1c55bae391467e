"""The manifest loader finds the same anatomy whatever the file's geometry: nilearn's MNI152 2009
template (the one datasets/anatomy.py reads) written as 1 mm RAS, LPS, 1 x 1 x 3 mm and tilted by
15 degrees, each with a ball marker drawn in world mm, loaded at the `cpu` profile's grid."""
import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmark.profiles import load_profile
from datasets.manifest import load_manifest
from datasets.manifest_geometry import Grid

BALL_CENTRE_MM = np.array([22.0, -20.0, 25.0])
BALL_RADIUS_MM = 14.0


def _ball(shape, affine) -> np.ndarray:
    # each voxel's offset from the centre in mm, summed axis by axis by broadcasting (no index grid)
    offset = affine[:3, 3] - BALL_CENTRE_MM
    axes = [np.arange(n)[:, None] * affine[:3, a] for a, n in enumerate(shape)]  # (n, 3) per voxel axis
    squared = sum(((axes[0][:, None, None, c] + axes[1][None, :, None, c] + axes[2][None, None, :, c] + offset[c]) ** 2)
                  for c in range(3))
    return (squared <= BALL_RADIUS_MM ** 2).astype(np.uint8)


def _rotation_x(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def _geometries(template):
    """name -> (image array, affine): the template in four geometries."""
    data = np.asarray(template.get_fdata(dtype=np.float32))
    affine = template.affine
    out = {"ras_1mm": (data, affine)}
    flip = np.eye(4)
    flip[0, 0] = flip[1, 1] = -1
    flip[:2, 3] = np.array(data.shape[:2]) - 1
    out["lps_1mm"] = (data[::-1, ::-1, :].copy(), affine @ flip)
    nz = data.shape[2] // 3 * 3
    thick = data[:, :, :nz].reshape(data.shape[0], data.shape[1], nz // 3, 3).mean(-1)  # 3 mm slices
    step = np.diag([1.0, 1.0, 3.0, 1.0])
    step[2, 3] = 1.0  # a thick slice's centre is the middle of its three 1 mm slices
    out["aniso_1x1x3mm"] = (thick, affine @ step)
    # the template resampled (MONAI, linearly) onto a grid tilted by 15 degrees about the left-right axis
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    centre = affine @ np.r_[(np.array(data.shape) - 1) / 2, 1.0]
    tilted = np.eye(4)
    tilted[:3, 3] = centre[:3]
    tilted = tilted @ _rotation_x(15.0)
    shape = (data.shape[0], 250, 250)
    corner = np.eye(4)
    corner[:3, 3] = -(np.array(shape) - 1) / 2
    tilted = tilted @ corner
    src = MetaTensor(torch.as_tensor(data)[None], affine=torch.as_tensor(affine))
    res = SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=True, dtype=torch.float64)(
        src, dst_affine=torch.as_tensor(tilted), spatial_size=shape)
    out["oblique_15deg"] = (np.asarray(res[0].numpy(), dtype=np.float32), tilted)
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from nilearn import datasets as nd

    d = tmp_path_factory.mktemp("mni")
    rows = []
    for name, (data, affine) in _geometries(nd.load_mni152_template(resolution=1)).items():
        ball = _ball(data.shape, affine)
        for column, array in (("image", data), ("lv_mask", ball), ("semantics", 4 * ball)):
            nib.save(nib.Nifti1Image(np.asarray(array), affine), str(d / f"{name}_{column}.nii.gz"))
        rows.append({"id": name, "image": f"{name}_image.nii.gz", "lv_mask": f"{name}_lv_mask.nii.gz",
                     "semantics": f"{name}_semantics.nii.gz", "sex": "F", "age_years": "60",
                     "ventricular_volume_ml": "20", "brain_volume_ml": "1200"})
    with open(d / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    p = load_profile("cpu")
    grid = Grid.from_settings(p.image_shape, p.data.voxel_mm, p.data.field_of_view_mm, p.data.field_of_view_centre_mm)
    return {s.id: s for s in load_manifest(d / "manifest.csv", grid)}, grid


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name", ["lps_1mm", "aniso_1x1x3mm", "oblique_15deg"])
def test_every_geometry_loads_the_same_anatomy(loaded, name):
    subjects, grid = loaded
    ref, s = subjects["ras_1mm"], subjects[name]
    assert s.image.shape == (1,) + grid.shape and np.allclose(s.affine, grid.affine)
    corr = float(np.corrcoef(ref.image.ravel(), s.image.ravel())[0, 1])
    dice = _dice(ref.lv_mask > 0, s.lv_mask > 0)
    print(f"{name}: image correlation {corr:.4f}, marker Dice {dice:.3f}")
    assert corr >= 0.95 and dice >= 0.8, (name, corr, dice)


def test_the_marker_lands_where_it_was_drawn(loaded):
    subjects, grid = loaded
    expected = _ball(grid.shape, grid.affine)
    assert _dice(subjects["ras_1mm"].lv_mask[0] > 0, expected > 0) >= 0.9
    # an oblique scan snapped to its nearest axes would move the ball by ~10 mm: Dice far below this
    assert _dice(subjects["oblique_15deg"].lv_mask[0] > 0, expected > 0) >= 0.8


def test_profiles_state_their_grid_in_mm():
    from benchmark.profiles import available_profiles
    from datasets.subject import DataError

    for name in available_profiles():
        p = load_profile(name)
        grid = Grid.from_settings(p.image_shape, p.data.voxel_mm, p.data.field_of_view_mm,
                                  p.data.field_of_view_centre_mm)
        if name == "paper":  # BrainLDM's 1 mm MNI space
            assert grid.voxel_mm == (1.0, 1.0, 1.0) and grid.shape == (160, 224, 160)
        else:  # the synthetic population's grid: exported subjects load unchanged
            assert np.allclose(grid.affine, Grid.synthetic(p.image_shape).affine)
    with pytest.raises(DataError, match="field_of_view_mm"):
        Grid.from_settings((48, 64, 48), [4.0] * 3, [100.0, 256.0, 192.0], [0.0, 0.0, 0.0])
