"""FreeSurfer label maps (``aseg``) to the suite's LV mask and semantic map.

An ``aseg`` file is a label map in FreeSurfer colour-table values (FreeSurferColorLUT.txt), as written by
FreeSurfer (``aseg.mgz``, ``aparc+aseg.mgz``), FastSurfer (``aparc.DKTatlas+aseg.deep.mgz``) and SynthSeg
(with or without ``--parc``). From it:

* the **LV mask** is the left and right lateral ventricles (4, 43) and inferior lateral ventricles
  (the temporal horns, 5, 44): :data:`LV_LABELS`;
* the **semantic map** (docs/CONVENTIONS.md: 0 background, 1 CSF outside the lateral ventricles,
  2 grey matter, 3 white matter, 4 lateral ventricles) follows :data:`FREESURFER_TO_SEMANTIC`, so that
  label 4 of the semantic map is exactly the LV mask.

A label that is not in the table stops the load with an error that names it; extend the table (with a
comment) rather than dropping it silently.
"""
from __future__ import annotations

import numpy as np

from .subject import DataError

BACKGROUND, CSF, GREY, WHITE, VENTRICLES = 0, 1, 2, 3, 4

LV_LABELS = (4, 43, 5, 44)  # Left/Right-Lateral-Ventricle, Left/Right-Inf-Lat-Vent


def _table() -> dict[int, int]:
    table: dict[int, int] = {0: BACKGROUND}  # Unknown: outside the brain
    groups = (
        # lateral ventricles with their temporal horns: the LV mask
        (VENTRICLES, LV_LABELS),
        # cerebral cortex, and its parcels in aparc+aseg / FastSurfer DKT / SynthSeg --parc (1000s, 2000s)
        (GREY, (3, 42) + tuple(range(1000, 1036)) + tuple(range(2000, 2036))),
        # cerebral white matter, its wmparc parcels and unsegmented WM (5001, 5002)
        (WHITE, (2, 41) + tuple(range(3000, 3036)) + tuple(range(4000, 4036)) + (5001, 5002)),
        # cerebellum: cortex (and the old 'exterior' label) is grey, its white matter white
        (GREY, (8, 47, 6, 45)),
        (WHITE, (7, 46)),
        # subcortical grey: thalamus (old and new codes), caudate, putamen, pallidum, hippocampus,
        # amygdala, accumbens, ventral DC
        (GREY, (9, 10, 48, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60)),
        # brainstem, optic chiasm and corpus callosum segments: fibre tracts, white matter
        (WHITE, (16, 85, 251, 252, 253, 254, 255)),
        # CSF outside the lateral ventricles: 3rd, 4th and 5th ventricle, extracerebral CSF
        (CSF, (14, 15, 72, 24)),
        # choroid plexus lies inside the ventricles but is tissue, not the LV mask: CSF class, so that
        # semantic label 4 stays exactly the LV mask
        (CSF, (31, 63)),
        # 'vessel' (FreeSurfer's unidentified basal-ganglia voxels): grey matter around it
        (GREY, (30, 62)),
        # white-matter hypointensities (77 and the old per-side 78, 79) are white matter; non-WM
        # hypointensities (80, 81, 82) lie in grey nuclei
        (WHITE, (77, 78, 79)),
        (GREY, (80, 81, 82)),
    )
    for target, labels in groups:
        for label in labels:
            table[label] = target
    return table


FREESURFER_TO_SEMANTIC: dict[int, int] = _table()


def check_labels(sid: str, path, data: np.ndarray) -> np.ndarray:
    """``data`` as integer FreeSurfer labels; any value outside the table is an error naming it."""
    if not np.all(np.isfinite(data)):
        raise DataError(f"subject '{sid}': the aseg file {path} contains NaN or infinite values; "
                        "give the label map exactly as FreeSurfer, FastSurfer or SynthSeg wrote it")
    labels = np.rint(data).astype(np.int64)
    if not np.allclose(labels, data, atol=1e-3):
        raise DataError(f"subject '{sid}': the aseg file {path} has non-integer values; it must be a label "
                        "map (resample label maps by nearest neighbour, never linearly)")
    unknown = [int(v) for v in np.unique(labels) if int(v) not in FREESURFER_TO_SEMANTIC]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:12]) + (" ..." if len(unknown) > 12 else "")
        raise DataError(f"subject '{sid}': the aseg file {path} has labels {shown} that are not in the suite's "
                        "FreeSurfer table (datasets/freesurfer.py); give a FreeSurfer/FastSurfer/SynthSeg "
                        "aseg or add those labels to FREESURFER_TO_SEMANTIC")
    return labels


def to_semantics(labels: np.ndarray) -> np.ndarray:
    """Semantic map (uint8, SEMANTIC_LABELS) of checked FreeSurfer labels."""
    keys = np.array(sorted(FREESURFER_TO_SEMANTIC))
    values = np.array([FREESURFER_TO_SEMANTIC[k] for k in keys], dtype=np.uint8)
    return values[np.searchsorted(keys, labels)]


def to_lv_mask(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, LV_LABELS).astype(np.uint8)


# The synthetic population's classes back to one FreeSurfer label each (for tests and examples:
# a label map the suite would read as the same LV mask and semantic map).
SEMANTIC_TO_FREESURFER = {BACKGROUND: 0, CSF: 24, GREY: 3, WHITE: 2, VENTRICLES: 4}
