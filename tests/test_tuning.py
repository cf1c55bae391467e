"""The validation split, the tuning protocol (``tune``) and recipes: every choice made on validation
subjects, the same budget for every method, the recipe a run used recorded by its sha256."""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from benchmark.engine.recipes import RecipeError, load_recipe
from benchmark.engine.training import TrainSettings, budget_steps
from benchmark.profiles import load_profile
from benchmark.run import tune as tune_module
from benchmark.run.data_source import DataSource, manifest_splits
from benchmark.run.spec import RunContext, RunSpec
from datasets.splits import VALIDATION_START, make_splits
from datasets.subject import DataError
from datasets.tasks import get_task


# ---- the validation split ----------------------------------------------------------------------


def test_synthetic_validation_is_disjoint_and_leaves_every_other_split_where_it_was():
    before = make_splits(400, 500, 104, seed=0)
    after = make_splits(400, 500, 104, seed=0, validation_set=32)
    # the shipped base models, judges and extractors were made from these: not one subject moved
    assert (after.test, after.train_pool, after.pretrain) == (before.test, before.train_pool, before.pretrain)
    assert after.validation == tuple(range(VALIDATION_START, VALIDATION_START + 32))
    others = set(after.test) | set(after.train_pool) | set(after.pretrain)
    assert not set(after.validation) & others
    assert after.split_of(VALIDATION_START + 3) == "validation"
    # today's indices, written out: test first, then the pool, then the pretraining pool
    assert after.test == tuple(range(104)) and sorted(after.train_pool) == list(range(104, 604))
    assert after.pretrain == tuple(range(604, 1004))


def test_every_profile_has_validation_subjects_for_its_probe_and_tuning():
    for name in ("smoke", "cpu", "gpu", "paper"):
        p = load_profile(name)
        assert p.data.validation_set >= max(p.probe.subjects, p.tuning.validation_subjects), name


def _manifest(tmp_path, rows, header=("id", "split")):
    path = tmp_path / "manifest.csv"
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


def _fake_subjects(n):
    return [SimpleNamespace(id=f"s{i:03d}") for i in range(n)]


def test_manifest_split_column_decides_and_splits_are_disjoint(tmp_path):
    subjects = _fake_subjects(12)
    kinds = ["train"] * 7 + ["validation"] * 2 + ["test"] * 3
    path = _manifest(tmp_path, [(s.id, k) for s, k in zip(subjects, kinds)])
    d = load_profile("smoke").data
    splits, rule = manifest_splits(path, subjects, d)
    assert sorted(splits.train_pool) == list(range(7))
    assert splits.validation == (7, 8) and splits.test == (9, 10, 11)
    assert "split column" in rule
    bad = _manifest(tmp_path, [("s000", "train"), ("s001", "tset")])
    with pytest.raises(DataError, match="s001.*tset"):
        manifest_splits(bad, _fake_subjects(2), d)


def test_manifest_without_split_column_takes_validation_from_the_end(tmp_path):
    d = load_profile("smoke").data  # test_set 104, train_pool 500, validation_set 16
    subjects = _fake_subjects(700)
    path = _manifest(tmp_path, [(s.id, "x") for s in subjects], header=("id", "note"))
    splits, rule = manifest_splits(path, subjects, d)
    order = np.random.default_rng(d.seed).permutation(700)
    # the test set and the pool's order are the ones a manifest had before there was a validation split
    assert splits.test == tuple(int(i) for i in order[:104])
    assert splits.train_pool == tuple(int(i) for i in order[104:604])
    assert len(splits.validation) == 16
    assert not set(splits.validation) & (set(splits.test) | set(splits.train_pool))
    assert "seeded permutation" in rule
    with pytest.raises(DataError, match="at least 5"):
        manifest_splits(path, _fake_subjects(3), d)


# ---- budget and recipes ------------------------------------------------------------------------


def test_the_budget_says_how_steps_follow_n():
    steps = load_profile("cpu")
    assert [budget_steps(steps, n) for n in (10, 50, 500)] == [300, 300, 300]
    epochs = load_profile("cpu", ["training.budget=epochs", "training.epochs=10"])
    assert [budget_steps(epochs, n) for n in (10, 50, 500)] == [20, 70, 630]  # 10 x ceil(N / 8)
    paper = load_profile("paper")
    assert budget_steps(paper, 50) == 10000 * 4
    with pytest.raises(ValueError, match="budget"):
        budget_steps(load_profile("cpu", ["training.budget=minutes"]), 10)


def test_the_paper_recipe_sets_the_papers_protocol_for_every_method():
    p = load_profile("cpu", ["training.recipe=paper"])
    assert p.training.lr == 5e-5 and p.training.budget == "epochs" and not p.training.lr_by_method
    assert p.methods.vcm.l1_weight == 1.0 and p.methods.vcm.head_norm == "instance"
    assert p.methods.mcm_l.head_norm == "instance"
    assert TrainSettings.from_profile(p, 50, "t2i_adapter", "lv").lr == 5e-5


def _write_recipe(root, profile="smoke", task="lv", methods=None):
    path = root / profile / f"{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"profile": profile, "task": task,
                                    "methods": methods or {"vcm": {"chosen": {"training.lr": 3e-4}}}}))
    return path


def test_a_run_uses_the_recipe_and_records_its_sha256(tmp_path, monkeypatch):
    import benchmark.engine.recipes as recipes

    profile = load_profile("smoke")
    ctx = RunContext(profile, tmp_path / "out", tmp_path / "cache")
    spec = RunSpec.of("lv", "vcm", 10, 0)
    without = ctx.config_hash(spec)
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path / "recipes")
    path = _write_recipe(tmp_path / "recipes")
    used = ctx.recipe(spec)
    assert used["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert used["chosen"] == {"training.lr": 3e-4}
    assert ctx.config_hash(spec) != without  # a retuned recipe is another run
    tuned = ctx.config_hash(spec)
    _write_recipe(tmp_path / "recipes", methods={"vcm": {"chosen": {"training.lr": 3e-4}},
                                                 "mcm": {"chosen": {"training.lr": 1e-3}}})
    assert ctx.config_hash(spec) == tuned  # tuning another method leaves this run's records valid
    path = _write_recipe(tmp_path / "recipes")
    assert TrainSettings.from_profile(profile, 10, "vcm", "lv").lr == 3e-4
    assert TrainSettings.from_profile(profile, 10, "mcm", "lv").lr == profile.training.lr  # not in the recipe
    # the record of a run keeps it
    from benchmark.run import executors

    monkeypatch.setattr(executors, "execute_run", lambda s, c: {"metrics": {}})
    record = executors.run_and_record(spec, ctx)
    assert record["recipe"]["sha256"] == used["sha256"]
    # training.recipe: profile ignores it
    plain = load_profile("smoke", ["training.recipe=profile"])
    assert load_recipe(plain, "lv") is None
    _write_recipe(tmp_path / "recipes", methods={"vcm": {"chosen": {"training.steps": 5}}})
    with pytest.raises(RecipeError, match="cannot set"):
        TrainSettings.from_profile(profile, 10, "vcm", "lv")


# ---- tune --------------------------------------------------------------------------------------


def _trial(lr, delta, eligible=True, dice=0.5):
    return {"lr": lr, "eligible": eligible, "dice_own": dice, "seconds": 1.0, "status": "ok", "steps": 60, "size": 50,
            "seed": 0,
            "control_delta": {"mean": delta, "ci_low": delta - 0.1, "ci_high": delta + 0.1}}


def test_selection_takes_the_largest_control_delta_and_never_a_diverged_trial():
    chosen, why = tune_module.select([_trial(1e-4, 0.05), _trial(1e-3, 0.20), _trial(3e-3, 0.9, eligible=False)])
    assert chosen == {"training.lr": 1e-3} and "Control" in why
    none, why = tune_module.select([_trial(1e-3, 0.9, eligible=False)])
    assert none == {} and "no trial qualified" in why


def test_tune_gives_every_method_the_same_trials_and_picks_the_known_best_lr(tmp_path, monkeypatch):
    """A toy scorer whose best lr is 3e-4: tune must pick it for every method, from the profile's space."""
    seen = []

    def toy_trial(ctx, task, name, lr, cfg, trial_dir, progress):
        seen.append((name, lr))
        distance = abs(np.log10(lr) - np.log10(3e-4))
        return _trial(lr, 0.3 - distance, eligible=lr < 3e-3)  # 3e-3 "diverges" and would score 0.3 - 1

    profile = load_profile("smoke")
    ctx = RunContext(profile, tmp_path / "out", tmp_path / "cache")
    path = tune_module.tune(ctx, get_task("lv"), ["vcm", "controlnet"], tmp_path / "trials", "test",
                            recipe_root=tmp_path / "recipes", trial_runner=toy_trial)
    space = [float(x) for x in profile.tuning.learning_rates]
    assert seen == [(n, lr) for n in ("vcm", "controlnet") for lr in space]
    recipe = yaml.safe_load(path.read_text())
    assert recipe["search_space"] == {"training.lr": space} and recipe["selection"] == tune_module.SELECTION_RULE
    for name in ("vcm", "controlnet"):
        assert recipe["methods"][name]["chosen"] == {"training.lr": 3e-4}
        assert len(recipe["methods"][name]["trials"]) == len(space)
    # resumable: the trials on disk are not run again
    seen.clear()
    tune_module.tune(ctx, get_task("lv"), ["vcm"], tmp_path / "trials", "test", recipe_root=tmp_path / "recipes",
                     trial_runner=toy_trial)
    assert seen == []
    assert json.loads((tmp_path / "recipes" / "smoke" / "lv-trials" / "vcm__lr0.0003.json").read_text())["lr"] == 3e-4


@pytest.fixture
def no_test_subjects(monkeypatch):
    """Every read of a test subject fails the test."""
    test_ids = set(make_splits(0, 500, 104, seed=0).test)
    real_subjects = DataSource.subjects

    def guarded(self, indices):
        indices = list(indices)
        assert not test_ids & set(indices), "a test subject was read"
        return real_subjects(self, indices)

    monkeypatch.setattr(DataSource, "subjects", guarded)
    monkeypatch.setattr(DataSource, "test_subjects", lambda self, n=None: pytest.fail("the test set was asked for"))


TINY = ["training.steps=2", "training.batch_size=2", "tuning.size=4", "tuning.validation_subjects=2", "probe.subjects=2",
        "sampling.ddim_steps=2"]


def test_tune_never_reads_a_test_subject(tmp_path, no_test_subjects):
    """A real (tiny) tune at smoke: training, the probe, sampling and the judge, with test subjects poisoned."""
    profile = load_profile("smoke", TINY + ["tuning.learning_rates=[1.0e-3]", "tuning.max_noise_mse_ratio=1.0e9"])
    ctx = RunContext(profile, tmp_path / "out", tmp_path / "cache", progress=False)
    path = tune_module.tune(ctx, get_task("lv"), ["controlnet_mlp"], tmp_path / "trials", "test",
                            recipe_root=tmp_path / "recipes")
    trial = yaml.safe_load(path.read_text())["methods"]["controlnet_mlp"]["trials"][0]
    assert trial["status"] == "ok" and "control_delta" in trial


def test_plateau_measures_on_validation_subjects_at_every_checkpoint_and_resumes(tmp_path, no_test_subjects):
    from benchmark.run.plateau import plateau

    ctx = RunContext(load_profile("smoke", TINY), tmp_path / "out", tmp_path / "cache", progress=False)
    figure = plateau(ctx, get_task("lv"), ["controlnet_mlp"], [4], tmp_path / "curves", steps=2, every=1, subjects=2,
                     seed=0, command="test")
    record = json.loads((tmp_path / "curves" / "lv__controlnet_mlp__n4.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 1, 2] and record["budget_steps"] == 2
    assert all(p["control_delta"]["n"] == 2 and len(p["probe_gap"]) > 0 for p in record["points"])
    assert figure.is_file()
    # a second call finds the curve and only redraws the figure
    before = (tmp_path / "curves" / "lv__controlnet_mlp__n4.json").stat().st_mtime_ns
    plateau(ctx, get_task("lv"), ["controlnet_mlp"], [4], tmp_path / "curves", steps=2, every=1, subjects=2,
            seed=0, command="test")
    assert (tmp_path / "curves" / "lv__controlnet_mlp__n4.json").stat().st_mtime_ns == before
