"""core.loop: the resumable training loop (atomic files and state dicts: tests/test_core_files.py).

The loop's tests compare weights bit for bit: an interrupted and resumed run must end exactly
where an uninterrupted one does, and the loop must reproduce, to the bit, the hand-written loops
it replaces (copied here in miniature as references).
"""
import math

import numpy as np
import pytest
import torch

from core.loop import LoopSettings, TrainingDiverged, TrainingLoop, warmup_cosine_lr

# ---- the loop ------------------------------------------------------------------------------------

X = torch.linspace(-1, 1, 64).reshape(16, 4)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _setup(path=None, ema=0.0, clip=None, schedule="lambda", backward_inside=False, steps=12, every=3,
           global_rngs=False, **kw):
    """A loop whose step draws its batch from a torch and a numpy generator and adds noise."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    gen, rng = torch.Generator().manual_seed(1), np.random.default_rng(2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * steps)) if schedule == "lambda" else None
    lr_at = warmup_cosine_lr(0.05, steps, 2, 0.01) if schedule == "lr_at" else None

    def step_fn(step):
        idx = torch.from_numpy(rng.choice(16, size=6))
        noise = torch.randn(6, 1, generator=gen) if not global_rngs else torch.randn(6, 1)
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx] + 0.01 * noise)
        if backward_inside:  # as the engine's micro-batches
            loss.backward()
            return float(loss.detach()), {}
        return loss, {"mse": loss.detach()}

    settings = LoopSettings(steps=steps, checkpoint_every=every if path else None, grad_clip=clip, ema_decay=ema,
                            progress=False, global_rngs=global_rngs)
    loop = TrainingLoop(model, opt, step_fn, settings, checkpoint_path=path, schedule=sched, lr_at=lr_at,
                        rngs=[gen, rng], **kw)
    return loop, model, opt


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        elif isinstance(v, dict):
            _same_state(v, b[k])
        else:
            assert v == b[k], k


def test_the_loss_falls():
    loop, _, _ = _setup(steps=60)
    result = loop.run()
    assert result.finished and result.steps == 60 and len(result.losses) == 60
    assert np.mean(result.losses[-5:]) < 0.2 * np.mean(result.losses[:5])
    assert set(result.running) == {"mse"} and result.seconds_per_step > 0 and result.seconds > 0


@pytest.mark.parametrize("variant", [
    {},
    {"ema": 0.9, "clip": 0.5},
    {"schedule": "lr_at", "clip": 0.1, "ema": 0.5},
    {"backward_inside": True, "schedule": "lambda"},
    {"global_rngs": True, "ema": 0.8},
])
@pytest.mark.parametrize("stop_after", [5, 6, 11])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, variant, stop_after):
    ref_loop, ref_model, ref_opt = _setup(tmp_path / "ref.pt", **variant)
    torch.manual_seed(123)  # the global generator, for global_rngs
    ref = ref_loop.run()
    part_loop, _, _ = _setup(tmp_path / "cut.pt", **variant)
    torch.manual_seed(123)
    partial = part_loop.run(stop_after=stop_after)
    assert partial.steps == stop_after and not partial.finished
    torch.manual_seed(999)  # a new process: the global generator is elsewhere
    loop, model, opt = _setup(tmp_path / "cut.pt", **variant)
    result = loop.run()
    assert result.resumed_from == stop_after // 3 * 3  # the last checkpoint, not where it stopped
    assert result.finished and result.losses == ref.losses and result.running == ref.running
    _same_state(model.state_dict(), ref_model.state_dict())
    _same_state(opt.state_dict(), ref_opt.state_dict())
    assert not any(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))


def _pretrain_reference(steps=10, decay=0.9):
    """benchmark.base.pretrain.Pretrainer._loop's arithmetic, without its files."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def lr_at(step, total, base_lr, warmup):  # pretrain._lr_at, verbatim
        if warmup > 0 and step < warmup:
            return base_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    gen = torch.Generator().manual_seed(7)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 0.05, 3)
        idx = torch.randint(0, 16, (5,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        logs = {"mse": loss.detach()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        logs = {k: float(v) for k, v in logs.items()}
        running = logs if running is None else {k: 0.98 * running[k] + 0.02 * logs[k] for k in logs}
    model.load_state_dict(ema.module.state_dict())
    return model, running


def test_reproduces_the_pretraining_loop_bit_for_bit():
    ref_model, ref_running = _pretrain_reference()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    gen = torch.Generator().manual_seed(7)

    def step_fn(step):
        idx = torch.randint(0, 16, (5,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        return loss, {"mse": loss.detach()}

    settings = LoopSettings(steps=10, grad_clip=1.0, ema_decay=0.9, check_finite=False, progress=False)
    result = TrainingLoop(model, opt, step_fn, settings, lr_at=warmup_cosine_lr(0.05, 10, 3, 0.01), rngs=[gen]).run()
    _same_state(model.state_dict(), ref_model.state_dict())
    assert result.running == ref_running


def test_reproduces_the_engine_loop_bit_for_bit():
    """benchmark.engine.training.train_method: LambdaLR, the step does its backward in micro-batches."""
    def micro_batch_step(model, opt, rng, gen):
        batch = torch.from_numpy(rng.choice(16, size=6))
        noise = torch.randn(6, 1, generator=gen)
        value = 0.0
        for part in torch.split(torch.arange(6), 4):  # as backward_in_micro_batches
            share = len(part) / 6
            loss = torch.nn.functional.mse_loss(model(X[batch[part]]), Y[batch[part]] + noise[part])
            (loss * share).backward()
            value += float(loss.detach()) * share
        return value

    def build():
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * s / 8), \
            np.random.default_rng(3), torch.Generator().manual_seed(4)

    ref_model, opt, sched, rng, gen = build()
    ref_losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        ref_losses.append(micro_batch_step(ref_model, opt, rng, gen))
        opt.step()
        sched.step()
    model, opt, sched, rng, gen = build()
    loop = TrainingLoop(model, opt, lambda step: (micro_batch_step(model, opt, rng, gen), {}),
                        LoopSettings(steps=8, progress=False), schedule=sched, rngs=[rng, gen])
    assert loop.run().losses == ref_losses
    _same_state(model.state_dict(), ref_model.state_dict())


def test_checkpoints_and_hooks(tmp_path):
    calls, steps_seen = [], []

    def probe_into(extra):  # as the engine's control probe: its history lives in extra_state
        def probe(done):
            calls.append(done)
            extra["probe"] = extra["probe"] + [done]  # a new list: the loop must save the current one
        return probe

    history = {"probe": []}
    loop, _, _ = _setup(tmp_path / "c.pt", steps=10, every=4, extra_state=history, on_checkpoint=probe_into(history),
                        on_step=lambda done, loss, logs: steps_seen.append((done, math.isfinite(loss), set(logs))))
    loop.run(stop_after=5)
    assert calls == [4] and [s for s, _, _ in steps_seen] == [1, 2, 3, 4, 5]
    assert all(finite and logs == {"mse"} for _, finite, logs in steps_seen)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    assert saved["step"] == 4 and saved["extra"] == {"probe": [4]} and len(saved["losses"]) == 4
    assert {"model", "optimizer", "schedule", "rngs", "ema", "seconds", "running"} <= set(saved)

    calls.clear()
    history = {"probe": []}
    loop, _, _ = _setup(tmp_path / "c.pt", steps=10, every=4, extra_state=history, on_checkpoint=probe_into(history))
    assert loop.resume() == 4 and history == {"probe": [4]}  # restored in place, before run
    loop.run()
    assert calls == [8, 10] and history == {"probe": [4, 8, 10]}  # every 4 steps and at the end
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    assert saved["step"] == 10 and saved["extra"] == {"probe": [4, 8, 10]}

    calls.clear()
    loop, _, _ = _setup(tmp_path / "d.pt", steps=8, every=4, on_checkpoint=probe_into({"probe": []}))
    loop.settings.checkpoint_at_end = False  # the pretraining's rule: no checkpoint after the last step
    loop.run()
    assert calls == [4] and torch.load(tmp_path / "d.pt", weights_only=False)["step"] == 4


def test_an_exception_in_on_step_stops_and_the_next_run_resumes(tmp_path):
    def stop(done, loss, logs):
        if done == 7:
            raise KeyboardInterrupt

    loop, _, _ = _setup(tmp_path / "k.pt", on_step=stop)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]
    assert _setup(tmp_path / "k.pt")[0].resume() == 6


def test_a_non_finite_loss_raises_naming_the_step_before_the_update(tmp_path):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []

    def step_fn(step):
        loss = model(X).pow(2).mean()
        return (loss * float("nan") if step == 2 else loss), {}

    loop = TrainingLoop(model, opt, step_fn, LoopSettings(steps=5, desc="train toy", progress=False),
                        on_step=lambda done, loss, logs: snapshots.append(model.weight.detach().clone()))
    with pytest.raises(TrainingDiverged, match=r"train toy: the loss became nan at step 3"):
        loop.run()
    assert torch.equal(model.weight, snapshots[-1]) and len(snapshots) == 2

    class MethodError(ValueError):
        pass

    loop = TrainingLoop(model, opt, lambda step: (torch.tensor(float("inf"), requires_grad=True), {}),
                        LoopSettings(steps=3, progress=False),
                        on_diverged=lambda n, v: MethodError(f"liif3d diverged: the loss became {v} at step {n}"))
    with pytest.raises(MethodError, match="the loss became inf at step 1"):
        loop.run()
    unchecked = TrainingLoop(model, opt, step_fn, LoopSettings(steps=3, check_finite=False, progress=False))
    assert math.isnan(unchecked.run().losses[2])


def test_a_checkpoint_of_another_kind_is_refused_naming_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"method": {}, "step": 3}, path)  # the engine's old format
    loop, _, _ = _setup(path)
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be resumed.*delete it"):
        loop.run()


def test_settings_are_checked():
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ema_decay"):
        LoopSettings(steps=3, ema_decay=1.0)
    with pytest.raises(ValueError, match="grad_clip"):
        LoopSettings(steps=3, grad_clip=0.0)
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainingLoop(net, opt, lambda s: (0.0, {}), LoopSettings(steps=2, checkpoint_every=2))
    with pytest.raises(TypeError, match="list"):
        TrainingLoop(net, opt, lambda s: (0.0, {}), LoopSettings(steps=2), rngs=[[1, 2]])
