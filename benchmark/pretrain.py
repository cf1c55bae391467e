"""The frozen base model: pretrained here and cached, or loaded from BrainLDM weights.

``load_base_model(profile, cache_dir)`` returns a frozen :class:`~benchmark.base_model.BaseLDM`.

* Profiles with ``base_weights: brainldm`` (``paper``) load the MONAI model-zoo bundle
  ``brain_image_synthesis_latent_diffusion_model`` from ``--weights-dir`` (see :func:`load_brainldm`).
* Every other profile pretrains BrainLDM's architecture, scaled down by the profile, on the
  *pretraining pool* of the synthetic population only (never the benchmark pool or the test set),
  and caches the result under ``<cache_dir>/base/<hash>/``. The hash covers the image shape, the
  data seed, the exact pretraining indices and the data generator's version, the ``autoencoder``,
  ``diffusion`` and ``scheduler`` sections and :data:`CODE_VERSION`; change any of them and the
  model is trained afresh. The autoencoder and the pretraining latents are cached on their own
  (``<cache_dir>/base/autoencoder-<hash>/``, hash without the diffusion and scheduler sections), so
  a change of diffusion settings retrains the diffusion model only.

Pretraining, in three stages, each checkpointed (atomically: temporary file + ``os.replace``) so
that an interrupted run resumes where it stopped and ends with the same numbers as an
uninterrupted one (model, optimizer and random-generator states are saved):

1. **Autoencoder** (``AutoencoderKL``): L1 reconstruction + ``kl_weight`` x KL divergence, on
   whole volumes, or on random crops when ``autoencoder.crop`` is set (the network is fully
   convolutional). No perceptual or adversarial term: neither fits the CPU budgets of the small
   profiles, and the pretrained networks a perceptual loss needs cannot be downloaded here.
   Left-right flips as augmentation.
2. **Latents**: the pretraining pool is encoded once (mu, sigma); the scale factor is
   1 / std of latents sampled from them, as in BrainLDM and MONAI's tutorials.
3. **Diffusion** (``DiffusionModelUNet``): noise prediction (MSE) on scaled latents drawn afresh
   from (mu, sigma) at every step, DDPM noise at uniformly random timesteps, conditioned on the
   four scalars exactly as BrainLDM (``BaseLDM.unet``: broadcast and concatenated to the input, and
   as a cross-attention context).

Both stages use AdamW with a linear warm-up and a cosine decay of the learning rate, gradient
clipping at norm 1, and one seeded ``torch.Generator`` (``data.seed``) for every random draw, so
the same command gives the same weights on the same machine. A ``done`` marker makes a second call
load instantly.

``python -m benchmark.pretrain --profile cpu [--eval]`` pretrains (or loads) and, with ``--eval``,
reports the autoencoder's reconstruction quality on the test split.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from benchmark import shipped
from metrics.common import sha256_file
from benchmark.base_model import BaseLDM

CODE_VERSION = 1  # bump when a change here changes the weights that pretraining produces
BUNDLE_NAME = "brain_image_synthesis_latent_diffusion_model"
BUNDLE_URL = "https://github.com/Project-MONAI/model-zoo/tree/dev/models/" + BUNDLE_NAME
# The bundle's files: new zoo releases use models/autoencoder.pt and models/model.pt.
AUTOENCODER_FILES = ("autoencoder.pth", "autoencoder.pt")
DIFFUSION_FILES = ("diffusion_model.pth", "diffusion_model.pt", "model.pt", "model.pth")

StepCallback = Callable[[str, int], None]


class BaseModelError(ValueError):
    """The base model cannot be pretrained or loaded as configured."""


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def load_base_model(
    profile,
    cache_dir: str | Path,
    weights_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    step_callback: StepCallback | None = None,
) -> BaseLDM:
    """The frozen base model of ``profile`` on ``device``.

    BrainLDM weights from ``weights_dir`` for ``base_weights: brainldm``; otherwise the cached
    pretrained model, pretraining it first if the cache holds none for this configuration.
    ``step_callback(stage, steps_done)`` (stage ``"autoencoder"`` or ``"diffusion"``) is called
    after every training step, for tests and monitoring; an exception it raises stops
    pretraining, and the next call resumes from the last checkpoint.
    """
    source = base_source(profile)
    if source == "brainldm":
        if weights_dir is None:
            raise BaseModelError(
                f"profile '{profile.get('name', '?')}' uses BrainLDM weights: pass --weights-dir, a folder "
                f"that holds the bundle's autoencoder and diffusion files ({_where_to_get()})"
            )
        return load_brainldm(profile, weights_dir, device=device)
    if source == "shipped":
        found, reason = shipped.find_base_model(base_model_key(profile), str(profile.get("name", "?")))
        if found is not None:
            return _load_shipped(profile, found, reason, device, progress)
        if progress:
            print(f"base model: {reason}; the suite pretrains its own (or loads it from the cache)",
                  file=sys.stderr, flush=True)
    out = base_model_dir(profile, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / "lock"):
        if not (out / "done").is_file():
            if decoder_finetune_steps(profile) > 0:
                _DecoderFinetuner(profile, cache_dir, device, progress, step_callback).run()
            else:
                _Pretrainer(profile, cache_dir, device, progress, step_callback).run()
        elif progress:
            print(f"base model: loaded from {out}", file=sys.stderr, flush=True)
        base = _load_cached(profile, out, device)
    base.origin = {"source": "pretrained by the suite (cache)", "path": str(out / "model.pt"),
                   "sha256": file_sha256(out / "model.pt")}
    return base


BASE_SOURCES = ("shipped", "pretrain", "brainldm")


def base_source(profile) -> str:
    """``base_weights`` of the profile: ``shipped`` (default: the networks shipped with the suite in
    ``benchmark/shipped/`` when they match the profile, else pretrain), ``pretrain`` (the suite
    pretrains the base model, and trains its judges and extractors, itself; ``--retrain-base``) or
    ``brainldm`` (the MONAI bundle from ``--weights-dir``)."""
    value = str(profile.get("base_weights", "shipped") or "shipped").lower()
    if value not in BASE_SOURCES:
        raise BaseModelError(f"base_weights '{value}' is not one of {', '.join(BASE_SOURCES)}; "
                             "set it in the profile or with --override base_weights=shipped")
    return value


def add_retrain_base_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retrain-base", action="store_true",
                        help="pretrain the base model (and train the judges and extractors) here even when the "
                             "suite ships them for this profile; same as --override base_weights=pretrain")


def overrides_with_retrain_flag(args: argparse.Namespace) -> list[str]:
    return list(args.override) + (["base_weights=pretrain"] if args.retrain_base else [])


def file_sha256(path: Path) -> str:
    """The full sha256 of a file (``metrics.common.sha256_file`` shortens it by default)."""
    return sha256_file(path, prefix=64)


def autoencoder_key(profile) -> dict[str, Any]:
    """Everything that decides the pretrained autoencoder and its latents."""
    d = profile.data
    indices = _pretrain_indices(profile)
    return {
        "code_version": CODE_VERSION,
        "image_shape": list(profile.image_shape),
        "data": {
            "seed": d.seed,
            "pretrain_pool": d.pretrain_pool,
            "pretrain_indices_sha": hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()[:16],
            "generator": _data_version(),
        },
        "autoencoder": profile.autoencoder.to_dict(),
    }


def base_model_key(profile) -> dict[str, Any]:
    """Everything that decides the pretrained weights (what the cache hash covers)."""
    key = {**autoencoder_key(profile),
           "diffusion": profile.diffusion.to_dict(),
           "scheduler": profile.scheduler.to_dict()}
    if decoder_finetune_steps(profile) > 0:
        key["decoder_finetune"] = profile.decoder_finetune.to_dict()
    return key


def decoder_finetune_steps(profile) -> int:
    section = profile.get("decoder_finetune")
    return int(section.get("steps", 0)) if section is not None else 0


def without_decoder_finetune(profile):
    """The profile whose base model the decoder fine-tuning starts from (same latents, same diffusion)."""
    from benchmark.profiles import Profile

    data = {k: v for k, v in profile.to_dict().items() if k != "decoder_finetune"}
    return Profile({**data, "base_weights": "pretrain"})


def _hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_model_hash(profile) -> str:
    return _hash(base_model_key(profile))


def base_model_dir(profile, cache_dir: str | Path) -> Path:
    """``<cache_dir>/base/<hash>/``: the pretrained model (``model.pt``, ``done``) and its diffusion checkpoints."""
    return Path(cache_dir) / "base" / base_model_hash(profile)


def autoencoder_dir(profile, cache_dir: str | Path) -> Path:
    """``<cache_dir>/base/autoencoder-<hash>/``: the autoencoder and the latents of the pretraining
    pool, shared by every diffusion configuration on top of the same autoencoder."""
    return Path(cache_dir) / "base" / f"autoencoder-{_hash(autoencoder_key(profile))}"


# ---------------------------------------------------------------------------------------------
# pretraining
# ---------------------------------------------------------------------------------------------
def _pretrain_indices(profile) -> tuple[int, ...]:
    from datasets.splits import make_splits

    d = profile.data
    return tuple(int(i) for i in make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed).pretrain)


def _data_version() -> str | None:
    import datasets.synthetic as synthetic

    for name in ("GENERATOR_VERSION", "VERSION", "__version__"):
        if hasattr(synthetic, name):
            return str(getattr(synthetic, name))
    return None


def load_images(profile, cache_dir, indices: Sequence[int], progress: bool = True, desc: str = "data"):
    """Images (N,1,X,Y,Z) float32 and scalars (N,4) float32 of population subjects ``indices``."""
    from datasets.synthetic import SyntheticPopulation

    shape = tuple(profile.image_shape)
    pop = SyntheticPopulation(shape, seed=profile.data.seed, cache_dir=cache_dir)
    if hasattr(pop, "ensure"):  # generate missing subjects in parallel first
        pop.progress = progress
        pop.ensure(list(indices))
    images = torch.empty((len(indices), 1, *shape), dtype=torch.float32)
    scalars = torch.empty((len(indices), 4), dtype=torch.float32)
    chunk = 32
    with tqdm(total=len(indices), desc=desc, unit="subject", disable=not progress, leave=False) as bar:
        for start in range(0, len(indices), chunk):
            for j, s in enumerate(pop.subjects(list(indices[start:start + chunk]))):
                images[start + j] = torch.as_tensor(s.image, dtype=torch.float32)
                scalars[start + j] = torch.as_tensor(s.scalars, dtype=torch.float32)
            bar.update(min(chunk, len(indices) - start))
    return images, scalars


def _lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to 1% of it."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so two processes never pretrain the same model at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class _Pretrainer:
    def __init__(self, profile, cache_dir, device, progress: bool, callback: StepCallback | None):
        self.profile = profile
        self.cache_dir = Path(cache_dir)
        self.out = base_model_dir(profile, cache_dir)
        self.ae_dir = autoencoder_dir(profile, cache_dir)
        self.ae_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.progress = progress
        self.callback = callback
        self.seed = int(profile.data.seed)

    # -- orchestration ----------------------------------------------------------------------
    def run(self) -> None:
        t_start = time.time()
        _atomic_write_text(json.dumps(base_model_key(self.profile), indent=2, default=str), self.out / "config.json")
        if not _pretrain_indices(self.profile):
            raise BaseModelError(
                f"profile '{self.profile.get('name', '?')}' has data.pretrain_pool = 0: there is nothing to "
                "pretrain the base model on; set data.pretrain_pool (e.g. --override data.pretrain_pool=300) "
                "or use BrainLDM weights (base_weights: brainldm and --weights-dir)"
            )
        torch.manual_seed(self.seed)  # initial weights
        base = BaseLDM.from_profile(self.profile).to(self.device)
        with _lock(self.ae_dir / "lock"):
            latents = self._autoencoder_and_latents(base)
        base.scale_factor = float(latents["scale_factor"])
        diffusion_summary = self._train_diffusion(base, latents)

        state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
        _atomic_save({"state_dict": state, "scale_factor": base.scale_factor,
                      "key": base_model_key(self.profile)}, self.out / "model.pt")
        summary = {**_read_json(self.ae_dir / "summary.json"), "diffusion": diffusion_summary,
                   "seconds_this_call": round(time.time() - t_start, 1),
                   "parameters": base.num_parameters(), "scale_factor": base.scale_factor,
                   "autoencoder_dir": str(self.ae_dir)}
        _atomic_write_text(json.dumps(summary, indent=2), self.out / "summary.json")
        (self.out / "done").write_text("pretraining finished\n")
        (self.out / "diffusion.ckpt").unlink(missing_ok=True)
        ae = summary.get("autoencoder", {})
        print(
            f"base model: ready in {summary['seconds_this_call']:.0f} s (autoencoder {ae.get('steps')} steps "
            f"in {ae.get('seconds', 0):.0f} s, L1 {ae.get('final_l1', float('nan')):.4f}; diffusion "
            f"{diffusion_summary['steps']} steps in {diffusion_summary['seconds']:.0f} s, MSE "
            f"{diffusion_summary.get('final_mse', float('nan')):.4f}; scale factor {base.scale_factor:.4f}); "
            f"cached in {self.out}",
            file=sys.stderr, flush=True,
        )

    def _autoencoder_and_latents(self, base: BaseLDM) -> dict[str, torch.Tensor]:
        """Stages 1 and 2, cached in the autoencoder folder."""
        latents_path = self.ae_dir / "latents.pt"
        ae_path = self.ae_dir / "autoencoder.pt"
        if latents_path.is_file() and ae_path.is_file():
            base.autoencoder.load_state_dict(torch.load(ae_path, map_location=self.device, weights_only=True))
            return torch.load(latents_path, map_location="cpu", weights_only=True)
        summary = _read_json(self.ae_dir / "summary.json")
        t0 = time.time()
        images, scalars = load_images(self.profile, self.cache_dir, _pretrain_indices(self.profile),
                                      self.progress, "pretraining data")
        summary["data_seconds"] = round(time.time() - t0, 1)
        if ae_path.is_file():
            base.autoencoder.load_state_dict(torch.load(ae_path, map_location=self.device, weights_only=True))
        else:
            summary["autoencoder"] = self._train_autoencoder(base, images)
            _atomic_save(base.autoencoder.state_dict(), ae_path)
            (self.ae_dir / "autoencoder.ckpt").unlink(missing_ok=True)
        _atomic_write_text(json.dumps(summary, indent=2), self.ae_dir / "summary.json")
        latents = self._encode_pool(base, images, scalars)
        summary["latent_std"] = 1.0 / float(latents["scale_factor"])
        _atomic_write_text(json.dumps(summary, indent=2), self.ae_dir / "summary.json")
        _atomic_save(latents, latents_path)
        return latents

    # -- a resumable training loop ------------------------------------------------------------
    def _loop(self, stage: str, module: torch.nn.Module, cfg, ckpt_path: Path, step_fn) -> dict[str, Any]:
        """Train ``module`` for ``cfg.steps`` steps of ``step_fn(step, gen) -> (loss, logs)``,
        resuming from ``ckpt_path`` if it exists. Returns a summary."""
        steps = int(cfg.steps)
        if steps <= 0:
            raise BaseModelError(f"{stage}.steps must be positive to pretrain the base model, got {steps}")
        lr = float(cfg.lr)
        warmup = int(cfg.get("warmup_steps", 0))
        every = max(1, int(cfg.get("checkpoint_every", max(1, steps // 10))))
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=float(cfg.get("weight_decay", 0.0)))
        gen = torch.Generator().manual_seed(self.seed + {"autoencoder": 1, "diffusion": 2}.get(stage, 4))
        # An exponential moving average of the weights (ema_decay > 0) becomes the final model:
        # samples from short runs improve when the last steps' noise is averaged out.
        decay = float(cfg.get("ema_decay", 0.0) or 0.0)
        if not 0.0 <= decay < 1.0:
            raise BaseModelError(f"{stage}.ema_decay must lie in [0, 1) (0: no averaging), got {decay}")
        ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None
        start, seconds, running = 0, 0.0, None
        if ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location=self.device, weights_only=False)
            module.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["generator"])
            start, seconds, running = ckpt["step"], ckpt["seconds"], ckpt["running"]
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
        module.train()
        t0 = time.time() - seconds
        bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not self.progress, leave=False)
        try:
            for step in range(start, steps):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, steps, lr, warmup)
                loss, logs = step_fn(step, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                opt.step()
                if ema is not None:
                    ema.update_parameters(module)
                logs = {k: float(v) for k, v in logs.items()}
                running = logs if running is None else {k: 0.98 * running[k] + 0.02 * logs[k] for k in logs}
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
                done = step + 1
                if done % every == 0 and done < steps:
                    _atomic_save({"step": done, "model": module.state_dict(), "optimizer": opt.state_dict(),
                                  "generator": gen.get_state(), "seconds": time.time() - t0,
                                  "running": running, "ema": ema.state_dict() if ema is not None else None},
                                 ckpt_path)
                if self.callback is not None:
                    self.callback(stage, done)
        finally:
            bar.close()
        if ema is not None:
            module.load_state_dict(ema.module.state_dict())
        module.eval()
        elapsed = time.time() - t0
        return {"steps": steps, "seconds": round(elapsed, 1), "seconds_per_step": round(elapsed / steps, 3),
                "ema_decay": decay,
                **{f"final_{k}": round(v, 6) for k, v in (running or {}).items()}}

    # -- stage 1: autoencoder --------------------------------------------------------------------
    def _train_autoencoder(self, base: BaseLDM, images: torch.Tensor) -> dict[str, Any]:
        cfg = self.profile.autoencoder
        ae = base.autoencoder
        batch = int(cfg.batch_size)
        kl_weight = float(cfg.kl_weight)
        crop = cfg.get("crop")
        shape = tuple(images.shape[2:])
        if crop is not None:
            crop = tuple(min(int(c), s) for c, s in zip(crop, shape))
            if len(crop) != 3 or any(c % base.compression for c in crop):
                raise BaseModelError(f"autoencoder.crop {list(crop)} must be three sizes, multiples of the "
                                     f"compression {base.compression}")
        n = images.shape[0]

        def step_fn(step: int, gen: torch.Generator):
            idx = torch.randint(0, n, (batch,), generator=gen)
            x = images[idx]
            if crop is not None:
                o = [int(torch.randint(0, s - c + 1, (1,), generator=gen)) for c, s in zip(crop, shape)]
                x = x[:, :, o[0]:o[0] + crop[0], o[1]:o[1] + crop[1], o[2]:o[2] + crop[2]]
            flip = torch.rand(batch, generator=gen) < 0.5  # left-right (X), CONVENTIONS.md
            x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(2), x).to(self.device)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            mu, sigma = ae.encode(x)
            eps = torch.randn(mu.shape, generator=gen).to(self.device)
            rec = ae.decode(mu + sigma * eps)
            l1 = F.l1_loss(rec.float(), x)
            kl = kl_divergence(mu, sigma)
            return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}

        ae.to(memory_format=torch.channels_last_3d)  # ~1.7x faster 3D convolutions on CPU
        try:
            return self._loop("autoencoder", ae, cfg, self.ae_dir / "autoencoder.ckpt", step_fn)
        finally:
            ae.to(memory_format=torch.contiguous_format)

    # -- stage 2: latents and scale factor ------------------------------------------------------
    @torch.no_grad()
    def _encode_pool(self, base: BaseLDM, images, scalars) -> dict[str, torch.Tensor]:
        ae = base.autoencoder.eval()
        mus, sigmas = [], []
        bs = max(1, int(self.profile.autoencoder.batch_size))
        for start in tqdm(range(0, images.shape[0], bs), desc="encoding", disable=not self.progress, leave=False):
            mu, sigma = ae.encode(images[start:start + bs].to(self.device))
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
        mu, sigma = torch.cat(mus), torch.cat(sigmas)
        gen = torch.Generator().manual_seed(self.seed + 3)
        z = mu + sigma * torch.randn(mu.shape, generator=gen)
        return {"mu": mu, "sigma": sigma, "scalars": scalars.clone(),
                "scale_factor": torch.tensor(1.0 / float(z.std()))}

    # -- stage 3: diffusion ---------------------------------------------------------------------
    def _train_diffusion(self, base: BaseLDM, latents: dict[str, torch.Tensor]) -> dict[str, Any]:
        cfg = self.profile.diffusion
        mu = latents["mu"].to(self.device)
        sigma = latents["sigma"].to(self.device)
        scalars = latents["scalars"].to(self.device)
        sf = float(latents["scale_factor"])
        batch = int(cfg.batch_size)
        scheduler = base.train_scheduler
        num_t = int(scheduler.num_train_timesteps)
        n = mu.shape[0]

        def step_fn(step: int, gen: torch.Generator):
            idx = torch.randint(0, n, (batch,), generator=gen).to(self.device)
            eps = torch.randn((batch, *mu.shape[1:]), generator=gen).to(self.device)
            z0 = (mu[idx] + sigma[idx] * eps) * sf
            noise = torch.randn(z0.shape, generator=gen).to(self.device)
            t = torch.randint(0, num_t, (batch,), generator=gen).to(self.device)
            z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
            pred = base.unet(z_t, t, scalars[idx])
            mse = F.mse_loss(pred.float(), noise)
            return mse, {"mse": mse.detach()}

        return self._loop("diffusion", base.diffusion, cfg, self.out / "diffusion.ckpt", step_fn)


class _DecoderFinetuner(_Pretrainer):
    """Stage 4 (``decoder_finetune.steps`` > 0): the decoder alone is trained further on latents
    drawn from the frozen encoder, as Stable Diffusion's fine-tuned VAE decoders were. The encoder,
    the latents, the scale factor and the diffusion model stay exactly those of the profile without
    this stage (pretrained, or loaded from its cache, first), so reconstructions sharpen without
    retraining the diffusion model."""

    def run(self) -> None:
        t_start = time.time()
        _atomic_write_text(json.dumps(base_model_key(self.profile), indent=2, default=str), self.out / "config.json")
        start_profile = without_decoder_finetune(self.profile)
        base = load_base_model(start_profile, self.cache_dir, device=self.device, progress=self.progress,
                               step_callback=self.callback)
        start_summary = _read_json(base_model_dir(start_profile, self.cache_dir) / "summary.json")
        images, _ = load_images(self.profile, self.cache_dir, _pretrain_indices(self.profile),
                                self.progress, "pretraining data")
        summary = self._train_decoder(base, images)
        state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
        _atomic_save({"state_dict": state, "scale_factor": base.scale_factor,
                      "key": base_model_key(self.profile)}, self.out / "model.pt")
        full = {**start_summary, "decoder_finetune": summary, "seconds_this_call": round(time.time() - t_start, 1),
                "started_from": str(base_model_dir(start_profile, self.cache_dir))}
        _atomic_write_text(json.dumps(full, indent=2), self.out / "summary.json")
        (self.out / "done").write_text("pretraining finished\n")
        (self.out / "decoder.ckpt").unlink(missing_ok=True)
        print(f"base model: decoder fine-tuned in {summary['seconds']:.0f} s ({summary['steps']} steps, "
              f"L1 {summary.get('final_l1', float('nan')):.4f}); cached in {self.out}", file=sys.stderr, flush=True)

    def _train_decoder(self, base: BaseLDM, images: torch.Tensor) -> dict[str, Any]:
        cfg = self.profile.decoder_finetune
        ae = base.autoencoder
        decoder = torch.nn.ModuleList([ae.post_quant_conv, ae.decoder])
        base.train()
        for p in decoder.parameters():
            p.requires_grad_(True)
        batch = int(cfg.batch_size)
        n = images.shape[0]

        def step_fn(step: int, gen: torch.Generator):
            idx = torch.randint(0, n, (batch,), generator=gen)
            flip = torch.rand(batch, generator=gen) < 0.5  # left-right (X), as in stage 1
            x = torch.where(flip.view(-1, 1, 1, 1, 1), images[idx].flip(2), images[idx]).to(self.device)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.no_grad():
                mu, sigma = ae.encode(x)
            z = mu + sigma * torch.randn(mu.shape, generator=gen).to(self.device)
            l1 = F.l1_loss(ae.decode(z).float(), x)
            return l1, {"l1": l1.detach()}

        ae.to(memory_format=torch.channels_last_3d)  # as stage 1: faster 3D convolutions on CPU
        try:
            summary = self._loop("decoder_finetune", decoder, cfg, self.out / "decoder.ckpt", step_fn)
        finally:
            ae.to(memory_format=torch.contiguous_format)
        base.freeze()
        return summary


def _load_shipped(profile, path: Path, what: str, device, progress: bool) -> BaseLDM:
    shipped.verify(path.parent, path.name)
    base = _load_cached(profile, path.parent, device, path)
    base.origin = {"source": "shipped base model", "path": str(path),
                   "sha256": shipped.provenance(path.parent)["files"][path.name]["sha256"],  # verified above
                   "provenance": str(path.parent / shipped.PROVENANCE)}
    if progress:
        print(f"base model: {what} ({path}, sha256 {base.origin['sha256'][:12]}), no pretraining",
              file=sys.stderr, flush=True)
    return base


def _load_cached(profile, out: Path, device, path: Path | None = None) -> BaseLDM:
    path = path or out / "model.pt"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        base = BaseLDM.from_profile(profile, scale_factor=float(blob["scale_factor"]))
        base.load_state_dict(blob["state_dict"])
    except Exception as err:  # a damaged cache: say which folder to delete
        raise BaseModelError(
            f"the cached base model {path} cannot be loaded ({type(err).__name__}: {err}); "
            f"delete the folder {out} and run again to pretrain it afresh"
        ) from err
    return base.to(device).freeze()


# ---------------------------------------------------------------------------------------------
# BrainLDM weights (paper profile)
# ---------------------------------------------------------------------------------------------
def _where_to_get() -> str:
    return (f"the MONAI model-zoo bundle '{BUNDLE_NAME}', e.g. `python -m monai.bundle download "
            f"{BUNDLE_NAME} --bundle_dir DIR`, whose models/ folder holds autoencoder.pt and model.pt; "
            f"{BUNDLE_URL}")


def brainldm_search_dirs(weights_dir: str | Path) -> list[Path]:
    """Folders searched for the bundle's files, in order."""
    root = Path(weights_dir)
    return [root / "brainldm", root / BUNDLE_NAME / "models", root / BUNDLE_NAME, root / "models", root]


def find_brainldm_files(weights_dir: str | Path) -> tuple[Path, Path]:
    """(autoencoder file, diffusion file) of the BrainLDM bundle under ``weights_dir``."""
    root = Path(weights_dir)
    if not root.is_dir():
        raise BaseModelError(
            f"weights folder {root} does not exist; create it and put BrainLDM's autoencoder.pth and "
            f"diffusion_model.pth into {root / 'brainldm'} (they come from {_where_to_get()})"
        )
    dirs = [d for d in brainldm_search_dirs(root) if d.is_dir()]
    for folder in dirs:
        ae = next((folder / f for f in AUTOENCODER_FILES if (folder / f).is_file()), None)
        df = next((folder / f for f in DIFFUSION_FILES if (folder / f).is_file()), None)
        if ae is not None and df is not None:
            return ae, df
    found_ae = [d / f for d in dirs for f in AUTOENCODER_FILES if (d / f).is_file()]
    found_df = [d / f for d in dirs for f in DIFFUSION_FILES if (d / f).is_file()]
    missing = []
    if not found_ae:
        missing.append(f"the autoencoder ({' or '.join(AUTOENCODER_FILES)})")
    if not found_df:
        missing.append(f"the diffusion model ({' or '.join(DIFFUSION_FILES)})")
    what = " and ".join(missing) if missing else "the autoencoder and the diffusion model in the same folder"
    searched = ", ".join(str(d) for d in brainldm_search_dirs(root))
    raise BaseModelError(
        f"BrainLDM weights incomplete in {root}: missing {what}. Put autoencoder.pth and diffusion_model.pth "
        f"(or the bundle's autoencoder.pt and model.pt) together into {root / 'brainldm'}; searched {searched}. "
        f"They come from {_where_to_get()}"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BaseModelError(
            f"cannot read {path} as a PyTorch state dict ({type(err).__name__}: {err}); "
            f"replace it with the file from {_where_to_get()}"
        ) from err
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if key in blob and isinstance(blob[key], dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise BaseModelError(f"{path} does not hold a state dict of tensors; replace it with the file from {_where_to_get()}")
    return dict(blob)


def load_network_weights(net: torch.nn.Module, path: Path, what: str) -> str:
    """Load ``path`` into ``net``: directly when its keys are the current MONAI names, else through
    MONAI's ``load_old_state_dict`` (MONAI Generative's names, as in the bundle). Every parameter
    of ``net`` must come from the file, and every tensor of the file must be used.
    Returns ``"new"`` or ``"old"`` (the key style found)."""
    state = _read_state_dict(path)
    expected = net.state_dict()
    hint = (f"{path} does not match BrainLDM's {what} (the paper profile's architecture); make sure it is the "
            f"{what} file of {_where_to_get()}")
    if set(state) == set(expected):
        bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
               for k, v in expected.items() if state[k].shape != v.shape]
        if bad:
            raise BaseModelError(f"{hint}; tensors of the wrong shape: {', '.join(bad[:5])}"
                                 + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        net.load_state_dict(state)
        return "new"
    if len(state) != len(expected):
        missing = sorted(set(expected) - set(state))[:3]
        raise BaseModelError(
            f"{hint}; it has {len(state)} tensors where the {what} has {len(expected)}"
            + (f" (e.g. no {', '.join(missing)})" if missing and len(state) < len(expected) else "")
        )
    remaining = dict(state)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            net.load_old_state_dict(remaining)  # pops what it uses from `remaining`
    except (KeyError, RuntimeError) as err:
        raise BaseModelError(f"{hint}; the old-style names could not be converted ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:300]})") from None
    if remaining:
        raise BaseModelError(f"{hint}; unused tensors: {', '.join(sorted(remaining)[:5])}")
    return "old"


def load_brainldm(profile, weights_dir: str | Path, device: str | torch.device = "cpu") -> BaseLDM:
    """BrainLDM from the MONAI bundle's files in ``weights_dir`` (frozen, on ``device``).

    Architecture from the profile (``paper``: the bundle's), scale factor from
    ``diffusion.scale_factor`` (BrainLDM: 0.8962649106979370)."""
    ae_path, df_path = find_brainldm_files(weights_dir)
    scale = profile.diffusion.get("scale_factor")
    if scale is None:
        raise BaseModelError(f"profile '{profile.get('name', '?')}' loads BrainLDM but sets no diffusion.scale_factor "
                             "(BrainLDM's is 0.8962649106979370)")
    base = BaseLDM.from_profile(profile, scale_factor=float(scale))
    load_network_weights(base.autoencoder, ae_path, "autoencoder")
    load_network_weights(base.diffusion, df_path, "diffusion model")
    base.origin = {"source": "BrainLDM weights", "path": str(df_path), "sha256": file_sha256(df_path),
                   "autoencoder_path": str(ae_path), "autoencoder_sha256": file_sha256(ae_path)}
    return base.to(device).freeze()


# ---------------------------------------------------------------------------------------------
# reconstruction quality
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_quality(base: BaseLDM, images: torch.Tensor, batch_size: int = 8,
                           device: str | torch.device = "cpu") -> dict[str, float]:
    """The autoencoder's reconstruction of ``images`` (N,1,X,Y,Z) from the latent mean: mean L1,
    PSNR, 3D SSIM (MONAI ``SSIMMetric``, Gaussian kernel 11, sigma 1.5) and 3D MS-SSIM (MONAI
    ``MultiScaleSSIMMetric``). Five scales need 176 voxels per side with the standard 11-voxel
    kernel, so MS-SSIM uses the suite's choice for the shape (``metrics.msssim.msssim_params``:
    e.g. 3 scales, kernel 9 at 40x56x40); its key names scales and kernel."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    from metrics.msssim import msssim_params

    shape = tuple(images.shape[2:])
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=min(11, (min(shape) - 1) | 1))
    params = msssim_params(shape)
    ms_key = f"ms_ssim_{params['scales']}scales_k{params['kernel_size']}"
    msssim = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=params["kernel_size"],
                                  kernel_sigma=params["kernel_sigma"], weights=params["weights"])
    psnr = PSNRMetric(max_val=1.0)
    ae = base.autoencoder.eval()
    l1 = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        mu, _ = ae.encode(x)
        rec = ae.decode(mu).clamp(0, 1).float()
        l1.append((rec - x).abs().flatten(1).mean(1).cpu())
        ssim(rec, x)
        msssim(rec, x)
        psnr(rec, x)
    return {"l1": float(torch.cat(l1).mean()), "psnr": float(psnr.aggregate()),
            "ssim": float(ssim.aggregate()), ms_key: float(msssim.aggregate()), "n": int(images.shape[0])}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from benchmark.profiles import load_profile

    p = argparse.ArgumentParser(prog="python -m benchmark.pretrain",
                                description="Pretrain (or load) the base LDM of a profile; optionally "
                                            "measure its autoencoder's reconstruction on the test split.")
    p.add_argument("--profile", default="smoke")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache-dir", default=os.environ.get("SCB_CACHE_DIR", ".cache"))
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--eval", action="store_true", help="reconstruction quality on the test split")
    add_retrain_base_flag(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    profile = load_profile(args.profile, overrides_with_retrain_flag(args))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    base = load_base_model(profile, args.cache_dir, args.weights_dir, device=device, progress=not args.quiet)
    print(f"base model ready in {time.time() - t0:.1f} s: {base.num_parameters()}, scale factor {base.scale_factor:.4f}")
    if args.eval:
        from datasets.splits import make_splits

        d = profile.data
        test = make_splits(d.pretrain_pool, d.train_pool, d.test_set, d.seed).test
        images, _ = load_images(profile, args.cache_dir, test, not args.quiet, "test data")
        quality = reconstruction_quality(base, images, device=device)
        print("autoencoder reconstruction on the test split: "
              + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
