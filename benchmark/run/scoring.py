"""Glue between a grid and ``metrics/``: which volumes are compared with which, per task.

Every row's Fréchet distances (FID-2D/3D, FRD, precision/recall) compare its volumes with **one real
set that no row was conditioned on**: the validation subjects (:meth:`SharedScoring.fd_real_set`).
The reference row (real test volumes) is then the floor of FD, and a method that returned each test
subject's ground truth would score exactly that floor, not below it. How close a volume is to its
own subject is measured by the paired columns (fidelity, PSNR/SSIM) and by Dice. Feature extractors (pretrained
when their weights are in --weights-dir, else in-domain ones trained on the training pool) and
the LPIPS model are shared by every task of a grid; the Dice judge is trained per task. What is
scored follows the task's definition (``datasets.tasks``): Dice against its Dice condition with the
judge of its class count, fidelity against ground truth when it is paired; ``metrics/`` get those
as plain parameters.
"""
from __future__ import annotations

import json
import math
from functools import cached_property

import numpy as np

from datasets.tasks import TASKS
from metrics.common import DeferredVolumes, sha256_bytes
from metrics.cost import PAPER_PROTOCOL, count_parameters, device_days
from metrics.dice import condition_to_labels
from metrics.extractors import InDomainConfig, get_extractors
from metrics.frd import frd_unavailable, majority_mask
from metrics.judge import JudgeConfig, train_judge
from metrics.lpips_metric import load_lpips
from metrics.protocol import ScoringSettings, score_generated


class SharedScoring:
    """Extractors and LPIPS for one grid (built on first use, cached on disk by the metrics)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.settings = ctx.profile["metrics"]
        self._judges = {}

    def config(self, key: str, cls):
        """metrics.<key> of the profile as a metrics config object (defaults where absent)."""
        values = dict(self.settings.get(key, {}))
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @cached_property
    def reference_count(self) -> int:
        return min(len(self.ctx.data.splits.train_pool), int(self.settings["reference_volumes"]))

    @cached_property
    def train_reference(self):
        """Real training volumes that train the in-domain extractors and the judges (read only when
        one of them must be trained, or for FRD's brain mask)."""
        return self.ctx.data.subjects(self.ctx.data.splits.train_pool[:self.reference_count])

    @cached_property
    def fd_real(self):
        """(subjects, split) of the real set of every Fréchet distance."""
        return self.ctx.data.held_out_subjects(int(self.ctx.profile.sampling.n_test))

    @property
    def fd_real_set(self):
        """The real volumes every row's Fréchet distances are measured against: the validation subjects
        (as many as the test rows have, when there are enough), so that no row was conditioned on them."""
        return self.fd_real[0]

    def deferred_reference(self, stack) -> DeferredVolumes:
        """``stack(train_reference)``, an (n, 1, X, Y, Z) array read only if a network must be trained."""
        shape = (self.reference_count, 1, *self.ctx.profile.image_shape)
        return DeferredVolumes(shape, lambda: stack(self.train_reference))

    @cached_property
    def shipped_dirs(self) -> list:
        """Folders of judges and extractors shipped with the suite (none with ``base_weights: pretrain``)."""
        from benchmark.base import shipped
        from benchmark.base.keys import base_source

        return [] if base_source(self.ctx.profile) == "pretrain" else shipped.metric_dirs()

    @cached_property
    def data_id(self) -> str:
        """What the judges and in-domain extractors were trained on (their cache and shipped-file key): the
        data source with its generator version, the grid, and which subjects (a digest of their indices, so
        other split sizes or seeds that pick other subjects never find a judge trained on the old ones)."""
        indices = [int(i) for i in self.ctx.data.splits.train_pool[:self.reference_count]]
        digest = sha256_bytes(json.dumps(indices).encode(), 16)
        return f"{self.ctx.data.identity}|{tuple(self.ctx.profile.image_shape)}|n={self.reference_count}|subjects={digest}"

    def judge(self, dice):
        """The Dice judge that learns ``dice.judge_labels`` (``dice.classes`` classes) on the real training
        volumes; one per grid, cached on disk by class count (metrics.judge)."""
        key = (dice.judge_labels, dice.classes)
        if key not in self._judges:
            images = self.deferred_reference(lambda subjects: np.stack([s.image for s in subjects]))
            labels = self.deferred_reference(lambda subjects: condition_to_labels(
                np.stack([getattr(s, dice.judge_labels) for s in subjects]), dice.classes))
            self._judges[key] = train_judge(
                images, labels, dice.classes, self.ctx.cache_dir / "judges", data_id=self.data_id,
                config=self.config("judge", JudgeConfig), device=self.ctx.device, progress=self.ctx.progress,
                shipped_dirs=self.shipped_dirs)
        return self._judges[key]

    @cached_property
    def extractors(self):
        images = self.deferred_reference(lambda subjects: np.stack([s.image for s in subjects]))
        return get_extractors(weights_dir=self.ctx.weights_dir, cache_dir=self.ctx.cache_dir / "extractors",
                              train_volumes=images, data_id=self.data_id, device=self.ctx.device,
                              config=self.config("in_domain", InDomainConfig), shipped_dirs=self.shipped_dirs)

    @cached_property
    def brain_mask(self):
        """FRD's mask: voxels where at least half the real training volumes have brain tissue (label > 0);
        None when FRD cannot be computed here (its protocol then gives frd_unavailable's reason) or the
        profile turns it off (``metrics.frd: false``)."""
        if frd_unavailable() is not None or not self.settings["frd"]:
            return None
        return majority_mask(np.stack([s.semantics for s in self.train_reference]))

    @cached_property
    def scoring_settings(self) -> ScoringSettings:
        """The profile's ``metrics.frd``; the other settings (slices, pairs, seeds, k, bootstrap) have no
        profile key and are ``metrics.protocol``'s named constants, with which every record was made."""
        return ScoringSettings(frd=bool(self.settings["frd"]))

    @cached_property
    def lpips(self):
        return load_lpips(weights_dir=self.ctx.weights_dir, device=self.ctx.device)


class Scorer:
    def __init__(self, ctx, task):
        self.ctx = ctx
        self.task = task
        self.shared = ctx.shared_scoring

    @property
    def judge(self):
        """The task's Dice judge (None when the task has no Dice condition)."""
        return None if self.task.dice is None else self.shared.judge(self.task.dice)

    def anatomy(self, subjects) -> tuple:
        """For a paired task: each label map a Dice judge of the suite learns (one per ``judge_labels`` of
        the registered tasks), with its judge and ``subjects``' own true labels (anatomy Dice)."""
        if not self.task.paired:
            return ()
        conditions = {t.dice.judge_labels: t.dice for t in TASKS.values() if t.dice is not None}
        return tuple((name, self.shared.judge(dice), np.stack([getattr(s, name) for s in subjects]))
                     for name, dice in sorted(conditions.items()))

    def score(self, volumes: np.ndarray, subjects, conditions_task, paired: bool = True) -> tuple[dict, dict, dict]:
        """Metrics of ``volumes`` made for ``subjects`` from ``conditions_task``'s conditions: (columns,
        protocol, per-volume values with the subjects' ids). ``paired=False`` (the reference row: the
        volumes are the subjects' own) leaves out the fidelity columns against ground truth."""
        real = np.stack([s.image for s in self.shared.fd_real_set])
        needs = {m.needs for m in self.task.metrics}
        conditions, classes = None, None
        if "judge" in needs:
            conditions = np.stack([conditions_task.conditions(s)[self.task.dice.condition] for s in subjects])
            classes = self.task.dice.classes
        paired = "ground truth" in needs and paired
        ground_truth = np.stack([s.image for s in subjects]) if paired else None
        row = score_generated(volumes, real, conditions=conditions, ground_truth=ground_truth,
                              extractors=self.shared.extractors, judge=self.judge, task=self.task.name,
                              lpips=self.shared.lpips, dice_classes=classes, brain_mask=self.shared.brain_mask,
                              settings=self.shared.scoring_settings, cache_dir=self.ctx.cache_dir / "metrics",
                              voxel_ml=subjects[0].voxel_volume_ml if conditions is not None else None,
                              anatomy=self.anatomy(subjects))
        protocol = row.pop("protocol")
        protocol["voxel_mm"] = [round(v, 4) for v in subjects[0].voxel_mm]
        protocol["fd_real_set"] = {"split": self.shared.fd_real[1], "n": len(self.shared.fd_real_set),
                                   "why": "one real set no row was conditioned on, the same for every row"}
        per_volume = {"ids": [s.id for s in subjects], **row.pop("per_volume")}
        return row, protocol, per_volume

    def dice(self, volumes: np.ndarray, condition_subjects) -> tuple[dict, dict, list[float]]:
        """Only the judge's Dice of ``volumes`` against the conditions of ``condition_subjects`` (the row of
        real volumes scored against another subject's condition; the swapped-condition samples):
        (columns, protocol, Dice per volume)."""
        dice = self.task.dice
        labels = condition_to_labels(np.stack([self.task.conditions(s)[dice.condition] for s in condition_subjects]),
                                     dice.classes)
        result = self.judge.dice(volumes, labels)
        return ({"Dice": result["Dice"]}, {"Dice": {**result["protocol"], "per_class": result["Dice per class"]}},
                result["Dice per volume"])

    def cost(self, method, train, size: int) -> dict:
        params = count_parameters(method)
        base_params = sum(self.ctx.base.num_parameters().values())
        cost = {
            "trainable_parameters": params["trainable"],
            "method_parameters": params["total"],
            "base_parameters": base_params,
            "seconds_per_step": train.seconds_per_step,
            "train_wall_seconds": train.wall_seconds,
            "batch_size": int(self.ctx.profile.training.batch_size),
            **{k: v for k, v in train.peak_memory.items() if k != "peak_memory_gib"},
        }
        sps = train.seconds_per_step
        ranks = train.extra.get("distributed", {}).get("world_size", 1)
        if sps is not None and math.isfinite(sps):
            # a data-parallel step holds every rank's device for its seconds
            projection = device_days(sps * ranks, **PAPER_PROTOCOL, device=self.ctx.device,
                                     measured_batch_size=cost["batch_size"])
            cost["device_days_paper_protocol"] = projection["device_days"]
            cost["device_days_rule"] = projection["rule"] + (f"; {projection['scaling']}" if projection["scaling"] else "")
            if ranks > 1:
                cost["device_days_rule"] += f"; seconds per step x {ranks} devices (data parallel)"
        return cost
