"""What decides a base model's weights, and where its cache lives: the keys and hashes of a profile's
base model and autoencoder, their cache folders, the pretraining pool, and the base-model error.
Used by loading (:mod:`benchmark.base.cache`), pretraining and the shipped folders."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Callable


BASE_MODEL_CODE_VERSION = 1  # bump when a change here changes the weights that pretraining produces



StepCallback = Callable[[str, int], None]



class BaseModelError(ValueError):
    """The base model cannot be pretrained or loaded as configured."""



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
        "code_version": BASE_MODEL_CODE_VERSION,
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
    if diffusion_finetune_steps(profile) > 0:
        key["diffusion_finetune"] = profile.diffusion_finetune.to_dict()
    return key



def decoder_finetune_steps(profile) -> int:
    section = profile.get("decoder_finetune")
    return int(section.get("steps", 0)) if section is not None else 0



def diffusion_finetune_steps(profile) -> int:
    section = profile.get("diffusion_finetune")
    return int(section.get("steps", 0)) if section is not None else 0


def without_diffusion_finetune(profile):
    """The profile whose base model the offset-noise stage starts from (every earlier stage). Its
    ``base_weights`` stay the profile's: a shipped model of the earlier stages is a valid start."""
    from benchmark.profiles import Profile

    return Profile({k: v for k, v in profile.to_dict().items() if k != "diffusion_finetune"})


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
