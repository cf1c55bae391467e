"""BrainLDM loading (paper profile): the bundle's architecture, its weights under MONAI's current
and old (MONAI Generative) key names, and clear errors for missing, mismatched, truncated or
unreadable files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from benchmark.base.model import BaseLDM
from benchmark.base.brainldm import load_brainldm, load_network_weights
from benchmark.base.keys import BaseModelError
from benchmark.base.cache import load_base_model
from benchmark.profiles import load_profile
from tests.test_base_model import cache, data_cache, states_equal  # noqa: F401 (fixtures)

# The bundle's architecture (same levels, blocks, attention, hence the same key layout) at small widths.
PAPER_SMALL = [
    "autoencoder.channels=[8,16,16,16]", "autoencoder.norm_num_groups=8",
    "diffusion.channels=[16,32,48]", "diffusion.num_head_channels=[0,32,48]", "diffusion.norm_num_groups=8",
]


def to_old_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI Generative's names for a current MONAI state dict (the inverse of MONAI's
    ``load_old_state_dict``): upsampling convs were ``conv`` (now ``postconv``), cross-attention
    output projections ``to_out.0`` (now ``out_proj``), self-attention blocks had ``to_q/k/v`` and
    ``proj_attn`` directly on the block (now under ``attn.``)."""
    old = {}
    for key, value in state.items():
        new = key.replace(".postconv.", ".conv.")
        if "transformer_blocks" in new:
            new = re.sub(r"\.(attn[12])\.out_proj\.", r".\1.to_out.0.", new)
        else:
            new = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", new)
            new = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", new)
        old[new] = value.clone()
    return old


def paper_small():
    return load_profile("paper", PAPER_SMALL)


def random_brainldm(seed: int = 0) -> BaseLDM:
    """A randomly initialised network of the bundle's layout (never called pretrained)."""
    torch.manual_seed(seed)
    return BaseLDM.from_profile(paper_small())


def save_bundle(model: BaseLDM, folder: Path, ae_name: str, df_name: str, old: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ae, df = model.autoencoder.state_dict(), model.diffusion.state_dict()
    if old:
        ae, df = to_old_names(ae), to_old_names(df)
    torch.save(ae, folder / ae_name)
    torch.save(df, folder / df_name)


def test_paper_profile_matches_the_bundle_architecture():
    profile = load_profile("paper")
    from benchmark.base.model import autoencoder_config, diffusion_config

    ae, df = autoencoder_config(profile), diffusion_config(profile)
    assert ae["channels"] == (64, 128, 128, 128) and ae["num_res_blocks"] == 2 and ae["latent_channels"] == 3
    assert ae["attention_levels"] == (False,) * 4 and not ae["with_encoder_nonlocal_attn"]
    assert df["channels"] == (256, 512, 768) and df["attention_levels"] == (False, True, True)
    assert df["num_head_channels"] == (0, 512, 768) and df["num_res_blocks"] == 2 and df["resblock_updown"]
    assert df["in_channels"] == 7 and df["out_channels"] == 3 and df["cross_attention_dim"] == 4
    assert profile.diffusion.scale_factor == pytest.approx(0.8962649106979370)


def test_brainldm_loads_new_style_keys(tmp_path, cache):
    model = random_brainldm()
    save_bundle(model, tmp_path / "weights" / "brainldm", "autoencoder.pth", "diffusion_model.pth", old=False)
    loaded = load_base_model(paper_small(), cache, weights_dir=tmp_path / "weights", progress=False)
    assert states_equal(loaded.autoencoder, model.autoencoder)
    assert states_equal(loaded.diffusion, model.diffusion)
    assert loaded.scale_factor == pytest.approx(0.8962649106979370)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not (cache / "base").exists()  # nothing pretrained


def test_brainldm_loads_old_style_keys_from_bundle_layout(tmp_path):
    model = random_brainldm(seed=1)
    models = tmp_path / "weights" / "brain_image_synthesis_latent_diffusion_model" / "models"
    save_bundle(model, models, "autoencoder.pt", "model.pt", old=True)
    old_ae = torch.load(models / "autoencoder.pt")
    old_df = torch.load(models / "model.pt")
    # the files really use the old names, so MONAI's load_old_state_dict is exercised
    assert any(".conv.conv." in k and "decoder.blocks" in k for k in old_ae)
    assert any(".to_out.0." in k for k in old_df) and set(old_df) != set(model.diffusion.state_dict())
    target = BaseLDM.from_profile(paper_small())
    assert load_network_weights(target.autoencoder, models / "autoencoder.pt", "autoencoder") == "old"
    assert load_network_weights(target.diffusion, models / "model.pt", "diffusion model") == "old"
    loaded = load_brainldm(paper_small(), tmp_path / "weights")
    assert states_equal(loaded.autoencoder, model.autoencoder)
    assert states_equal(loaded.diffusion, model.diffusion)
    # and it runs: the noise prediction of BaseLDM.unet on a small latent
    z = torch.randn(1, 3, 4, 4, 4)
    with torch.no_grad():
        eps = loaded.unet(z, torch.tensor([500]), torch.full((1, 4), 0.5))
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def test_brainldm_missing_weights_dir_or_files(tmp_path, cache):
    profile = paper_small()
    with pytest.raises(BaseModelError, match="--weights-dir"):
        load_base_model(profile, cache, weights_dir=None, progress=False)
    with pytest.raises(BaseModelError, match=r"does not exist.*brainldm.*brain_image_synthesis_latent_diffusion_model"):
        load_base_model(profile, cache, weights_dir=tmp_path / "nowhere", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BaseModelError, match=r"missing the autoencoder .*and the diffusion model"):
        load_brainldm(profile, empty)
    model = random_brainldm()
    folder = tmp_path / "half" / "brainldm"
    folder.mkdir(parents=True)
    torch.save(model.autoencoder.state_dict(), folder / "autoencoder.pth")
    with pytest.raises(BaseModelError, match=r"missing the diffusion model \(diffusion_model\.pth or .*into .*brainldm"):
        load_brainldm(profile, tmp_path / "half")

    # the sampling command says the same, as a one-line error, not a traceback
    from benchmark.cli import main

    assert main(["sample", "--profile", "paper", "--n", "1", "--out", str(tmp_path / "s"), "--cache-dir", str(cache),
                 "--weights-dir", str(tmp_path / "half"), "--quiet"]) == 2


def test_brainldm_mismatched_files_name_the_file(tmp_path):
    profile = paper_small()
    model = random_brainldm()
    swapped = tmp_path / "swapped" / "brainldm"
    swapped.mkdir(parents=True)
    torch.save(model.diffusion.state_dict(), swapped / "autoencoder.pth")
    torch.save(model.diffusion.state_dict(), swapped / "diffusion_model.pth")
    with pytest.raises(BaseModelError, match=re.escape(str(swapped / "autoencoder.pth"))):
        load_brainldm(profile, tmp_path / "swapped")

    # the right layout at the wrong width: shapes do not match
    wide = load_profile("paper", [o.replace("[16,32,48]", "[16,32,64]").replace("[0,32,48]", "[0,32,64]")
                                  for o in PAPER_SMALL])
    torch.manual_seed(0)
    other = BaseLDM.from_profile(wide)
    shapes = tmp_path / "shapes" / "brainldm"
    save_bundle(model, shapes, "autoencoder.pth", "diffusion_model.pth", old=False)
    torch.save(other.diffusion.state_dict(), shapes / "diffusion_model.pth")
    with pytest.raises(BaseModelError, match=r"diffusion_model\.pth.*wrong shape"):
        load_brainldm(profile, tmp_path / "shapes")
    torch.save(to_old_names(other.diffusion.state_dict()), shapes / "diffusion_model.pth")
    with pytest.raises(BaseModelError, match=r"diffusion_model\.pth does not match"):
        load_brainldm(profile, tmp_path / "shapes")

    # a truncated file, and a file that is no state dict at all
    partial = dict(list(model.diffusion.state_dict().items())[:-3])
    torch.save(partial, shapes / "diffusion_model.pth")
    with pytest.raises(BaseModelError, match=r"diffusion_model\.pth does not match .* tensors where"):
        load_brainldm(profile, tmp_path / "shapes")
    (shapes / "diffusion_model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BaseModelError, match=r"cannot read .*diffusion_model\.pth"):
        load_brainldm(profile, tmp_path / "shapes")
