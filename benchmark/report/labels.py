"""What the tables and figures call the runs that train no registered method (their stored names are
``benchmark.run.spec``'s constants; a label here may change freely, a stored name may not)."""
from __future__ import annotations

from benchmark.run.spec import AUTOENCODER, BASE_UNCONDITIONED, REFERENCE, REFERENCE_OTHER

REFERENCE_ROW = "reference (real vs real)"  # real volumes against their own conditions: the Dice ceiling
OTHER_ROW = "real, another subject's condition"  # a perfect generator that ignores its condition
BASE_ROW = "base model, unconditioned"  # no spatial control: the Dice its anatomical prior alone reaches
AUTOENCODER_ROW = "autoencoder reconstruction"  # test volumes encoded and decoded: what a latent generator can reach
PSEUDO_METHODS = {REFERENCE: REFERENCE_ROW, AUTOENCODER: AUTOENCODER_ROW, REFERENCE_OTHER: OTHER_ROW,
                  BASE_UNCONDITIONED: BASE_ROW}


def method_label(method: str) -> str:
    """The label of a run's ``method`` in a table or figure: the pseudo-methods by what they are."""
    return PSEUDO_METHODS.get(method, method)

