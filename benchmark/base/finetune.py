"""Pretraining stages 4 and 5 (:mod:`benchmark.base.pretrain` has stages 1 to 3): each continues from the
finished base model of the profile without it (shipped, cached or pretrained first, by
:func:`benchmark.base.cache.load_base_model`) and trains one part of it further on the same loop.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.base.cache import load_base_model
from benchmark.base.keys import (BaseModelError, _pretrain_indices, _read_json, base_model_dir, base_model_key,
                                 without_decoder_finetune, without_diffusion_finetune)
from benchmark.base.model import BaseLDM
from benchmark.base.pretrain import Pretrainer, load_images
from core.files import atomic_json


class _Finetuner(Pretrainer):
    """A stage that continues from a finished base model."""

    def _start_from(self, start_profile) -> BaseLDM:
        """A later stage's starting point: the base model of ``start_profile`` (shipped, cached or
        pretrained first)."""
        atomic_json(self.out / "config.json", base_model_key(self.profile), indent=2, default=str)
        return load_base_model(start_profile, self.cache_dir, device=self.device, progress=self.progress,
                               step_callback=self.callback)


class DecoderFinetuner(_Finetuner):
    """Stage 4 (``decoder_finetune.steps`` > 0): the decoder alone is trained further on latents
    drawn from the frozen encoder, as Stable Diffusion's fine-tuned VAE decoders were. The encoder,
    the latents, the scale factor and the diffusion model stay exactly those of the profile without
    this stage (pretrained, or loaded from its cache, first), so reconstructions sharpen without
    retraining the diffusion model."""

    def run(self) -> None:
        t_start = time.time()
        start_profile = without_decoder_finetune(self.profile)
        base = self._start_from(start_profile)
        start_summary = _read_json(base_model_dir(start_profile, self.cache_dir) / "summary.json")
        images, _ = load_images(self.profile, self.cache_dir, _pretrain_indices(self.profile),
                                self.progress, "pretraining data")
        summary = self._train_decoder(base, images)
        full = {**start_summary, "decoder_finetune": summary, "seconds_this_call": round(time.time() - t_start, 1),
                "started_from": str(base_model_dir(start_profile, self.cache_dir))}
        self._finish(base, full, "decoder.ckpt")
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


class DiffusionFinetuner(_Finetuner):
    """Stage 5 (``diffusion_finetune.steps`` > 0): the diffusion model of every earlier stage trained on
    with offset noise (Guttenberg 2023: noise plus ``offset_noise`` x one Gaussian constant per volume
    and channel). With plain noise the model never learns the spatial mean of the noise it removes:
    the first DDIM steps then pass the initial noise's mean on, amplified about 40-fold, into the
    sample (the cpu model's black and washed-out samples; docs/BASE_MODEL.md). The
    autoencoder, the latents and the scale factor stay those of the earlier stages."""

    def run(self) -> None:
        t_start = time.time()
        base = self._start_from(without_diffusion_finetune(self.profile))
        start = base.origin
        latents_path = self.ae_dir / "latents.pt"
        if latents_path.is_file():
            latents = torch.load(latents_path, map_location="cpu", weights_only=True)
        else:  # the earlier stages were shipped: encode the pretraining pool as stage 2 does
            images, scalars = load_images(self.profile, self.cache_dir, _pretrain_indices(self.profile),
                                          self.progress, "pretraining data")
            latents = self._encode_pool(base, images, scalars)
        if abs(float(latents["scale_factor"]) - base.scale_factor) > 1e-5 * base.scale_factor:
            raise BaseModelError(f"the latents in {latents_path} (scale factor {float(latents['scale_factor']):.6f}) "
                                 f"are not those of the base model it starts from ({base.scale_factor:.6f}); delete "
                                 f"{self.ae_dir} and run again")
        base.train()
        for p in base.diffusion.parameters():
            p.requires_grad_(True)
        summary = self._train_diffusion(base, latents, stage="diffusion_finetune")
        base.freeze()
        if start.get("source") == "shipped base model":  # its stages are in its provenance
            made = _read_json(Path(start["provenance"]))["base_model"]
            earlier = {**made["stages"], "parameters": made["parameters"], "scale_factor": made["scale_factor"]}
        else:
            earlier = _read_json(Path(start["path"]).parent / "summary.json")
        full = {**earlier, "diffusion_finetune": summary, "seconds_this_call": round(time.time() - t_start, 1),
                "started_from": {k: start.get(k) for k in ("source", "path", "sha256")}}
        self._finish(base, full, "diffusion_finetune.ckpt")
        print(f"base model: diffusion trained on with offset noise in {summary['seconds']:.0f} s ({summary['steps']} "
              f"steps, MSE {summary.get('final_mse', float('nan')):.4f}); cached in {self.out}",
              file=sys.stderr, flush=True)
