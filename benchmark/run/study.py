"""A study: one profile and a list of grids, run in order into one results folder that is committed.

A study file (``studies/cpu.yaml``) names the profile (and any overrides), the folder the records,
tables, figures and REPORT.md go to, and the grids, in the order they should run::

    profile: cpu
    out: studies/cpu
    grid:
      - {task: lv, methods: all, sizes: [10, 50, 500], seeds: [0, 1, 2]}
      - {task: sr4, methods: [vcm, liif3d, inversesr, trilinear], sizes: [50], seeds: [0, 1, 2]}
    bench: {task: lv, size: 50, steps: 8}

``python run_benchmark.py study studies/cpu.yaml`` runs what is missing (a run whose record exists
with the same config hash is not run again; an interrupted one resumes from its checkpoint), then
rebuilds the tables, figures and report from the records alone.

``bench`` (optional): once the grids are done, one ``bench`` run times every method's training step in
one process into ``<out>/bench/``. A study's runs may come from sessions on machines of different speed
(shared CPUs differ 3-10x), so the records' seconds per step are not comparable across methods; the
bench's are (Table 5's "s/step (one bench run)" and finding (f)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmark.run.grid import GridError, build_specs
from benchmark.run.spec import RunSpec

STUDY_KEYS = {"profile", "out", "overrides", "grid", "table6", "about", "bench"}
BLOCK_KEYS = {"task", "methods", "sizes", "seeds"}
BENCH_KEYS = {"task", "size", "steps"}


@dataclass(frozen=True)
class GridBlock:
    task: str
    methods: str  # "all" or a comma-separated list, as ``--methods`` takes
    sizes: tuple[int, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class StudyBench:
    task: str
    size: int
    steps: int


@dataclass(frozen=True)
class Study:
    path: Path
    profile: str
    out: Path
    blocks: tuple[GridBlock, ...]
    overrides: tuple[str, ...] = ()
    table6: bool = False  # the sphere-validation runs (Table 6) where a block has VCM at their size
    about: str = ""
    bench: StudyBench | None = None  # one bench run of every method's training step, after the grids
    extra: dict = field(default_factory=dict)

    def bench_file(self) -> Path | None:
        """Where ``bench`` writes this study's timings (its own naming: methods-<profile>-<task>-<size>.json)."""
        if self.bench is None:
            return None
        return self.out / "bench" / f"methods-{self.profile}-{self.bench.task}-{self.bench.size}.json"


def _int_tuple(value, what: str, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise GridError(f"{where}: '{what}' must be a list of non-negative whole numbers, got {value!r}")
    return tuple(values)


def load_study(path: str | Path) -> Study:
    """The study in ``path``; every mistake stops here with a sentence that names it."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"study file {path} does not exist; give the path of a study YAML such as studies/cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"study file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise GridError(f"study file {path} must be a mapping with profile, out and grid")
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise GridError(f"study file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    missing = [k for k in ("profile", "out", "grid") if k not in data]
    if missing:
        raise GridError(f"study file {path} lacks {', '.join(missing)}")
    if not isinstance(data["grid"], list) or not data["grid"]:
        raise GridError(f"study file {path}: 'grid' must be a non-empty list of {{task, methods, sizes, seeds}}")
    blocks = []
    for i, block in enumerate(data["grid"]):
        where = f"study file {path}, grid entry {i + 1}"
        if not isinstance(block, dict) or set(block) != BLOCK_KEYS:
            raise GridError(f"{where} must have exactly the keys {', '.join(sorted(BLOCK_KEYS))}, got {block!r}")
        methods = block["methods"]
        methods = ",".join(methods) if isinstance(methods, list) else str(methods)
        blocks.append(GridBlock(str(block["task"]), methods, _int_tuple(block["sizes"], "sizes", where),
                                _int_tuple(block["seeds"], "seeds", where)))
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise GridError(f"study file {path}: 'overrides' must be a list of key=value strings")
    out = Path(data["out"])
    return Study(path, str(data["profile"]), out, tuple(blocks), tuple(str(o) for o in overrides),
                 bool(data.get("table6", False)), str(data.get("about", "")).strip(), _bench(data.get("bench"), path))


def _bench(value, path: Path) -> StudyBench | None:
    if value is None:
        return None
    where = f"study file {path}, bench"
    if not isinstance(value, dict) or set(value) != BENCH_KEYS:
        raise GridError(f"{where} must have exactly the keys {', '.join(sorted(BENCH_KEYS))}, got {value!r}")
    size, steps = (_int_tuple(value[k], k, where) for k in ("size", "steps"))
    if len(size) != 1 or len(steps) != 1 or steps[0] < 1 or size[0] < 1:
        raise GridError(f"{where}: size and steps must each be one whole number of at least 1, got {value!r}")
    return StudyBench(str(value["task"]), size[0], steps[0])


def untuned(block: GridBlock, profile) -> list[str]:
    """The methods of ``block`` that a tuned recipe should name but does not: a judged task's methods
    trained by the suite's loop, when the profile uses tuned recipes (``training.recipe: tuned``)."""
    from benchmark.engine.recipes import load_recipe
    from datasets.tasks import get_task
    from methods.base import Method
    from methods.registry import get_method, resolve_methods

    task = get_task(block.task)
    if task.dice is None or profile.training.get("recipe", "profile") != "tuned":
        return []  # tune selects by Control Δ: only the judged tasks have recipes
    recipe = load_recipe(profile, task.name)
    named = set((recipe.data.get("methods") or {}) if recipe is not None else ())
    return [m for m in resolve_methods(block.methods, task.name)
            if issubclass(get_method(m), Method) and m not in named]


def ready_blocks(study: Study, profile) -> tuple[list[GridBlock], list[str]]:
    """The grids that can run now, in order, up to the first whose methods a tuned recipe does not yet
    name (a study never ranks methods at settings chosen before tuning), and why the rest wait."""
    for i, block in enumerate(study.blocks):
        missing = untuned(block, profile)
        if missing:
            waiting = [f"{b.task} ({', '.join(untuned(b, profile)) or 'after the grid above'})" for b in study.blocks[i:]]
            return list(study.blocks[:i]), [
                f"waiting for a tuned recipe: {'; '.join(waiting)}. Run `python run_benchmark.py tune --profile "
                f"{profile.name} --task {block.task} --methods {','.join(missing)}` first"]
    return list(study.blocks), []


def study_specs(study: Study, profile, blocks: list[GridBlock] | None = None) -> list[RunSpec]:
    """Every run of ``blocks`` (default: all the study's grids), in order, each once (a reference row
    shared by two grids of one task is listed once)."""
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for block in study.blocks if blocks is None else blocks:
        for spec in build_specs([block.task], block.methods, list(block.sizes), list(block.seeds), profile,
                                validation=study.table6):
            if spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
    return specs
