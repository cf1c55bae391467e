"""The ``sample`` command: unconditional samples of the base model at given scalars: NIfTI volumes and a slice montage.

    python run_benchmark.py sample --profile smoke --n 8 --out DIR [--cache-dir DIR]
        [--scalars 0.5,0.5,0.5,0.5] [--seed 0] [--override key=value ...]

Pretrains the profile's base model first if the cache holds none (or loads BrainLDM for the
``paper`` profile with ``--weights-dir``), then runs DDIM (``sampling.ddim_steps``) from seeded
noise and writes ``sample_000.nii.gz`` ... with the population's affine, and ``montage.png``
(axial, coronal and sagittal mid-slices, one row per sample).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmark.base.unconditional_samples import parse_scalars, population_affine, sample_volumes, save_montage
from benchmark.cli import device_from, load_profile_from
from datasets.subject import SCALAR_NAMES, DataError


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sample", parents=[common], help="unconditional samples of the base model at given scalars",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="number of samples")
    p.add_argument("--out", required=True, help="folder for the NIfTI files and montage.png")
    p.add_argument("--scalars", default="0.5,0.5,0.5,0.5", help=f"{', '.join(SCALAR_NAMES)}, each in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the profile's sampling.ddim_steps)")
    p.set_defaults(func=run)


def run(args) -> int:
    import nibabel as nib

    from benchmark.base.cache import load_base_model

    try:
        scalars = parse_scalars(args.scalars)
    except ValueError as err:
        raise DataError(str(err)) from None
    if args.n < 1:
        raise DataError(f"--n must be at least 1, got {args.n}")
    profile = load_profile_from(args)
    device = device_from(args)
    torch.manual_seed(args.seed)
    base = load_base_model(profile, args.cache_dir, args.weights_dir, device=device, progress=not args.quiet)
    steps = args.steps or int(profile.sampling.ddim_steps)
    volumes = sample_volumes(base, scalars, args.n, steps, seed=args.seed,
                             batch_size=int(profile.sampling.batch_size), device=device, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    affine = population_affine(profile, args.cache_dir)
    for i, vol in enumerate(volumes):
        nib.save(nib.Nifti1Image(vol[0].astype(np.float32), affine), out / f"sample_{i:03d}.nii.gz")
    label = ", ".join(f"{n} {v:g}" for n, v in zip(SCALAR_NAMES, scalars))
    montage = save_montage(volumes, out / "montage.png", [f"seed {args.seed} #{i}" for i in range(args.n)])
    print(f"{args.n} samples at ({label}), {steps} DDIM steps: {out}/sample_*.nii.gz and {montage}")
    return 0

