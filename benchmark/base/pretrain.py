"""Pretraining the base model (BrainLDM's architecture, scaled down by the profile) on the
*pretraining pool* of the synthetic population only (never the benchmark pool or the test set).
Where the result is cached and when it is reused: :mod:`benchmark.base.cache`.

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

``python run_benchmark.py pretrain --profile cpu [--eval]`` pretrains (or loads) and, with ``--eval``,
reports the autoencoder's reconstruction quality on the test split.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from benchmark.base.model import BaseLDM
from benchmark.base.cache import (BaseModelError, StepCallback, _lock, _pretrain_indices, _read_json, autoencoder_dir,
                                    base_model_dir, base_model_key, load_base_model,
                                    without_decoder_finetune)


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


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1.0)
    return kl.flatten(1).sum(1).mean()


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

