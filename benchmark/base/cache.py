"""Which base model a profile gets, and where it is cached.

``load_base_model(profile, cache_dir)`` returns a frozen :class:`~benchmark.base.model.BaseLDM`:
the shipped model when the profile matches it (``base_weights: shipped``), BrainLDM weights
(``base_weights: brainldm``), or the suite's own pretrained model from ``<cache_dir>/base/<hash>/``,
pretraining it first (:mod:`benchmark.base.pretrain`) when the cache holds none. The hash covers
everything that decides the weights (:func:`base_model_key`)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark.base import shipped
from benchmark.base.model import BaseLDM
from core.files import file_lock, sha256_file


CODE_VERSION = 1  # bump when a change here changes the weights that pretraining produces



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
            from benchmark.base.pretrain import _DecoderFinetuner, _Pretrainer

            if decoder_finetune_steps(profile) > 0:
                _DecoderFinetuner(profile, cache_dir, device, progress, step_callback).run()
            else:
                _Pretrainer(profile, cache_dir, device, progress, step_callback).run()
        elif progress:
            print(f"base model: loaded from {out}", file=sys.stderr, flush=True)
        base = _load_cached(profile, out, device)
    base.origin = {"source": "pretrained by the suite (cache)", "path": str(out / "model.pt"),
                   "sha256": sha256_file(out / "model.pt", prefix=64)}
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
# the pretraining pool and the cache folder's lock
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



def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}



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
