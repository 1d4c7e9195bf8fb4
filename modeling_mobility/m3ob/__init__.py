"""M3ob multi-modal next-location recommender (Dai et al., arXiv 2512.22605). Importing this package registers the
classes for `save_pretrained`, so a saved folder carries its code (`auto_map` + the two files) and loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)`."""

from .configuration_m3ob import M3obConfig
from .modeling_m3ob import (
    M3obForNextLocation,
    M3obNodeRepresentations,
    M3obOutput,
    M3obPreTrainedModel,
    build_knn_graph,
    symmetric_info_nce,
    time_ids_from_timestamps,
)

M3obConfig.register_for_auto_class()
M3obForNextLocation.register_for_auto_class("AutoModel")

__all__ = [
    "M3obConfig",
    "M3obForNextLocation",
    "M3obNodeRepresentations",
    "M3obOutput",
    "M3obPreTrainedModel",
    "build_knn_graph",
    "symmetric_info_nce",
    "time_ids_from_timestamps",
]
