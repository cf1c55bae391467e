"""Which runs a command asks for."""
from __future__ import annotations

from benchmark.run.spec import AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER, RunKind, RunSpec
from benchmark.run.data_source import axial_voxel_mm
from datasets.tasks import get_task
from methods.registry import resolve_methods

VALIDATION_SIZE = 50       # paper Table 6 uses the methods trained on 50 samples
VALIDATION_METHOD = "vcm"  # ... and VCM sampled with sphere masks


class GridError(ValueError):
    """A grid that cannot be run (e.g. a size larger than the training pool)."""


def build_specs(tasks, methods: str, sizes, seeds, profile, validation: bool = True, manifest=None) -> list[RunSpec]:
    """The runs of a grid; a task that does not exist at this data's voxel size (a slice spacing no
    coarser than a voxel) stops it here, before any run."""
    voxel_mm = axial_voxel_mm(profile, manifest)
    pool = profile.data.train_pool
    too_big = [s for s in sizes if s > pool]
    if too_big:
        raise GridError(f"training-set size {too_big[0]} is larger than the training pool of {pool} "
                        f"subjects in profile '{profile.name}'; choose sizes up to {pool}")
    if 0 in sizes:
        raise GridError("a training-set size of 0 leaves nothing to train on; choose sizes of at least 1")
    specs: list[RunSpec] = []
    for name in tasks:
        task = get_task(name).at_voxel(voxel_mm)
        names = resolve_methods(methods, task)
        for seed in seeds:
            specs.append(RunSpec(task.name, REFERENCE, 0, seed, RunKind.REFERENCE))
            if task.dice is not None:  # ceilings (real, autoencoder), a generator ignoring its condition, the floor
                specs.append(RunSpec(task.name, AUTOENCODER, 0, seed, RunKind.AUTOENCODER))
                specs.append(RunSpec(task.name, REFERENCE_OTHER, 0, seed, RunKind.REFERENCE_OTHER))
                specs.append(RunSpec(task.name, BASE_UNCONDITIONED, 0, seed, RunKind.BASE_UNCONDITIONED))
            specs += [RunSpec(task.name, m, size, seed, RunKind.METHOD) for size in sizes for m in names]
            if validation and task.validation and VALIDATION_SIZE in sizes and VALIDATION_METHOD in names:
                specs.append(RunSpec.sphere(task.name, VALIDATION_METHOD, VALIDATION_SIZE, seed))
    return specs
