"""Tasks as one definition each: a new task is one ``register_task`` call, every method of its family
takes it, and it runs through the runner end to end; unknown names and bad definitions are errors that
name the task and the fix. Run kinds are explicit in the run specification."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmark.run.spec import RunKind, RunSpec
from datasets.tasks import (SUPER_RESOLUTION, TASKS, DiceCondition, Modality, Task, TaskError, get_task,
                            register_task, unregister_task)
from methods.registry import get_method, load_plugin, resolve_methods, supported_tasks
from tests.paths import EXAMPLE_PLUGIN
from tests.test_runner import TINY


def coarse_mask(subject, block: int = 4) -> np.ndarray:
    """The LV mask at a coarser grid: a block is in the mask when any of its voxels is (a blocky mask)."""
    mask = subject.lv_mask[0] > 0
    x, y, z = mask.shape
    padded = np.zeros([-(-n // block) * block for n in mask.shape], bool)
    padded[:x, :y, :z] = mask
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block,
                            padded.shape[2] // block, block).any(axis=(1, 3, 5))
    full = blocks.repeat(block, 0).repeat(block, 1).repeat(block, 2)[:x, :y, :z]
    return full[None].astype(np.float32)


LV_COARSE = Task("lv_coarse", {"lv_mask": Modality(1, coarse_mask)},
                 dice=DiceCondition("lv_mask", classes=2, judge_labels="lv_mask"),
                 description="lateral-ventricle mask on a 4-voxel grid")


@pytest.fixture
def lv_coarse():
    register_task(LV_COARSE)
    try:
        yield LV_COARSE
    finally:
        unregister_task("lv_coarse")


# ---- a new task is one definition -----------------------------------------------------------


def test_a_new_task_is_taken_by_every_method_of_its_family(lv_coarse):
    assert get_task("lv_coarse") is lv_coarse and lv_coarse.modalities == {"lv_mask": 1}
    # every method of the generation family that is not narrowed to named tasks (other tests register such plugins)
    family = [m for m in resolve_methods("all", "lv") if get_method(m).tasks is None]
    assert resolve_methods("all", "lv_coarse") == family
    assert "lv_coarse" in supported_tasks("vcm") and "lv_coarse" not in supported_tasks("liif3d")
    assert {m.name for m in lv_coarse.metrics} == {m.name for m in get_task("lv").metrics}
    assert "Dice" in {m.name for m in lv_coarse.metrics} and "PSNR" not in {m.name for m in lv_coarse.metrics}


def test_grid_rows_follow_the_task_definition(lv_coarse):
    from benchmark.profiles import load_profile
    from benchmark.run.grid import build_specs

    profile = load_profile("smoke")
    specs = build_specs(["lv", "lv_coarse", "sr4"], "vcm", [50], [0], profile)
    kinds = {(s.task, s.kind) for s in specs}
    for task in ("lv", "lv_coarse"):  # a Dice condition: the three reference rows
        assert {(task, k) for k in (RunKind.REFERENCE, RunKind.REFERENCE_OTHER, RunKind.BASE_UNCONDITIONED,
                                    RunKind.METHOD)} <= kinds
    assert ("lv", RunKind.SPHERE_VALIDATION) in kinds          # validation rows: lv only
    assert ("lv_coarse", RunKind.SPHERE_VALIDATION) not in kinds
    assert {s.kind for s in specs if s.task == "sr4"} == {RunKind.REFERENCE, RunKind.METHOD}
    sphere = next(s for s in specs if s.kind is RunKind.SPHERE_VALIDATION)
    assert sphere.method == "vcm+sphere" and sphere.name == "lv__vcm_sphere__n50__s0"
    assert sphere.trained() == RunSpec("lv", "vcm", 50, 0)


def test_a_new_task_runs_through_the_runner(lv_coarse, tmp_path, tiny_cache):
    """lv_coarse, defined in this file only, runs the example plugin end to end at the smoke profile."""
    from benchmark.profiles import load_profile
    from benchmark.run.executors import run_grid
    from benchmark.run.grid import build_specs
    from benchmark.run.records import iter_records
    from benchmark.run.spec import RunContext

    load_plugin(str(EXAMPLE_PLUGIN))
    profile = load_profile("smoke", TINY)
    specs = build_specs(["lv_coarse"], "residual_shift", [2], [0], profile)
    ctx = RunContext(profile, tmp_path / "out", tiny_cache, device="cpu", progress=False)
    summary = run_grid(specs, ctx)
    assert summary.ok, summary.line()
    records = {r["method"]: r for r in iter_records(tmp_path / "out")}
    assert set(records) == {"reference", "autoencoder", "reference_other", "brainldm", "residual_shift"}
    run = records["residual_shift"]
    assert run["status"] == "ok" and run["task"] == "lv_coarse" and run["protocol"]["task"] == "lv_coarse"
    assert {"Dice", "LPIPS diversity", "MS-SSIM diversity"} <= set(run["metrics"])
    assert any(k.startswith("FID-3D [") for k in run["metrics"]) and "PSNR" not in run["metrics"]
    assert run["protocol"]["Dice"]["num_classes"] == 2 and run["training"]["steps"] == 3
    assert run["cost"]["trainable_parameters"] > 0 and run["control_probe"]["history"]
    samples = np.load(ctx.run_dir(specs[-1]) / "samples.npz")
    test = ctx.test_subjects()
    assert np.array_equal(samples["condition_lv_mask"], np.stack([coarse_mask(s) for s in test]).astype(np.float16))


# ---- unknown names and bad definitions ----------------------------------------------------------


def test_unknown_task_names_say_which_and_how_to_add_one():
    with pytest.raises(TaskError, match=r"unknown task 'lv_typo'; known tasks: lv, multimodal, sr4, sr8, sr4mm, sr8mm "
                                        r"\(define a new one with datasets.tasks.register_task\)"):
        get_task("lv_typo")
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        resolve_methods("vcm", "nope")


def _lv(**changes) -> Task:
    return dataclasses.replace(LV_COARSE, **{"name": "bad_task", **changes})


BAD = [
    (_lv(inputs={}), "has no condition; give inputs="),
    (_lv(inputs={"lv_mask": Modality(0, coarse_mask)}), "at least one channel"),
    (_lv(dice=DiceCondition("skull", 2, "lv_mask")), "Dice condition 'skull' is not one of its conditions"),
    (_lv(inputs={"lv_mask": Modality(2, coarse_mask)}), "2 channels for 2 classes; give a mask"),
    (_lv(dice=DiceCondition("lv_mask", 2, "semantics")), "judges are cached by class count"),
    (_lv(dice=DiceCondition("lv_mask", 2, "skull")), "no judge learns the labels 'skull'"),
    (_lv(modality_drop=(0.3, 0.3, 0.4)), "modality_drop needs exactly two conditions"),
    (_lv(validation=True, dice=None), "validation rows .* it has none; set validation=False"),
    (_lv(method_families=("generation", SUPER_RESOLUTION)), "no sr_factor; set sr_factor"),
    (_lv(sr_factor=4), "must have paired ground truth; set paired=True"),
    (_lv(method_families=("painting",)), r"unknown method families \['painting'\]"),
    (_lv(name="bad task"), "letters, digits and underscores"),
]


@pytest.mark.parametrize("task, message", BAD, ids=[m.split(";")[0][:40] for _, m in BAD])
def test_bad_task_definitions_name_the_task_and_the_fix(task, message):
    with pytest.raises(TaskError, match=f"task '{task.name}': .*{message}"):
        register_task(task)
    assert task.name not in TASKS


def test_a_task_name_is_registered_once(lv_coarse):
    with pytest.raises(TaskError, match="task 'lv_coarse': a task of that name is already registered; choose"):
        register_task(dataclasses.replace(lv_coarse))
    register_task(lv_coarse)  # the same definition again is harmless


# ---- run kinds --------------------------------------------------------------------------------


def test_run_kinds_are_explicit_and_keep_names_and_hash_inputs():
    from benchmark.run.runner import RUNS

    assert set(RUNS) == set(RunKind)
    assert RunSpec.of("lv", "reference", 0, 0).kind is RunKind.REFERENCE
    assert RunSpec.of("lv", "brainldm", 0, 0).kind is RunKind.BASE_UNCONDITIONED
    assert RunSpec.of("lv", "vcm+sphere", 50, 0) == RunSpec.sphere("lv", "vcm", 50, 0)
    with pytest.raises(ValueError, match="method 'reference' is a reference run, not method"):
        RunSpec("lv", "reference", 0, 0)
    spec = RunSpec.of("lv", "reference_other", 0, 1)
    # the config hash covers exactly what it covered before the kinds: asdict of (task, method, size, seed)
    assert spec.identity() == {"task": "lv", "method": "reference_other", "size": 0, "seed": 1}
    assert spec.name == "lv__reference_other__n0__s1"


def test_sphere_task_replaces_the_dice_mask_only():
    from benchmark.run.sphere_masks import sphere_task

    lv = get_task("lv")
    sphere = sphere_task(lv)
    assert sphere.name == "lv" and sphere.modalities == lv.modalities and sphere.dice == lv.dice
    assert sphere.inputs["lv_mask"].build is not lv.inputs["lv_mask"].build
    with pytest.raises(ValueError, match="task 'sr4' has none"):
        sphere_task(get_task("sr4"))


def test_a_spacing_task_reaches_its_runs_with_the_factor_of_the_data(tmp_path, monkeypatch):
    from benchmark.profiles import load_profile
    from benchmark.run import runner
    from benchmark.run.grid import build_specs
    from benchmark.run.spec import RunContext

    ctx = RunContext(load_profile("cpu"), tmp_path, tmp_path)  # synthetic volumes of 4.025 mm
    assert ctx.data.axial_voxel_mm == pytest.approx(4.025)
    assert ctx.task("sr8mm").sr_factor == 2 and ctx.task("sr8") is TASKS["sr8"]
    seen = []
    monkeypatch.setitem(runner.RUNS, RunKind.METHOD, lambda spec, task, ctx: seen.append(task) or {})
    runner.execute_run(RunSpec("sr8mm", "trilinear", 50, 0), ctx)
    assert seen[0].name == "sr8mm" and seen[0].sr_factor == 2  # what the methods read as their K
    specs = build_specs(["sr8mm"], "trilinear", [50], [0], load_profile("cpu"))
    assert {s.method for s in specs} == {"reference", "trilinear"}
    # smoke's 5.75 mm voxels: 8 mm is no whole factor coarser; the grid stops before any run, saying so
    with pytest.raises(TaskError, match="sr8mm.*not coarser than these 5.75 mm voxels"):
        build_specs(["sr4", "sr8mm"], "trilinear", [2], [0], load_profile("smoke"))


def test_task_all_leaves_out_the_spacings_no_coarser_than_a_voxel_and_says_so(tmp_path):
    from tests.test_runner import main_in_process

    code, log = main_in_process(["run", "--profile", "smoke", "--quiet", "--cache-dir", tmp_path / "c", "--out",
                                 tmp_path / "o", "--task", "all", "--methods", "no_such_method"])
    assert "--task all: sr4mm, sr8mm left out: their slice spacing is not coarser than these 5.75 mm voxels" in log
    assert code == 2 and "no_such_method" in log, log  # the grid then stops on the unknown method, before any run
