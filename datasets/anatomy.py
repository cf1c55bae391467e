"""Reference anatomy for the synthetic population, derived once from nilearn's MNI152 2009 template.

The template (T1w, grey- and white-matter probabilities; shipped inside the nilearn wheel, so it loads
offline) is skull-stripped. From it we derive, in template space (MNI mm, RAS):

* hard labels at 1 mm: CSF / grey matter / white matter inside the brain mask, and the lateral
  ventricles (dark CSF voxels in the central region, the connected component through a seed in each
  hemisphere);
* a texture residual (template intensity minus its piecewise-constant class model), so that deep
  grey nuclei and other detail survive the per-subject intensity model;
* a cortical depth map (distance of tissue to the nearest CSF), used for sulcal widening with age;
* an intracranial envelope (the brain mask, smoothed over the sulci, plus a CSF rim) as a signed
  distance, around which each subject's skull and scalp are built, and a hull that continues it down
  into a neck below the posterior fossa;
* a smooth outward field around the ventricles, along which they are dilated with age, and its reach
  (1 at the ventricles, fading over LV_FIELD_DECAY_MM), over which each subject's ventricles are moved.

These fields are resampled (anti-aliased) to a reference grid matched to the profile's image shape and
cached on disk, keyed by the generator version and the shape.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from core.files import atomic_write_bytes, file_lock

# Bump when anything here or in the subject generator changes what a subject looks like:
# it is part of every cache key.
GENERATOR_VERSION = "synth-mni152-v3"  # v3: ventricles vary by region, side and shape

# Field of view of the generated volumes in mm (X, Y, Z), the 5:7:5 box of BrainLDM's 160x224x160
# at 1.15 mm, so that the whole head fits; centred on the head (MNI mm).
FOV_MM = np.array([184.0, 257.6, 184.0])
FOV_CENTRE_MM = np.array([0.0, -17.0, 13.0])

# Template-space box the reference grid covers: every subject's sampling points fall inside it
# (head scaling shrinks, rotations and deformations move points by at most ~10 mm).
BOX_LO_MM = np.array([-112.0, -166.0, -108.0])
BOX_HI_MM = np.array([112.0, 132.0, 126.0])

CSF_RIM_MM = 2.0          # CSF between the (young) brain and the inner table of the skull
NECK_Z_MM = -30.0         # below this the head outline continues as a slowly tapering neck
NECK_TAPER = 0.35         # mm of narrowing per mm downwards
LV_SEEDS_MM = ((-9.0, -10.0, 22.0), (9.0, -10.0, 22.0))  # bodies of the left and right ventricles
LV_FIELD_DECAY_MM = 10.0  # how far from the ventricles the age-related push reaches

CHANNELS = ("csf", "gm", "wm", "lv", "resid", "depth", "d_env", "d_hull", "vx", "vy", "vz", "reach")
BRAIN_CHANNELS = slice(0, 6)   # sampled where the (atrophied, ventricle-dilated) brain maps
HEAD_CHANNELS = slice(6, 8)    # sampled where the head maps
FIELD_CHANNELS = slice(8, 12)  # the ventricle push field and its reach (1 at the ventricles)


def output_geometry(shape: tuple[int, int, int]) -> tuple[float, np.ndarray]:
    """Isotropic voxel size (mm) and voxel->RAS affine of generated volumes of this shape."""
    shape_arr = np.asarray(shape, dtype=np.float64)
    spacing = float(np.max(FOV_MM / shape_arr))
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = FOV_CENTRE_MM - spacing * (shape_arr - 1) / 2
    return spacing, affine


@dataclass
class Reference:
    """Reference fields on a template-space grid, for one output shape."""

    shape: tuple[int, int, int]
    fields: np.ndarray        # (len(CHANNELS), nx, ny, nz) float32
    origin: np.ndarray        # template mm of fields[:, 0, 0, 0]
    spacing: float            # mm between reference grid points
    affine: np.ndarray        # output voxel -> RAS mm
    voxel_mm: float           # output voxel size
    brain_centre: np.ndarray  # template mm, centre of the atrophy contraction
    class_means: np.ndarray   # template intensity of csf, gm, wm (for scaling the texture residual)


def source_version() -> str:
    """The generator version and the nilearn release whose template it reads (part of cache keys)."""
    try:
        from importlib.metadata import version
        nilearn = version("nilearn")
    except Exception:  # pragma: no cover - an unusual install
        nilearn = "unknown"
    return f"{GENERATOR_VERSION}+nilearn-{nilearn}"


def _key(shape) -> str:
    params = {"version": source_version(), "shape": list(map(int, shape)), "fov": FOV_MM.tolist(),
              "centre": FOV_CENTRE_MM.tolist(), "box": [BOX_LO_MM.tolist(), BOX_HI_MM.tolist()],
              "rim": CSF_RIM_MM, "neck": [NECK_Z_MM, NECK_TAPER], "seeds": LV_SEEDS_MM,
              "decay": LV_FIELD_DECAY_MM, "channels": CHANNELS}
    blob = json.dumps(params).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def load_reference(shape: tuple[int, int, int], cache_dir: str | Path) -> Reference:
    """The reference for ``shape``, from the cache or built (a few seconds) and cached."""
    shape = tuple(int(s) for s in shape)
    key = _key(shape)
    path = Path(cache_dir) / "synthetic" / f"anatomy_{key}.npz"
    if key in _MEMORY and path.is_file():
        return _MEMORY[key]
    ref = _MEMORY.get(key) or _read(path, shape)
    if ref is None or not path.is_file():
        with file_lock(path.with_suffix(".lock")):  # concurrent jobs: one builds, the others wait and read
            ref = ref or _read(path, shape) or build_reference(shape)
            if not path.is_file():
                _write(path, ref)
    _MEMORY[key] = ref
    return ref


# Built references, per process: several caches (e.g. tests' temporary ones) share one build.
_MEMORY: dict[str, Reference] = {}


def _read(path: Path, shape) -> Reference | None:
    if path.is_file():
        try:
            with np.load(path) as z:
                return Reference(shape=shape, fields=z["fields"], origin=z["origin"],
                                 spacing=float(z["spacing"]), affine=z["affine"],
                                 voxel_mm=float(z["voxel_mm"]), brain_centre=z["brain_centre"],
                                 class_means=z["class_means"])
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a truncated or damaged file: rebuild it
    return None


def _write(path: Path, ref: Reference) -> None:
    # Written atomically, so that a concurrent reader never sees half a file; uncompressed (np.savez).
    buffer = io.BytesIO()
    np.savez(buffer, fields=ref.fields, origin=ref.origin, spacing=ref.spacing, affine=ref.affine,
             voxel_mm=ref.voxel_mm, brain_centre=ref.brain_centre, class_means=ref.class_means)
    atomic_write_bytes(path, buffer.getvalue())


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from nilearn import datasets as nd
    except ImportError as err:  # pragma: no cover - nilearn is a dependency
        raise RuntimeError("the synthetic population needs nilearn (pip install nilearn)") from err
    t1 = nd.load_mni152_template(resolution=1)
    gm = nd.load_mni152_gm_template(resolution=1)
    wm = nd.load_mni152_wm_template(resolution=1)
    affine = np.asarray(t1.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("unexpected MNI152 template affine in this nilearn version; "
                           f"expected 1 mm RAS, got {affine.tolist()}")
    f32 = lambda img: np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    return f32(t1), f32(gm), f32(wm), affine[:3, 3].copy()


def _grid_points(origin: np.ndarray, spacing: float, n: tuple[int, int, int]) -> np.ndarray:
    axes = [origin[i] + spacing * np.arange(n[i], dtype=np.float32) for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)


def _sample(volume: np.ndarray, mm_points: np.ndarray, origin: np.ndarray, spacing: float) -> np.ndarray:
    # mode="nearest": beyond the template's lowest slice the brainstem continues (a spinal cord),
    # elsewhere its border is background anyway.
    coords = (mm_points - origin[:, None]) / spacing
    return ndi.map_coordinates(volume, coords, order=1, mode="nearest").astype(np.float32)


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (mm) to the border of ``mask``: negative inside, positive outside."""
    outside = ndi.distance_transform_edt(~mask) * spacing
    inside = ndi.distance_transform_edt(mask) * spacing
    return (outside - np.where(mask, inside, 0.0)).astype(np.float32)


def _lateral_ventricles(t1, csf, brain, tmpl_origin) -> np.ndarray:
    """Dark CSF in the central region, the connected component through each hemisphere's seed."""
    mm = [tmpl_origin[i] + np.arange(t1.shape[i]) for i in range(3)]
    X, Y, Z = np.meshgrid(*mm, indexing="ij", sparse=True)
    central = (np.abs(X) <= 32) & (np.abs(X) >= 1) & (Y >= -75) & (Y <= 40) & (Z >= -25) & (Z <= 45)
    candidates = central & brain & (t1 < 0.38) & (csf > 0.5)
    labels, _ = ndi.label(candidates)
    lv = np.zeros(t1.shape, dtype=bool)
    for seed in LV_SEEDS_MM:
        idx = tuple(int(round(seed[i] - tmpl_origin[i])) for i in range(3))
        component = labels[idx]
        if component == 0:
            raise RuntimeError(f"the lateral-ventricle seed at {seed} mm is not dark CSF in this template; "
                               "the MNI152 template shipped with nilearn may have changed")
        lv |= labels == component
    return lv


def build_reference(shape: tuple[int, int, int]) -> Reference:
    voxel_mm, affine = output_geometry(shape)
    t1, gm, wm, tmpl_origin = _load_template()

    # --- 1 mm template space: hard labels, texture residual, cortical depth -------------------
    brain = t1 > 0.2  # nilearn's own brain-mask threshold
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    hard = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    hard[~brain] = 0
    lv = _lateral_ventricles(t1, csf, brain, tmpl_origin)
    hard[lv] = 4
    del csf, gm, wm
    class_means = np.array([np.median(t1[hard == k]) for k in (1, 2, 3)], dtype=np.float32)
    model = np.zeros_like(t1)
    for k, m in zip((1, 2, 3, 4), (class_means[0], class_means[1], class_means[2], class_means[0])):
        model[hard == k] = m
    resid = np.where(brain, t1 - model, 0.0).astype(np.float32)
    del model
    tissue = (hard == 2) | (hard == 3) | (hard == 4)
    depth = np.minimum(ndi.distance_transform_edt(tissue), 8.0).astype(np.float32)
    del tissue

    # --- 2 mm box: envelope, head hull (with neck), ventricle push field -----------------------
    sp2 = 2.0
    n2 = tuple(int(np.ceil((BOX_HI_MM[i] - BOX_LO_MM[i]) / sp2)) + 1 for i in range(3))
    pts2 = _grid_points(BOX_LO_MM, sp2, n2)
    brain2 = _sample(ndi.gaussian_filter(brain.astype(np.float32), 0.8), pts2, tmpl_origin, 1.0)
    brain2 = brain2.reshape(n2) > 0.5
    # Smooth over the sulci and the interhemispheric fissure: the inner table does not follow gyri.
    envelope = ndi.binary_fill_holes(ndi.gaussian_filter(brain2.astype(np.float32), 3.0 / sp2) > 0.25)
    d_env = _signed_distance(envelope, sp2) - CSF_RIM_MM
    z_axis = BOX_LO_MM[2] + sp2 * np.arange(n2[2])
    # The neck's cross-section: the head's outline just above, projected and closed (a solid shape).
    band = (z_axis >= NECK_Z_MM) & (z_axis <= NECK_Z_MM + 25.0)
    section = ndi.binary_closing(envelope[:, :, band].any(axis=2), structure=np.ones((3, 3)), iterations=5)
    section = ndi.binary_fill_holes(section)
    d_slice = _signed_distance(section, sp2) - CSF_RIM_MM
    below = np.clip(NECK_Z_MM - z_axis, 0.0, None)
    d_prism = np.where(z_axis < NECK_Z_MM, d_slice[..., None] + NECK_TAPER * below, 1e3).astype(np.float32)
    d_hull = np.minimum(d_env, d_prism)
    del d_prism

    lv2 = _sample(ndi.gaussian_filter(lv.astype(np.float32), 0.8), pts2, tmpl_origin, 1.0).reshape(n2) > 0.5
    d_lv = _signed_distance(lv2, sp2)
    grad = np.stack(np.gradient(d_lv, sp2))
    grad /= np.maximum(np.linalg.norm(grad, axis=0), 1e-6)
    weight = np.exp(-0.5 * (np.clip(d_lv, 0.0, None) / LV_FIELD_DECAY_MM) ** 2)
    push = np.stack([ndi.gaussian_filter(weight * g, 1.0) for g in grad]
                    + [ndi.gaussian_filter(weight, 1.0)]).astype(np.float32)
    del grad, weight, d_lv

    # --- reference grid for this shape: anti-aliased for the output voxel size ----------------
    # Twice as fine as the output (interpolation under warps stays sharp), not finer than 2 mm
    # unless the output itself is finer.
    spacing = max(voxel_mm / 2.0, min(voxel_mm, 2.0))
    n = tuple(int(np.ceil((BOX_HI_MM[i] - BOX_LO_MM[i]) / spacing)) + 1 for i in range(3))
    pts = _grid_points(BOX_LO_MM, spacing, n)
    sigma = 0.42 * voxel_mm  # Gaussian that keeps the output's sampling free of aliasing
    fields = np.empty((len(CHANNELS),) + n, dtype=np.float32)
    onehot = lambda k: (hard == k).astype(np.float32)
    for c, vol in enumerate((onehot(1), onehot(2), onehot(3), onehot(4), resid, depth)):
        fields[c] = _sample(ndi.gaussian_filter(vol, sigma), pts, tmpl_origin, 1.0).reshape(n)
    for c, vol in zip(range(6, 12), (d_env, d_hull, push[0], push[1], push[2], push[3])):
        fields[c] = _sample(vol, pts, BOX_LO_MM, sp2).reshape(n)

    centre = np.array([np.mean(np.nonzero(brain)[i]) for i in range(3)]) + tmpl_origin
    return Reference(shape=tuple(shape), fields=fields, origin=BOX_LO_MM.copy(), spacing=float(spacing),
                     affine=affine, voxel_mm=voxel_mm, brain_centre=centre, class_means=class_means)
