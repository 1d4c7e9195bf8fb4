"""MHSA next-location predictor (mie-lab; downstream model of CaLLiPer in "Into the Unknown", arXiv 2506.14070).
Importing this package registers the classes for `save_pretrained`, so a saved folder carries its code (`auto_map` +
the two files) and loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`."""

from .configuration_mhsa import MHSAConfig
from .modeling_mhsa import (
    MHSAForNextLocation,
    MHSAOutput,
    MHSAPreTrainedModel,
    time_ids_from_timestamps,
)

MHSAConfig.register_for_auto_class()
MHSAForNextLocation.register_for_auto_class("AutoModel")

__all__ = ["MHSAConfig", "MHSAForNextLocation", "MHSAOutput", "MHSAPreTrainedModel", "time_ids_from_timestamps"]
