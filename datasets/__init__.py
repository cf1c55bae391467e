"""Data for the benchmark: the embedded synthetic population, NIfTI manifests, splits and tasks."""
from .manifest import export_subjects, load_manifest
from .splits import Splits, make_splits
from .subject import SEMANTIC_LABELS, DataError, Subject
from .synthetic import SyntheticPopulation
from .tasks import TASKS, Task, degrade_axial, get_task

__all__ = ["SEMANTIC_LABELS", "DataError", "Subject", "SyntheticPopulation", "Splits", "make_splits",
           "Task", "TASKS", "get_task", "degrade_axial", "load_manifest", "export_subjects"]
