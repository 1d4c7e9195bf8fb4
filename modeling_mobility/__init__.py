"""Model folders of hf-mobility (one self-contained folder per method, loadable with ``trust_remote_code``)."""

from . import auto
from .calliper import CaLLiPerConfig, CaLLiPerModel
from .mhsa import MHSAConfig, MHSAForNextLocation
from .nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation
from .rqvae import RQVAEConfig, RQVAEModel

__all__ = ["CaLLiPerConfig", "CaLLiPerModel", "MHSAConfig", "MHSAForNextLocation", "NextLocMoEConfig",
           "NextLocMoEForNextLocation", "RQVAEConfig", "RQVAEModel", "auto"]
