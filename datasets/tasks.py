"""Tasks: one definition each, in one registry. A task says which spatial conditions a method
receives, how they are dropped in training, how its results are judged and which methods take it.

* ``lv``: the lateral-ventricle mask (1 channel); a judge recovers it from the generated volume
  (Dice, 2 classes); the Table 6 validation rows (sphere masks) apply.
* ``multimodal``: the semantic map, one-hot over labels 1-4 (4 channels), and the skull image
  (1 channel); in training one of them may be dropped: semantics only 0.3, skull only 0.3, both 0.4.
  A judge recovers the semantic map (Dice, 5 classes).
* ``sr4``, ``sr8``: axial super-resolution; the condition is the volume with only every 4th / 8th
  axial slice kept, brought back to the full grid by linear interpolation along Z. Paired: the
  subject's own image is the target (PSNR, SSIM, fidelity). Super-resolution methods take them too.
  A factor is a spacing only at a voxel size: 4 and 8 mm at the paper's 1 mm, 16 and 32 mm at ``cpu``.
* ``sr4mm``, ``sr8mm``: the same, defined by the slice spacing in mm, the paper's 4 and 8 mm: the
  factor is the whole number of voxels nearest to it (``Task.at_voxel``), so at ``cpu`` (4.03 mm)
  ``sr8mm`` keeps every 2nd slice (8.05 mm) and ``sr4mm`` is no task (it drops no slice).

A new task is one call::

    register_task(Task("lv_coarse", {"lv_mask": Modality(1, coarse_mask)},
                       dice=DiceCondition("lv_mask", classes=2, judge_labels="lv_mask")))

and every method whose family the task takes (``method_families``) supports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np

from metrics.suite import Metric, metric_suite

from .subject import DataError, Subject

GENERATION = "generation"              # methods that generate a volume from the condition (steer the base model)
SUPER_RESOLUTION = "super_resolution"  # methods that restore a degraded volume (paired tasks with a factor)
METHOD_FAMILIES = (GENERATION, SUPER_RESOLUTION)
JUDGE_LABELS = ("lv_mask", "semantics")  # label maps of a Subject a Dice judge can learn on real volumes


class TaskError(DataError):
    """An unknown task name or a task definition the suite cannot use."""


def degrade_axial(image: np.ndarray, factor: int) -> np.ndarray:
    """Keep axial slices 0, k, 2k, ... (the last axis) and interpolate linearly back to the full Z grid.

    Beyond the last kept slice the values are those of the last kept slice (clamped).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise DataError(f"super-resolution factor must be a positive integer, got {factor!r}")
    image = np.asarray(image)
    z = image.shape[-1]
    kept = image[..., ::factor].astype(np.float32)
    pos = np.arange(z) / factor                       # position in units of kept slices
    lo = np.minimum(np.floor(pos).astype(int), kept.shape[-1] - 1)
    hi = np.minimum(lo + 1, kept.shape[-1] - 1)
    w = np.where(hi > lo, pos - lo, 0.0).astype(np.float32)  # clamp beyond the last kept slice
    return (kept[..., lo] * (1.0 - w) + kept[..., hi] * w).astype(np.float32)


def spacing_factor(spacing_mm: float, voxel_mm: float, task: str = "") -> int:
    """K: keeping every K-th axial slice of ``voxel_mm`` voxels comes nearest to ``spacing_mm``."""
    if not np.isfinite(voxel_mm) or voxel_mm <= 0:
        raise DataError(f"task '{task}': the voxel size along Z is {voxel_mm!r} mm; the volumes need an affine in mm")
    factor = int(round(spacing_mm / voxel_mm))
    if factor < 2:
        raise TaskError(f"task '{task}': a {spacing_mm:g} mm slice spacing is not coarser than these {voxel_mm:.3g} mm "
                        f"voxels (the nearest whole factor, {factor}, drops no slice); run it at a profile with finer "
                        "voxels (gpu: 2.3 mm, paper: 1 mm), or take sr4 / sr8 (every 4th / 8th slice) here")
    return factor


def _one_hot_semantics(subject: Subject) -> np.ndarray:
    sem = subject.semantics[0]
    return np.stack([(sem == k) for k in (1, 2, 3, 4)]).astype(np.float32)


@dataclass(frozen=True)
class Modality:
    """One spatial condition: its channel count and how it is made from a subject ((C, X, Y, Z))."""

    channels: int
    build: Callable[[Subject], np.ndarray] = field(repr=False, compare=False)


@dataclass(frozen=True)
class DiceCondition:
    """The condition a Dice judge must recover from a generated volume.

    ``condition``: the task's condition scored (a mask, a label map or one-hot over labels 1..K-1);
    ``classes``: K, background included; ``judge_labels``: the label map of a real subject the judge
    learns to segment (one of ``JUDGE_LABELS``). Judges are cached by their number of classes, so one
    class count goes with one kind of judge labels across tasks.
    """

    condition: str
    classes: int
    judge_labels: str


@dataclass(frozen=True)
class Task:
    name: str
    inputs: Mapping[str, Modality]                        # condition name -> Modality, in order
    modality_drop: tuple[float, float, float] | None = None  # P(first only), P(second only), P(both) in training
    dice: DiceCondition | None = None                     # the condition a judge scores (Dice), or none
    paired: bool = False                                  # the subject's own image is the target (ground truth)
    sr_factor: int | None = None                          # degradation factor of a super-resolution task
    sr_spacing_mm: float | None = None                    # or its slice spacing in mm (factor: at_voxel)
    validation: bool = False                              # Table 6 rows (sphere masks for the Dice condition)
    method_families: tuple[str, ...] = (GENERATION,)      # kinds of method the task takes
    description: str = ""                                 # what the condition is (--help, records)
    title: str = ""                                       # its table's caption, before ": methods by ..."

    @property
    def modalities(self) -> dict[str, int]:
        """Condition name -> channel count, in order (what a method is built with)."""
        return {name: m.channels for name, m in self.inputs.items()}

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metric suite the task reports (``metrics.suite``)."""
        return metric_suite(dice=self.dice is not None, paired=self.paired)

    def takes(self, family: str) -> bool:
        return family in self.method_families

    @property
    def super_resolution(self) -> bool:
        return self.sr_factor is not None or self.sr_spacing_mm is not None

    def at_voxel(self, voxel_mm: float) -> "Task":
        """The task as runs on voxels of ``voxel_mm`` along Z see it: a task defined by its slice spacing
        in mm gets the factor it has there (its methods read ``sr_factor``); any other is itself."""
        if self.sr_spacing_mm is None:
            return self
        return replace(self, sr_factor=spacing_factor(self.sr_spacing_mm, voxel_mm, self.name))

    def exists_at(self, voxel_mm: float) -> bool:
        """Whether the task can run on voxels of ``voxel_mm`` along Z (see ``at_voxel``)."""
        try:
            self.at_voxel(voxel_mm)
        except TaskError:
            return False
        return True

    def conditions(self, subject: Subject) -> dict[str, np.ndarray]:
        """Each condition as (C, X, Y, Z) float32, in the order of ``inputs``."""
        out = {}
        for name, modality in self.inputs.items():
            array = np.ascontiguousarray(modality.build(subject), dtype=np.float32)
            if array.shape != (modality.channels,) + subject.image.shape[1:]:
                raise DataError(f"task '{self.name}': condition '{name}' of subject {subject.id} has shape "
                                f"{array.shape}, expected {(modality.channels,) + subject.image.shape[1:]}")
            out[name] = array
        return out

    def sample_presence(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        """Which modalities each training example keeps: (B,) float32 of 0/1 per modality."""
        names = list(self.inputs)
        if self.modality_drop is None:
            return {name: np.ones(batch, dtype=np.float32) for name in names}
        p_first, p_second, _ = self.modality_drop
        u = rng.random(batch)
        first_only = u < p_first
        second_only = (u >= p_first) & (u < p_first + p_second)
        return {names[0]: (~second_only).astype(np.float32), names[1]: (~first_only).astype(np.float32)}


TASKS: dict[str, Task] = {}
DEFAULT_TASK = "lv"  # the paper's main task: --task of every command when not given


def _bad(task, problem: str, fix: str) -> TaskError:
    return TaskError(f"task '{getattr(task, 'name', task)}': {problem}; {fix}")


def check_task(task: Task) -> Task:
    """Raise a TaskError naming the task and the fix when its definition cannot be used."""
    if not isinstance(task, Task):
        raise TaskError(f"register_task takes a datasets.tasks.Task, got {type(task).__name__}")
    if not task.name or not isinstance(task.name, str) or not task.name.replace("_", "").isalnum():
        raise _bad(task, "the name must be letters, digits and underscores", "rename it (it names run folders)")
    if not task.inputs:
        raise _bad(task, "it has no condition", "give inputs={'name': Modality(channels, build)}")
    for name, modality in task.inputs.items():
        if not isinstance(modality, Modality) or int(modality.channels) < 1 or not callable(modality.build):
            raise _bad(task, f"condition '{name}' is not a Modality with at least one channel and a build function",
                       "give Modality(channels, build) with build(subject) -> (channels, X, Y, Z)")
    drop = task.modality_drop
    if drop is not None:
        if len(task.inputs) != 2:
            raise _bad(task, f"modality_drop needs exactly two conditions, it has {len(task.inputs)}",
                       "drop modality_drop or give two conditions")
        if len(drop) != 3 or abs(sum(drop) - 1.0) > 1e-9 or min(drop) < 0:
            raise _bad(task, f"modality_drop must be three probabilities summing to 1, got {drop}",
                       "give (P(first only), P(second only), P(both))")
    if task.dice is not None:
        d = task.dice
        if d.condition not in task.inputs:
            raise _bad(task, f"the Dice condition '{d.condition}' is not one of its conditions {list(task.inputs)}",
                       "name one of its conditions in DiceCondition(condition=...)")
        if isinstance(d.classes, bool) or not isinstance(d.classes, int) or d.classes < 2:
            raise _bad(task, f"Dice needs at least 2 classes, got {d.classes!r}", "count the background too")
        channels = task.inputs[d.condition].channels
        if channels not in (1, d.classes - 1):
            raise _bad(task, f"its Dice condition has {channels} channels for {d.classes} classes",
                       f"give a mask or label map (1 channel) or one-hot over the labels ({d.classes - 1} channels)")
        if d.judge_labels not in JUDGE_LABELS:
            raise _bad(task, f"no judge learns the labels '{d.judge_labels}'", f"use one of {', '.join(JUDGE_LABELS)}")
        for other in TASKS.values():
            if other.name != task.name and other.dice and other.dice.classes == d.classes \
                    and other.dice.judge_labels != d.judge_labels:
                raise _bad(task, f"its {d.classes}-class judge learns '{d.judge_labels}' but task '{other.name}'s "
                           f"learns '{other.dice.judge_labels}' (judges are cached by class count)",
                           "use the same judge labels for one class count")
    if task.sr_factor is not None:
        if isinstance(task.sr_factor, bool) or not isinstance(task.sr_factor, int) or task.sr_factor < 1:
            raise _bad(task, f"sr_factor must be a positive integer, got {task.sr_factor!r}", "give e.g. 4")
    if task.sr_spacing_mm is not None:
        spacing = task.sr_spacing_mm
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not np.isfinite(spacing) or spacing <= 0:
            raise _bad(task, f"sr_spacing_mm must be a positive number of mm, got {spacing!r}", "give e.g. 8.0")
        if task.sr_factor is not None:
            raise _bad(task, "it has both sr_factor and sr_spacing_mm", "give one: a factor, or a spacing in mm")
    if task.super_resolution and not task.paired:
        raise _bad(task, "a super-resolution task must have paired ground truth", "set paired=True")
    unknown = [f for f in task.method_families if f not in METHOD_FAMILIES]
    if unknown or not task.method_families:
        raise _bad(task, f"unknown method families {unknown or '(none)'}", f"use some of {', '.join(METHOD_FAMILIES)}")
    if task.takes(SUPER_RESOLUTION) and not task.super_resolution:
        raise _bad(task, "it takes super-resolution methods but has no sr_factor",
                   "set sr_factor or sr_spacing_mm (and paired=True)")
    if task.validation and (task.dice is None or task.dice.classes != 2 or task.inputs[task.dice.condition].channels != 1):
        raise _bad(task, "the validation rows replace a 1-channel, 2-class Dice mask with spheres and it has none",
                   "set validation=False or give a mask as its Dice condition")
    return task


def register_task(task: Task, replace: bool = False) -> Task:
    """Add a task to the registry (checked first); ``replace`` allows redefining a name."""
    check_task(task)
    if task.name in TASKS and not replace and TASKS[task.name] is not task:
        raise _bad(task, "a task of that name is already registered", "choose another name (or replace=True)")
    TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    TASKS.pop(name, None)


def get_task(name) -> Task:
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise TaskError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)} "
                        "(define a new one with datasets.tasks.register_task)") from None


register_task(Task("lv", {"lv_mask": Modality(1, lambda s: s.lv_mask.astype(np.float32))},
                   dice=DiceCondition("lv_mask", 2, "lv_mask"), validation=True,
                   description="lateral-ventricle mask", title="Spatial control with lateral-ventricle masks"))
register_task(Task("multimodal", {"semantics": Modality(4, _one_hot_semantics), "skull": Modality(1, lambda s: s.skull)},
                   modality_drop=(0.3, 0.3, 0.4), dice=DiceCondition("semantics", 5, "semantics"),
                   description="semantic map (one-hot, labels 1-4) + skull image",
                   title="Spatial control with a semantic map and a skull image"))
for _k in (4, 8):
    register_task(Task(f"sr{_k}", {"low_res": Modality(1, lambda s, k=_k: degrade_axial(s.image, k))},
                       paired=True, sr_factor=_k, method_families=(GENERATION, SUPER_RESOLUTION),
                       description=f"axial super-resolution x{_k}"))
for _mm in (4, 8):  # the paper's spacings, wherever they are coarser than a voxel
    register_task(Task(f"sr{_mm}mm", {"low_res": Modality(1, lambda s, mm=_mm: degrade_axial(
                           s.image, spacing_factor(mm, s.voxel_mm[2], f"sr{mm}mm")))},
                       paired=True, sr_spacing_mm=float(_mm), method_families=(GENERATION, SUPER_RESOLUTION),
                       description=f"axial super-resolution from {_mm} mm slices"))
