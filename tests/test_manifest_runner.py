"""`run_benchmark.py --data manifest.csv` end to end on exported subjects that were reoriented (LPS)
and resampled to anisotropic voxels, as real scans would be stored. Sizes are cut by the runner test's
tiny overrides: the bookkeeping is tested, not the numbers."""
import csv

import nibabel as nib
import numpy as np
import torch

from benchmark.run.records import iter_records
from tests.test_runner import TINY, main_in_process

ANISOTROPIC_MM = (4.0, 5.0, 7.0)
OVERRIDES = [o for o in TINY if not o.startswith("data.train_pool=")]


def _cli(args, cache, train_pool: int):
    flags = sum((["--override", o] for o in OVERRIDES + [f"data.train_pool={train_pool}"]), [])
    return main_in_process([*args, "--profile", "smoke", "--quiet", "--cache-dir", cache, *flags])


def _reoriented_anisotropic(src_path, dst_path, labels: bool) -> None:
    """The file flipped to LPS and resampled (MONAI) onto ANISOTROPIC_MM voxels over the same box."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = nib.load(str(src_path))
    data = np.asarray(src.get_fdata(dtype=np.float32))
    box = np.array(data.shape) * np.abs(np.diag(src.affine)[:3])
    shape = tuple(int(n) for n in np.round(box / ANISOTROPIC_MM))
    centre = src.affine @ np.r_[(np.array(data.shape) - 1) / 2, 1.0]
    dst = np.diag([-ANISOTROPIC_MM[0], -ANISOTROPIC_MM[1], ANISOTROPIC_MM[2], 1.0])  # LPS
    dst[:3, 3] = centre[:3] - dst[:3, :3] @ ((np.array(shape) - 1) / 2)
    out = SpatialResample(mode="nearest" if labels else "bilinear", align_corners=True, dtype=torch.float64)(
        MetaTensor(torch.as_tensor(data)[None], affine=torch.as_tensor(src.affine)),
        dst_affine=torch.as_tensor(dst), spatial_size=shape)
    array = np.asarray(out[0].numpy(), dtype=np.uint8 if labels else np.float32)
    nib.save(nib.Nifti1Image(array, dst), str(dst_path))


def test_grid_runs_on_reoriented_anisotropic_exported_subjects(tmp_path):
    cache, export, scans = tmp_path / "cache", tmp_path / "export", tmp_path / "scans"
    code, log = _cli(["data", "export", "--out", str(export), "--n", "13", "--split", "train"], cache, train_pool=13)
    assert code == 0, log
    scans.mkdir()
    with open(export / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for column in ("image", "lv_mask", "semantics", "skull"):
            _reoriented_anisotropic(export / row[column], scans / row[column], labels=column in ("lv_mask", "semantics"))
    assert nib.aff2axcodes(nib.load(str(scans / rows[0]["image"])).affine) == ("L", "P", "S")
    with open(scans / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "grid"
    code, log = _cli(["--data", str(scans / "manifest.csv"), "--methods", "vcm", "--sizes", "10", "--no-validation",
                 "--out", str(out)], cache, train_pool=10)  # 13 subjects: 3 test, 10 training
    assert code == 0, log
    records = list(iter_records(out))
    assert any(r["method"] == "vcm" and r["size"] == 10 and r.get("status", "ok") == "ok" for r in records), records
    assert all("manifest(" in r["data"] for r in records)
