"""Data-parallel method training (benchmark.engine.distributed, benchmark.run.ddp) on CPU: 2 ranks over
gloo train VCM, ControlNet and the fine-tuned LDM to the parameters of one process, a checkpoint resumes
at the other world size, only rank 0 writes, and a rank that raises ends the run naming it. One spawn of
2 ranks does all the training (starting a rank costs seconds of imports on a shared machine)."""
import multiprocessing
import os
import sys

import pytest
import torch

from benchmark.engine.distributed import describe, rank_and_size, shares, wait_for_lead
from benchmark.engine.latents import LatentCache, stable_seed
from benchmark.engine.training import TrainSettings, train_method
from benchmark.run.ddp import RankFailed, spawn
from benchmark.run.slurm import SlurmSettings
from datasets.tasks import get_task
from methods.registry import get_method
from tests.fixtures import one_thread, random_base_and_subjects  # noqa: F401  (one_thread: autouse)

METHODS = ("vcm", "controlnet", "ldm_finetune")  # the three; no training_loss draws global randomness
# One process accumulates micro-batches of 2, the examples each of 2 ranks takes: the same sums, so the
# parameters agree to rounding (measured: bit for bit). Against one process without micro-batches VCM
# differs by 1.9e-5 (relative norm), exactly as one process with micro-batches of 2 does (most likely Adam
# turning the rounding of gradients that are zero in exact arithmetic, e.g. a bias before an instance norm,
# into steps of the learning rate's size).
OVERRIDES = ["training.steps=5", "training.batch_size=4", "training.micro_batch_size=2", "training.checkpoint_every=2",
             "training.warmup_steps=1"]
CUT = 3  # steps before the interruption (the last checkpoint before it: step 2)


def _setup(cache):
    """The same profile, base model, subjects and latents in every process (the caches written by the first)."""
    profile, base, subjects = random_base_and_subjects(OVERRIDES, cache, n_subjects=4)
    with torch.no_grad():  # a fresh UNet's output conv is zero: methods would get no gradient through it
        generator = torch.Generator().manual_seed(0)
        for p in base.diffusion.out[-1].parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return profile, base, subjects, LatentCache(base, cache / "latents.pt")


def _train(setup, name, run_dir, stop_after=None):
    profile, base, subjects, latents = setup
    task = get_task("lv")
    torch.manual_seed(stable_seed(0, "init", name))
    method = get_method(name, task)(base, task.modalities, profile.methods[name])
    result = train_method(method, base, subjects, task, TrainSettings.from_profile(profile, len(subjects)),
                          latents, run_dir, 0, progress=False, stop_after=stop_after)
    return method, result


def _flat(method) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in method.trainable_parameters()])


def _writes_under(folder) -> list:
    """Every file or folder this process creates, opens for writing, renames or removes under ``folder``."""
    seen = []

    def hook(event, args):
        if event == "open" and (any(c in args[1] for c in "wax+") if isinstance(args[1], str)
                                else args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            path = args[0]
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir"):
            path = args[0]
        else:
            return
        if str(folder) in str(path):
            seen.append((event, str(path)))

    sys.addaudithook(hook)
    return seen


def _two_ranks(rank, device, tmp):
    """Each rank: the three methods for 5 steps, a run cut after 3 steps, and a resumption of a run that one
    process cut; rank 1 checks it holds rank 0's parameters and wrote nothing."""
    writes = _writes_under(tmp) if rank == 1 else []
    assert rank == 0 or wait_for_lead()  # rank 0's first train_method says when its caches are written
    setup = _setup(tmp / "cache")
    runs = [(name, tmp / "ddp" / name, None) for name in METHODS]
    runs += [("vcm", tmp / "cut_by_2", CUT), ("vcm", tmp / "cut_by_1", None)]
    for name, run_dir, stop_after in runs:
        method, result = _train(setup, name, run_dir, stop_after)
        assert result.extra["distributed"] == {"world_size": 2, "per_rank_batch": [2, 2]}
        params = _flat(method)
        from_zero = params.clone()
        torch.distributed.broadcast(from_zero, src=0)
        assert torch.equal(params, from_zero), f"rank {rank}: {name} drifted from rank 0's parameters"
    assert not writes, f"rank 1 wrote {writes[:5]}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_ranks_train_like_one_process_and_resume_at_either_world_size(tmp_path):
    setup = _setup(tmp_path / "cache")
    _train(setup, "vcm", tmp_path / "cut_by_1", stop_after=CUT)  # 1 process cut: the 2 ranks resume it
    one = {}
    for name in METHODS:
        method, result = _train(setup, name, tmp_path / "one" / name)
        one[name] = _flat(method)
        assert "distributed" not in result.extra  # a one-process record stays as it was

    spawn(_two_ranks, 2, "cpu", tmp_path)

    for name in METHODS:
        method, result = _train(setup, name, tmp_path / "ddp" / name)  # resumes the finished checkpoint
        assert result.resumed_from == 5
        difference = _relative(_flat(method), one[name])
        print(f"{name}: 2 ranks against 1 process, relative difference {difference:.1e}")
        assert difference < 1e-5, name
    two_then_one, result = _train(setup, "vcm", tmp_path / "cut_by_2")  # 2 ranks cut: 1 process resumes
    assert result.resumed_from == 2
    assert _relative(_flat(two_then_one), one["vcm"]) < 1e-5
    one_then_two, result = _train(setup, "vcm", tmp_path / "cut_by_1")  # finished by the 2 ranks
    assert result.resumed_from == 5 and _relative(_flat(one_then_two), one["vcm"]) < 1e-5


def _rank_one_raises(rank, device):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    wait_for_lead()  # rank 0 waits on the others, as in a collective of a training step


def test_a_rank_that_raises_ends_the_run_naming_it_and_leaves_no_process():
    with pytest.raises(RankFailed, match=r"^rank 1 of 2 raised ValueError: rank one fails on purpose$"):
        spawn(_rank_one_raises, 2, "cpu")
    assert multiprocessing.active_children() == []
    assert rank_and_size() == (0, 1)  # the test process joined no group


def _rank_zero_fails_alone(rank, device):
    if rank == 0:
        return {"status": "failed", "error": "ValueError: the probe failed"}  # a run's failed record
    wait_for_lead()  # loses rank 0 when it ends: RankLost, not the cause


def test_a_rank_that_only_lost_rank_0_leaves_rank_0s_record_as_the_cause():
    assert spawn(_rank_zero_fails_alone, 2, "cpu") == {"status": "failed", "error": "ValueError: the probe failed"}
    assert multiprocessing.active_children() == []


def test_shares_split_the_minibatch_contiguously_and_refuse_too_many_ranks():
    assert shares(5, 1) == [range(0, 5)]
    assert shares(5, 2) == [range(0, 2), range(2, 5)]
    assert describe(8, 4) == {"world_size": 4, "per_rank_batch": [2, 2, 2, 2]}
    with pytest.raises(ValueError, match="minibatch of 8 examples .* cannot be split over 16 ranks"):
        shares(8, 16)


def test_slurm_gpus_give_each_array_task_one_rank_per_gpu():
    params = SlurmSettings(gpus_per_run=4, cpus_per_run=16).parameters()
    assert (params["gpus_per_node"], params["tasks_per_node"], params["cpus_per_task"], params["nodes"]) == (4, 4, 4, 1)
    one = SlurmSettings(gpus_per_run=1, cpus_per_run=8).parameters()
    assert (one["gpus_per_node"], one["tasks_per_node"], one["cpus_per_task"]) == (1, 1, 8)
    cpu_only = SlurmSettings(gpus_per_run=0).parameters()
    assert cpu_only["tasks_per_node"] == 1
