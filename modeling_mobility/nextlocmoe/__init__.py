"""NextLocMoE next-location regressor (Liu et al., arXiv 2505.24597). Importing this package registers the classes for
`save_pretrained`, so a saved folder carries its code (`auto_map` + the two files) and loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)`."""

from .configuration_nextlocmoe import NextLocMoEConfig
from .modeling_nextlocmoe import (
    HistoryAwareRouter,
    NextLocMoEForNextLocation,
    NextLocMoEOutput,
    NextLocMoEPreTrainedModel,
    PersonalizedMoEMLP,
    TemporalConvNet,
    threshold_routing,
    topk_routing,
)

NextLocMoEConfig.register_for_auto_class()
NextLocMoEForNextLocation.register_for_auto_class("AutoModel")

__all__ = [
    "HistoryAwareRouter",
    "NextLocMoEConfig",
    "NextLocMoEForNextLocation",
    "NextLocMoEOutput",
    "NextLocMoEPreTrainedModel",
    "PersonalizedMoEMLP",
    "TemporalConvNet",
    "threshold_routing",
    "topk_routing",
]
