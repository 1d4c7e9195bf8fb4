"""The one place where hf-mobility's models are registered with the `transformers` Auto classes for in-library use.

Importing `modeling_mobility` runs this, so `AutoConfig.from_pretrained(folder)` and
`AutoModel.from_pretrained(folder)` resolve our `model_type`s without `trust_remote_code`. Saved folders also carry
their code (`auto_map`), so outside the library `AutoModel.from_pretrained(folder, trust_remote_code=True)` works.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from .calliper import CaLLiPerConfig, CaLLiPerModel
from .m3ob import M3obConfig, M3obForNextLocation
from .mhsa import MHSAConfig, MHSAForNextLocation
from .nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation
from .rqvae import RQVAEConfig, RQVAEModel

__all__ = ["register_auto_classes"]


def register_auto_classes() -> None:
    """Register every model of the library with `AutoConfig`/`AutoModel` (idempotent)."""
    pairs = (
        (RQVAEConfig, RQVAEModel),
        (CaLLiPerConfig, CaLLiPerModel),
        (MHSAConfig, MHSAForNextLocation),
        (NextLocMoEConfig, NextLocMoEForNextLocation),
        (M3obConfig, M3obForNextLocation),
    )
    for config_class, model_class in pairs:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)


register_auto_classes()
