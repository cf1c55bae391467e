"""One synthetic subject's draw: a whole-head T1w volume, its labels and its four scalars, on real
anatomy (MNI152 2009, the reference of datasets/anatomy.py). datasets/synthetic.py builds the
population (and its on-disk cache) from these draws.

Each subject is a deterministic function of (seed, index, shape); its random draws depend on
(seed, index) only and all its spatial fields are defined in mm, so the same subject at two image
shapes is the same head at two resolutions.

Per subject: sex (1 = male, 0 = female; UK Biobank's coding) and age (uniform over AGE_RANGE years);
head size by sex; a small random rotation and translation; a smooth random deformation; with age, the
lateral ventricles dilate (tissue is pushed away along a smooth outward field) and the brain atrophies
(it contracts inside a skull that does not, and the cortex thins at the sulci), both with individual
variation; skull and scalp layers with smoothly varying thickness; T1w intensities (CSF dark, grey
matter mid, white matter bright, cortical bone dark, marrow and fat bright), bias field, gamma
contrast and Rician noise. All warps happen once, at the final resolution (linear interpolation of
partial-volume tissue fractions; labels are their arg-max).

Scalars, in BrainLDM's order, each in [0, 1]: sex; age scaled over AGE_RANGE; ventricular volume and
brain volume (grey + white matter) measured on the subject's own labels (voxel count x voxel volume)
and scaled by the fixed ranges VENTRICLE_RANGE_ML and BRAIN_RANGE_ML, clipped to [0, 1].
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .anatomy import BRAIN_CHANNELS, FIELD_CHANNELS, FOV_CENTRE_MM, FOV_MM, HEAD_CHANNELS, Reference
from .subject import voxel_volume_ml

AGE_RANGE = (44.0, 82.0)            # years; UK Biobank's imaging ages
VENTRICLE_RANGE_ML = (0.0, 80.0)    # lateral ventricles, both sides
BRAIN_RANGE_ML = (600.0, 1900.0)    # grey + white matter
_QUANT = 65535.0                    # images are stored as uint16; generated ones are quantised alike

# Smooth random fields: white noise on a 12 mm lattice over the field of view, Gaussian-smoothed
# (about 24 mm), read out by linear interpolation.
_LATTICE_MM = 12.0
_LATTICE_MARGIN_MM = 24.0
_SMOOTH_CELLS = 2.0


def scale_age(age_years: float) -> float:
    return float(np.clip((age_years - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]), 0.0, 1.0))


def scale_volume(ml: float, bounds: tuple[float, float]) -> float:
    return float(np.clip((ml - bounds[0]) / (bounds[1] - bounds[0]), 0.0, 1.0))


def unscale(value: float, bounds: tuple[float, float]) -> float:
    """Inverse of the scaling above (for reports): e.g. unscale(s[1], AGE_RANGE) is the age in years."""
    return float(bounds[0] + value * (bounds[1] - bounds[0]))


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _linear_weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of the upper one, for linear interpolation at fractional indices."""
    coords = np.clip(coords, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(coords).astype(np.intp), n - 2)
    return i0, coords - i0


# Lateral ventricles vary between people far beyond what age and total volume say (docs/DATA.md):
# each subject's outward push (mm) is drawn per region and side, plus bumps at the ventricles' scale.
_LV_REGIONS = ("frontal", "body", "posterior")  # frontal horns; bodies; atria + occipital horns
_LV_FRONTAL_Y_MM = -5.0      # template mm: anterior of this is the frontal horn (foramen of Monro ~0)
_LV_POSTERIOR_Y_MM = -38.0   # posterior of this, the atrium and occipital horn
_LV_BORDER_MM = 5.0          # softness of the region and side borders
_LV_AGE_MM = (-1.0, 12.0)   # mean push at ages 44 and 82 (with a ** 1.5 in between)
_LV_REGIONAL_SD_MM = 2.5   # horns enlarge separately
_LV_SHAPE_CELLS = 1.0        # ventricle-scale bumps: ~12 mm smooth field
_LV_SHAPE_MM = 4.0           # their amplitude (sd, mm)
_LV_SHIFT_SD_MM = np.array([0.7, 6.0, 6.0])  # x (left-right), y, z
_LV_DILATION_MM = (-3.0, 16.0)  # push limits: below -3 mm the thin young ventricles would vanish
_LV_FLOW_STEPS = 6


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _VentricleDraw:
    """One subject's ventricle dilation: an age trend, per-region and per-side deviations."""

    def __init__(self, push_mm: np.ndarray, shift_mm: np.ndarray):
        self.push_mm = push_mm    # (side: left, right) x (region) mm
        self.shift_mm = shift_mm  # (region, 3) mm, applied where the push field reaches

    @classmethod
    def draw(cls, rng: np.random.Generator, a01: float) -> "_VentricleDraw":
        # Age trend with individual spread: the whole system enlarges ~3x from 45 to 80 years.
        overall = _LV_AGE_MM[0] + _LV_AGE_MM[1] * a01 ** 1.5 + rng.normal(0.0, 1.4)
        scale = np.exp(rng.normal(0.0, 0.25))                # how strongly this brain's ventricles respond
        regional = rng.normal(0.0, _LV_REGIONAL_SD_MM, len(_LV_REGIONS))    # horns enlarge separately
        asymmetry = rng.normal(0.0, 0.8) + rng.normal(0.0, 0.6, len(_LV_REGIONS))  # left minus right, mm
        push = (overall + regional) * scale
        # position relative to the brain: along the midline, not across it (that would be a midline shift)
        # (the whole system, plus each region on its own: horns bend and tilt)
        shift = rng.normal(0.0, 1.0, 3) * _LV_SHIFT_SD_MM + rng.normal(0.0, 0.7, (len(_LV_REGIONS), 3)) * _LV_SHIFT_SD_MM
        return cls(np.stack([push + asymmetry / 2, push - asymmetry / 2]), np.clip(shift, -10.0, 10.0))

    def displacement_mm(self, q_mm: np.ndarray, shape_field: np.ndarray, push: np.ndarray,
                        reach: np.ndarray) -> np.ndarray:
        """(3, M) mm by which the ventricles at template points ``q_mm`` (3, M) move: the outward push
        (a soft blend of the regions and sides, plus bumps) along ``push``, and the shifts by ``reach``."""
        x, y = q_mm[0], q_mm[1]
        left = _sigmoid(-x / (0.5 * _LV_BORDER_MM))  # RAS: left is negative x
        frontal = _sigmoid((y - _LV_FRONTAL_Y_MM) / _LV_BORDER_MM)
        posterior = _sigmoid((_LV_POSTERIOR_Y_MM - y) / _LV_BORDER_MM)
        body = np.clip(1.0 - frontal - posterior, 0.0, 1.0)
        weights = np.stack([frontal, body, posterior])  # (region, M)
        side = left * (self.push_mm[0] @ weights) + (1.0 - left) * (self.push_mm[1] @ weights)
        dilation = np.clip(side + _LV_SHAPE_MM * shape_field, *_LV_DILATION_MM)
        return dilation[None] * push + (self.shift_mm.T @ weights) * reach[None]


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume step: 0 well below 0, 1 well above, linear over one voxel."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


class _Generator:
    """Draws subjects on one reference (one image shape)."""

    def __init__(self, ref: Reference):
        self.ref = ref
        shape = ref.shape
        axes = [ref.affine[i, i] * np.arange(shape[i]) + ref.affine[i, 3] for i in range(3)]  # mm
        self.world = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)  # (3, N) subject mm
        lo = FOV_CENTRE_MM - FOV_MM / 2 - _LATTICE_MARGIN_MM
        n_lat = np.ceil((FOV_MM + 2 * _LATTICE_MARGIN_MM) / _LATTICE_MM).astype(int) + 1
        self.lattice_shape = tuple(int(n) for n in n_lat)
        # The output grid is axis-aligned, so linear interpolation from the lattice is separable.
        self.lattice_weights = [_linear_weights((axes[i] - lo[i]) / _LATTICE_MM, self.lattice_shape[i])
                                for i in range(3)]
        self.voxel_ml = voxel_volume_ml(ref.affine)

    def _smooth_fields(self, rng: np.random.Generator, count: int, cells: float = _SMOOTH_CELLS) -> np.ndarray:
        """``count`` smooth random fields with unit standard deviation, at the output voxels (count, N);
        ``cells`` is the Gaussian's width in lattice cells (2: about 24 mm, 1: about 12 mm)."""
        noise = rng.standard_normal((count,) + self.lattice_shape)
        out = []
        for c in range(count):
            field = ndi.gaussian_filter(noise[c], cells, mode="nearest")
            field /= field.std()
            for axis, (i0, t) in enumerate(self.lattice_weights):
                shape = [1, 1, 1]
                shape[axis] = -1
                t = t.reshape(shape)
                field = np.take(field, i0, axis=axis) * (1.0 - t) + np.take(field, i0 + 1, axis=axis) * t
            out.append(field.reshape(-1))
        return np.stack(out)

    def _sample(self, channels: slice, mm: np.ndarray) -> np.ndarray:
        ref = self.ref
        coords = (mm - ref.origin[:, None]) / ref.spacing
        return np.stack([ndi.map_coordinates(ref.fields[c], coords, order=1, mode="nearest")
                         for c in range(channels.start, channels.stop)])

    def draw(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (X,Y,Z) float32 on the uint16 lattice, semantics (X,Y,Z) uint8, scalars (4,) float32)."""
        ref = self.ref
        rng = np.random.default_rng([0x5EED, int(seed), int(index)])
        n = lambda sd=1.0, size=None: rng.normal(0.0, sd, size)

        # --- who ------------------------------------------------------------------------------
        male = int(rng.integers(0, 2))
        age = rng.uniform(*AGE_RANGE)
        a01 = scale_age(age)
        # --- geometry: the MNI152 head is larger than average (ICV ~1.9 l): scale to ~1.35/1.6 l ---
        scale = (0.94 if male else 0.89) * np.exp(n(0.03)) * np.exp(n(0.015, 3))
        rot = _rotation(np.deg2rad(np.clip(n(3.0, 3), -7, 7)))
        shift = np.clip(n(2.0, 3), -5.0, 5.0)
        deform_mm = 2.5
        # --- ageing, each with individual variation ---------------------------------------------
        contraction = max(0.0, 0.01 + 0.05 * a01 + n(0.01))           # brain shrinks inside the skull
        lv = _VentricleDraw.draw(rng, a01)
        thinning = max(0.0, 0.2 + 1.2 * a01 + n(0.25))                # mm of cortex lost at sulci
        # --- head layers (mm) ---------------------------------------------------------------------
        inner, diploe, outer = 1.6 * np.exp(n(0.15)), 2.6 * np.exp(n(0.25)), 1.4 * np.exp(n(0.15))
        fat, skin = 4.5 * np.exp(n(0.25)), 1.5 * np.exp(n(0.1))
        # --- intensities (T1w) ---------------------------------------------------------------------
        c_csf, c_gm, c_wm = 0.10 + n(0.015), 0.45 + n(0.025), 0.72 + n(0.025)
        c_bone, c_marrow = 0.04 + abs(n(0.01)), 0.55 + n(0.07)
        c_muscle, c_fat, c_skin = 0.33 + n(0.03), 0.85 + n(0.04), 0.50 + n(0.04)
        gamma = float(np.exp(n(0.1)))
        bias_amp = rng.uniform(0.04, 0.18)
        noise_sd = rng.uniform(0.008, 0.03)
        fields = self._smooth_fields(rng, 6)  # deformation x3, layer thickness, bias, cortical thinning
        lv_shape_field = self._smooth_fields(rng, 1, cells=_LV_SHAPE_CELLS)[0]  # ventricle-scale bumps
        noise = rng.standard_normal((2, self.world.shape[1]), dtype=np.float32)

        # --- backward maps: output voxel (subject mm) -> template mm --------------------------------
        # Scaling and rotation are about the field-of-view centre; atrophy contracts about the brain's.
        vox = ref.voxel_mm
        fov_c, centre = FOV_CENTRE_MM[:, None], ref.brain_centre[:, None]
        u = self.world - fov_c - shift[:, None]
        # rot.T @ u written out: a 3x3 product is not worth BLAS threads (which stall under load)
        rotated = np.stack([rot[0, i] * u[0] + rot[1, i] * u[1] + rot[2, i] * u[2] for i in range(3)])
        q_head = fov_c + rotated / scale[:, None] + deform_mm * fields[:3]
        # Distances are in template mm; the head scale turns them into subject mm.
        d_env, d_hull = self._sample(HEAD_CHANNELS, q_head) * float(np.mean(scale))
        # Brain fields matter only inside the skull: sample them there (a fifth of the voxels).
        sel = np.flatnonzero(d_env < vox)
        q_brain = centre + (q_head[:, sel] - centre) * (1.0 + contraction)
        # Moved in small steps along the field (a flow), so that a large dilation does not fold the
        # tissue over itself (one big step leaves hollow ventricles).
        q_tissue = q_brain
        for _ in range(_LV_FLOW_STEPS):
            push_reach = self._sample(FIELD_CHANNELS, q_tissue)
            step_mm = lv.displacement_mm(q_tissue, lv_shape_field[sel], push_reach[:3], push_reach[3])
            q_tissue = q_tissue - step_mm / _LV_FLOW_STEPS
        f_csf, f_gm, f_wm, f_lv, resid, depth = self._sample(BRAIN_CHANNELS, q_tissue)

        # --- tissue fractions and labels -------------------------------------------------------------
        f_out = np.clip(1.0 - (f_csf + f_gm + f_wm + f_lv), 0.0, 1.0)  # gap left by the shrinking brain
        lost = f_gm * np.clip(thinning * np.exp(0.3 * fields[5, sel]) - depth + 0.5, 0.0, 1.0)
        f_gm = f_gm - lost
        f_csf = f_csf + f_out + lost
        labels = np.zeros(self.world.shape[1], dtype=np.uint8)
        tissue_label = np.argmax(np.stack([f_csf, f_gm, f_wm, f_lv]), axis=0).astype(np.uint8) + 1
        labels[sel] = np.where(d_env[sel] < 0, tissue_label, 0)

        # --- image ---------------------------------------------------------------------------------------
        k_res = (c_wm - c_csf) / float(ref.class_means[2] - ref.class_means[0])
        brain_img = c_csf * (f_csf + f_lv) + c_gm * f_gm + c_wm * f_wm + k_res * resid
        thick = np.exp(0.2 * fields[3])
        b1 = inner * thick
        b2 = b1 + diploe * thick
        b3 = b2 + outer * thick
        b4 = b3 + fat * thick
        b5 = b4 + skin
        step = lambda x: _ramp(x, vox)
        beyond_bone = step(d_env - b3)
        img = (c_bone * (step(d_env) - step(d_env - b1))
               + c_marrow * (step(d_env - b1) - step(d_env - b2))
               + c_bone * (step(d_env - b2) - beyond_bone)
               + beyond_bone * (c_muscle * (1.0 - step(d_hull - b3))
                                + c_fat * (step(d_hull - b3) - step(d_hull - b4))
                                + c_skin * (step(d_hull - b4) - step(d_hull - b5))))
        img[sel] += (1.0 - step(d_env[sel])) * brain_img
        img = np.clip(img * np.exp(bias_amp * fields[4]), 0.0, 1.0) ** gamma
        img = np.sqrt((img + noise_sd * noise[0]) ** 2 + (noise_sd * noise[1]) ** 2)  # Rician
        img = np.round(np.clip(img, 0.0, 1.0) * _QUANT).astype(np.float32) / np.float32(_QUANT)

        shape = ref.shape
        labels = labels.reshape(shape)
        ventricles_ml = float(np.count_nonzero(labels == 4)) * self.voxel_ml
        brain_ml = float(np.count_nonzero((labels == 2) | (labels == 3))) * self.voxel_ml
        scalars = np.array([male, a01, scale_volume(ventricles_ml, VENTRICLE_RANGE_ML),
                            scale_volume(brain_ml, BRAIN_RANGE_ML)], dtype=np.float32)
        return img.reshape(shape), labels, scalars
