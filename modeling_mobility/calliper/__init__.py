"""CaLLiPer location encoder (Wang et al., CEUS 2025; "Into the Unknown", arXiv 2506.14070). Importing this package
registers the classes for `save_pretrained`, so a saved folder carries its code (`auto_map` + the two files) and loads
with `AutoModel.from_pretrained(folder, trust_remote_code=True)`."""

from .configuration_calliper import CaLLiPerConfig
from .modeling_calliper import (
    CaLLiPerModel,
    CaLLiPerOutput,
    CaLLiPerPreTrainedModel,
    contrastive_loss,
    grid_frequencies,
    space2vec_grid_encoding,
)

CaLLiPerConfig.register_for_auto_class()
CaLLiPerModel.register_for_auto_class("AutoModel")

__all__ = [
    "CaLLiPerConfig",
    "CaLLiPerModel",
    "CaLLiPerOutput",
    "CaLLiPerPreTrainedModel",
    "contrastive_loss",
    "grid_frequencies",
    "space2vec_grid_encoding",
]
