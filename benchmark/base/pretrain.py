"""Pretraining the base model (BrainLDM's architecture, scaled down by the profile) on the
*pretraining pool* of the synthetic population only (never the benchmark pool or the test set).
Where the result is cached and when it is reused: :mod:`benchmark.base.cache`.

Pretraining, in stages, each trained by the suite's resumable loop (:mod:`core.loop`, atomic
checkpoints) so that an interrupted run resumes where it stopped and ends with the same numbers as an
uninterrupted one (model, optimizer, EMA and random-generator states are saved):

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
4. **Decoder** (``decoder_finetune``, optional): the decoder alone, on latents of the frozen encoder.
5. **Offset noise** (``diffusion_finetune``, optional): the diffusion model trained on with noise that
   also varies in its spatial mean (``offset_noise``), so that sampling does not carry the initial
   noise's mean into the sample.

Stages 1 to 3 are here; stages 4 and 5 continue from a finished base model (:mod:`benchmark.base.finetune`).

Every stage uses AdamW with a linear warm-up and a cosine decay of the learning rate, gradient
clipping at norm 1, and one seeded ``torch.Generator`` (``data.seed``) for every random draw, so
the same command gives the same weights on the same machine. A ``done`` marker makes a second call
load instantly.

``python run_benchmark.py pretrain --profile cpu [--eval]`` pretrains (or loads) and, with ``--eval``,
reports the autoencoder's reconstruction quality on the test split.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmark.base.model import BaseLDM
from benchmark.base.keys import (BaseModelError, StepCallback, _pretrain_indices, _read_json, autoencoder_dir,
                                 base_model_dir, base_model_key)
from core import loop
from core.files import atomic_json, atomic_torch_save, atomic_write_text, file_lock

# What decides the pretrained weights besides the profile. Changing any of these changes the results
# (and orphans cached base models: the cache key does not cover them).
GRAD_CLIP = 1.0  # max norm of the gradient at every pretraining step
LR_FLOOR = 0.01  # the cosine decay of the learning rate ends at this fraction of it (a stage's lr_floor: its own)
LOG_WEIGHT = 0.02  # a step's weight in the running averages of the logs (the summaries' final_* values)
SEED_OFFSETS = {"autoencoder": 1, "diffusion": 2, "latents": 3, "decoder_finetune": 4, "diffusion_finetune": 5}  # data.seed + offset seeds a stage


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


_OLD_CHECKPOINT_KEYS = {"step", "model", "optimizer", "generator", "seconds", "running", "ema"}


def upgrade_old_checkpoint(path: Path) -> bool:
    """Rewrite, in place, a checkpoint of the pretraining loop that preceded :mod:`core.loop` (a dict
    of exactly ``_OLD_CHECKPOINT_KEYS``, no ``"format"``) in core.loop's format, so that a run
    interrupted under the old code resumes with the same weights, optimiser, generator, EMA, step and
    running logs. The old file kept no loss history: the resumed run's ``losses`` start at its step.
    Returns whether it rewrote the file; any other file is left to core.loop to accept or refuse."""
    if not path.is_file():
        return False
    try:  # CPU: the generator's state must be a CPU tensor, whatever device saved it
        old = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - core.loop names the unreadable file
        return False
    if not isinstance(old, dict) or set(old) != _OLD_CHECKPOINT_KEYS:
        return False
    atomic_torch_save({"format": loop.FORMAT, "step": int(old["step"]), "seconds": float(old["seconds"]),
                       "model": old["model"], "optimizer": old["optimizer"], "schedule": None,
                       "rngs": [old["generator"]], "global_rngs": None, "ema": old["ema"], "losses": [],
                       "running": dict(old["running"] or {}), "extra": {}}, path)
    return True


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


def autoencoder_loss(ae, x: torch.Tensor, kl_weight: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1's loss of ``x``: L1 of the decoded posterior sample, plus ``kl_weight`` x KL; and
    the two terms (detached) for the log."""
    mu, sigma = ae.encode(x)
    eps = torch.randn(mu.shape, generator=generator).to(x.device)
    l1 = F.l1_loss(ae.decode(mu + sigma * eps).float(), x)
    kl = kl_divergence(mu, sigma)
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}


class Pretrainer:
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
        atomic_json(self.out / "config.json", base_model_key(self.profile), indent=2, default=str)
        if not _pretrain_indices(self.profile):
            raise BaseModelError(
                f"profile '{self.profile.get('name', '?')}' has data.pretrain_pool = 0: there is nothing to "
                "pretrain the base model on; set data.pretrain_pool (e.g. --override data.pretrain_pool=300) "
                "or use BrainLDM weights (base_weights: brainldm and --weights-dir)"
            )
        torch.manual_seed(self.seed)  # initial weights
        base = BaseLDM.from_profile(self.profile).to(self.device)
        with file_lock(self.ae_dir / "lock"):
            latents = self._autoencoder_and_latents(base)
        base.scale_factor = float(latents["scale_factor"])
        diffusion_summary = self._train_diffusion(base, latents)
        summary = {**_read_json(self.ae_dir / "summary.json"), "diffusion": diffusion_summary,
                   "seconds_this_call": round(time.time() - t_start, 1),
                   "parameters": base.num_parameters(), "scale_factor": base.scale_factor,
                   "autoencoder_dir": str(self.ae_dir)}
        self._finish(base, summary, "diffusion.ckpt")
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
            atomic_torch_save(base.autoencoder.state_dict(), ae_path)
            (self.ae_dir / "autoencoder.ckpt").unlink(missing_ok=True)
        atomic_json(self.ae_dir / "summary.json", summary, indent=2)
        latents = self._encode_pool(base, images, scalars)
        summary["latent_std"] = 1.0 / float(latents["scale_factor"])
        atomic_json(self.ae_dir / "summary.json", summary, indent=2)
        atomic_torch_save(latents, latents_path)
        return latents

    def _finish(self, base: BaseLDM, summary: dict[str, Any], stage_checkpoint: str) -> None:
        """Write the finished model, its summary and the ``done`` mark; the last stage's checkpoint goes."""
        state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
        atomic_torch_save({"state_dict": state, "scale_factor": base.scale_factor,
                           "key": base_model_key(self.profile)}, self.out / "model.pt")
        atomic_json(self.out / "summary.json", summary, indent=2)
        atomic_write_text(self.out / "done", "pretraining finished\n")
        (self.out / stage_checkpoint).unlink(missing_ok=True)

    # -- one stage: core.loop's resumable training loop -----------------------------------------------
    def _loop(self, stage: str, module: torch.nn.Module, cfg, ckpt_path: Path, step_fn) -> dict[str, Any]:
        """Train ``module`` for ``cfg.steps`` steps of ``step_fn(step, gen) -> (loss, logs)``,
        resuming from ``ckpt_path`` if it exists (also one of the loop before core.loop). Returns a summary."""
        steps = int(cfg.steps)
        if steps <= 0:
            raise BaseModelError(f"{stage}.steps must be positive to pretrain the base model, got {steps}")
        lr = float(cfg.lr)
        every = max(1, int(cfg.get("checkpoint_every", max(1, steps // 10))))
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=float(cfg.get("weight_decay", 0.0)))
        gen = torch.Generator().manual_seed(self.seed + SEED_OFFSETS[stage])
        # An exponential moving average of the weights (ema_decay > 0) becomes the final model:
        # samples from short runs improve when the last steps' noise is averaged out.
        decay = float(cfg.get("ema_decay", 0.0) or 0.0)
        if not 0.0 <= decay < 1.0:
            raise BaseModelError(f"{stage}.ema_decay must lie in [0, 1) (0: no averaging), got {decay}")
        settings = loop.LoopSettings(steps, checkpoint_every=every, checkpoint_at_end=False, grad_clip=GRAD_CLIP,
                                     ema_decay=decay, log_weight=LOG_WEIGHT, check_finite=False, desc=stage,
                                     progress=self.progress)
        upgrade_old_checkpoint(ckpt_path)
        r = loop.TrainingLoop(module, opt, lambda step: step_fn(step, gen), settings, checkpoint_path=ckpt_path,
                              lr_at=loop.warmup_cosine_lr(lr, steps, int(cfg.get("warmup_steps", 0)),
                                                         float(cfg.get("lr_floor", LR_FLOOR))),
                              rngs=[gen], on_step=(lambda done, loss, logs: self.callback(stage, done))
                              if self.callback else None).run()
        module.eval()
        return {"steps": steps, "seconds": round(r.seconds, 1), "seconds_per_step": round(r.seconds / steps, 3),
                "ema_decay": decay, **{f"final_{k}": round(v, 6) for k, v in r.running.items()}}

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
            return autoencoder_loss(ae, x, kl_weight, gen)

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
        gen = torch.Generator().manual_seed(self.seed + SEED_OFFSETS["latents"])
        z = mu + sigma * torch.randn(mu.shape, generator=gen)
        return {"mu": mu, "sigma": sigma, "scalars": scalars.clone(),
                "scale_factor": torch.tensor(1.0 / float(z.std()))}

    # -- stage 3: diffusion ---------------------------------------------------------------------
    def _train_diffusion(self, base: BaseLDM, latents: dict[str, torch.Tensor],
                         stage: str = "diffusion") -> dict[str, Any]:
        """Stage 3 (``diffusion``), and stage 5 (``diffusion_finetune``: the same objective with offset
        noise, continuing from stage 3's weights)."""
        cfg = self.profile[stage]
        offset = float(cfg.get("offset_noise", 0.0) or 0.0)
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
            if offset:  # one constant per volume and channel: the noise's spatial mean varies too
                noise = noise + offset * torch.randn((batch, noise.shape[1], 1, 1, 1), generator=gen).to(self.device)
            t = torch.randint(0, num_t, (batch,), generator=gen).to(self.device)
            z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
            pred = base.unet(z_t, t, scalars[idx])
            mse = F.mse_loss(pred.float(), noise)
            return mse, {"mse": mse.detach()}

        return self._loop(stage, base.diffusion, cfg, self.out / f"{stage}.ckpt", step_fn)


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

