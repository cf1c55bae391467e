"""Look at and export the data of a profile.

    python run_benchmark.py data summary --profile smoke [--cache-dir DIR] [--out DIR] [--n 600]
    python run_benchmark.py data export --profile smoke --out DIR [--n 8] [--split test]

``summary`` generates (or reads from the cache) the synthetic population of the profile's splits, or
its first ``--n`` subjects, prints a one-line summary, and writes ``summary.csv`` (per-subject scalars,
also in years and millilitres) and ``population.png`` (axial, coronal and sagittal mid-slices of four
subjects with the lateral-ventricle mask outlined). ``export`` writes NIfTI files and a manifest that
``run_benchmark.py --data DIR/manifest.csv`` runs on (and ITK-SNAP / 3D Slicer can read).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmark.cli import load_profile_from, writable_folder
from core.files import atomic_png
from datasets.manifest import export_subjects
from datasets.splits import make_splits
from datasets.subject import SCALAR_NAMES, DataError, Subject
from datasets.synthetic import AGE_RANGE, SyntheticPopulation, unscale

SPLIT_NAMES = {"test": "test", "train": "train_pool", "pretrain": "pretrain"}


def _check_n(args) -> None:
    if args.n is not None and args.n < 1:
        raise DataError(f"--n must be at least 1, got {args.n}")


def _population(args):
    profile = load_profile_from(args)
    d = profile.data
    splits = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed, d.validation_set)
    pop = SyntheticPopulation(tuple(profile.image_shape), seed=d.seed, cache_dir=args.cache_dir,
                             progress=not args.quiet)
    return profile, splits, pop


def write_montage(subjects: Sequence[Subject], path: Path, title: str = "") -> Path:
    """Axial, coronal and sagittal mid-slices of each subject, LV mask outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(subjects)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for r, s in enumerate(subjects):
        img, lv = s.image[0], s.lv_mask[0]
        # Cut through the ventricles' centre where there are any, else through the middle.
        centre = (np.argwhere(lv).mean(axis=0).round().astype(int) if lv.any()
                  else np.array(img.shape) // 2)
        cuts = (("axial", img[:, :, centre[2]], lv[:, :, centre[2]]),
                ("coronal", img[:, centre[1], :], lv[:, centre[1], :]),
                ("sagittal", img[centre[0], :, :], lv[centre[0], :, :]))
        age = unscale(float(s.scalars[1]), AGE_RANGE)
        sex = "M" if s.scalars[0] >= 0.5 else "F"
        for c, (name, plane, mask) in enumerate(cuts):
            ax = axes[r, c]
            # Arrays are (X, Y, Z) in RAS: transpose so that the second axis runs up the page.
            ax.imshow(plane.T, origin="lower", cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if mask.any():
                ax.contour(mask.T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{s.id} {sex} {age:.0f}y — {name}", fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_png(path, fig)
    plt.close(fig)
    return path


def pairwise_lv_dice(subjects: Sequence[Subject]) -> tuple[float, float, int]:
    """Mean and sd of the Dice between the LV masks of every pair of different subjects, and the pair
    count: how much one subject's mask says about another's (low: the mask carries information)."""
    masks = [s.lv_mask[0].astype(bool) for s in subjects]
    dice = [2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
            for i, a in enumerate(masks) for b in masks[i + 1:]]
    if not dice:
        return float("nan"), float("nan"), 0
    return float(np.mean(dice)), float(np.std(dice)), len(dice)


def cmd_summary(args) -> int:
    _check_n(args)
    import pandas as pd

    profile, splits, pop = _population(args)
    out = writable_folder(args.out or Path("results") / profile.name / "data", "--out")
    if args.n is not None:
        indices = list(range(args.n))
    else:
        indices = sorted(splits.test + splits.train_pool + splits.pretrain)
    start = time.perf_counter()
    subjects = pop.subjects(indices)
    seconds = time.perf_counter() - start
    rows = []
    split_of = {i: name for name in ("test", "train_pool", "pretrain") for i in getattr(splits, name)}
    for i, s in zip(indices, subjects):
        row = {"index": i, "id": s.id, "split": split_of.get(i, "-")}
        row.update({name: float(v) for name, v in zip(SCALAR_NAMES, s.scalars)})
        row["age_years"] = round(unscale(float(s.scalars[1]), AGE_RANGE), 2)
        row["ventricles_ml"] = round(float(s.lv_mask.sum()) * s.voxel_volume_ml, 2)
        row["brain_ml"] = round(float(np.isin(s.semantics, (2, 3)).sum()) * s.voxel_volume_ml, 2)
        rows.append(row)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    shown = [subjects[k] for k in np.linspace(0, len(subjects) - 1, min(4, len(subjects))).round().astype(int)]
    png = write_montage(shown, out / "population.png",
                        f"synthetic population, profile {profile.name}, shape {tuple(profile.image_shape)}")
    r_lv = np.corrcoef(table["age"], table["ventricular_volume"])[0, 1] if len(table) > 2 else float("nan")
    r_bv = np.corrcoef(table["age"], table["brain_volume"])[0, 1] if len(table) > 2 else float("nan")
    test_ids = set(splits.test)  # the whole test split, or what of it was asked for
    paired = [s for i, s in zip(indices, subjects) if i in test_ids] or subjects
    dice_mean, dice_sd, pairs = pairwise_lv_dice(paired)
    print(f"{len(subjects)} subjects at {tuple(profile.image_shape)} in {seconds:.1f} s "
          f"(cache {pop.block_dir}); age {table.age_years.min():.0f}-{table.age_years.max():.0f} y, "
          f"{100 * table.sex.mean():.0f}% male, ventricles {table.ventricles_ml.median():.1f} ml median "
          f"(r with age {r_lv:+.2f}; LV masks of different subjects overlap with Dice {dice_mean:.3f} "
          f"+- {dice_sd:.3f} over {pairs} pairs of {len(paired)}), brain {table.brain_ml.median():.0f} ml median (r with age {r_bv:+.2f}); "
          f"wrote {out / 'summary.csv'} and {png}")
    return 0


def cmd_export(args) -> int:
    _check_n(args)
    writable_folder(args.out, "--out")
    profile, splits, pop = _population(args)
    pool = splits.test if args.split == "test" else tuple(sorted(getattr(splits, SPLIT_NAMES[args.split])))
    if not pool:
        raise DataError(f"split '{args.split}' of profile '{profile.name}' is empty; choose another split")
    indices = list(pool[: args.n])
    start = time.perf_counter()
    manifest = export_subjects(pop.subjects(indices), args.out)
    print(f"exported {len(indices)} {args.split} subjects of profile {profile.name} "
          f"({tuple(profile.image_shape)}) to {args.out} in {time.perf_counter() - start:.1f} s; "
          f"manifest {manifest}")
    return 0


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("data", help="summary | export of the profile's synthetic population",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="data_command", required=True, metavar="summary|export")
    s = inner.add_parser("summary", parents=[common], help="generate the population, write summary.csv and a PNG")
    s.add_argument("--out", default=None, help="output folder (default results/<profile>/data)")
    s.add_argument("--n", type=int, default=None, help="only the first N subject indices (default: all splits)")
    s.set_defaults(func=cmd_summary)
    e = inner.add_parser("export", parents=[common], help="write subjects as NIfTI plus manifest.csv",
                         description="Write subjects of the profile's synthetic population as NIfTI files plus "
                                     "manifest.csv, which `run_benchmark.py --data OUT/manifest.csv` runs on.")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--n", type=int, default=8, help="number of subjects (default 8)")
    e.add_argument("--split", choices=sorted(SPLIT_NAMES), default="test", help="which split (default test)")
    e.set_defaults(func=cmd_export)
