"""BrainLDM (the MONAI model-zoo bundle ``brain_image_synthesis_latent_diffusion_model``) for the
``paper`` profile: finding its files in ``--weights-dir`` and loading them into the suite's BaseLDM."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from benchmark.base.model import BaseLDM
from benchmark.base.keys import BaseModelError
from core.files import read_state_dict, sha256_file


BUNDLE_NAME = "brain_image_synthesis_latent_diffusion_model"



BUNDLE_URL = "https://github.com/Project-MONAI/model-zoo/tree/dev/models/" + BUNDLE_NAME



# The bundle's files: new zoo releases use models/autoencoder.pt and models/model.pt.
AUTOENCODER_FILES = ("autoencoder.pth", "autoencoder.pt")



DIFFUSION_FILES = ("diffusion_model.pth", "diffusion_model.pt", "model.pt", "model.pth")



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



def load_network_weights(net: torch.nn.Module, path: Path, what: str) -> str:
    """Load ``path`` into ``net``: directly when its keys are the current MONAI names, else through
    MONAI's ``load_old_state_dict`` (MONAI Generative's names, as in the bundle). Every parameter
    of ``net`` must come from the file, and every tensor of the file must be used.
    Returns ``"new"`` or ``"old"`` (the key style found)."""
    state = read_state_dict(path, f"BrainLDM's {what}", error=BaseModelError,
                            todo=f"replace it with the file from {_where_to_get()}")
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
    base.origin = {"source": "BrainLDM weights", "path": str(df_path), "sha256": sha256_file(df_path, prefix=64),
                   "autoencoder_path": str(ae_path), "autoencoder_sha256": sha256_file(ae_path, prefix=64)}
    return base.to(device).freeze()
