"""Which base model a profile gets, and where it is cached.

``load_base_model(profile, cache_dir)`` returns a frozen :class:`~benchmark.base.model.BaseLDM`:
the shipped model when the profile matches it (``base_weights: shipped``), BrainLDM weights
(``base_weights: brainldm``), or the suite's own pretrained model from ``<cache_dir>/base/<hash>/``,
pretraining it first (:mod:`benchmark.base.pretrain`) when the cache holds none. The hash covers
everything that decides the weights (:func:`base_model_key`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmark.base import shipped
from benchmark.base.model import BaseLDM
from benchmark.base.keys import (BaseModelError, StepCallback, base_model_dir, base_model_key, base_source,
                                 decoder_finetune_steps, diffusion_finetune_steps)
from core.files import file_lock, sha256_file


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
        from benchmark.base.brainldm import _where_to_get, load_brainldm

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
    with file_lock(out / "lock"):  # two processes never pretrain the same model at once
        if not (out / "done").is_file():
            from benchmark.base.finetune import DecoderFinetuner, DiffusionFinetuner
            from benchmark.base.pretrain import Pretrainer

            if diffusion_finetune_steps(profile) > 0:
                DiffusionFinetuner(profile, cache_dir, device, progress, step_callback).run()
            elif decoder_finetune_steps(profile) > 0:
                DecoderFinetuner(profile, cache_dir, device, progress, step_callback).run()
            else:
                Pretrainer(profile, cache_dir, device, progress, step_callback).run()
        elif progress:
            print(f"base model: loaded from {out}", file=sys.stderr, flush=True)
        base = _load_cached(profile, out, device)
    base.origin = {"source": "pretrained by the suite (cache)", "path": str(out / "model.pt"),
                   "sha256": sha256_file(out / "model.pt", prefix=64)}
    return base


def base_model_sha256(profile, cache_dir: str | Path, weights_dir: str | Path | None = None) -> str | None:
    """The sha256 of the base model file ``load_base_model`` would load now, found without building the
    network (what a record's ``base_model.sha256`` is checked against); None when there is none yet (the
    suite would pretrain it first) or the BrainLDM files cannot be found."""
    source = base_source(profile)
    if source == "brainldm":
        from benchmark.base.brainldm import find_brainldm_files

        try:
            return sha256_file(find_brainldm_files(weights_dir)[1], prefix=64) if weights_dir else None
        except (BaseModelError, OSError):
            return None
    if source == "shipped":
        found, _ = shipped.find_base_model(base_model_key(profile), str(profile.get("name", "?")))
        if found is not None:
            return shipped.provenance(found.parent)["files"][found.name]["sha256"]
    out = base_model_dir(profile, cache_dir)
    return sha256_file(out / "model.pt", prefix=64) if (out / "done").is_file() else None


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
