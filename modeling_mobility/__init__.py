"""Model folders of hf-mobility (one self-contained folder per method, loadable with ``trust_remote_code``)."""

from . import auto
from .calliper import CaLLiPerConfig, CaLLiPerModel
from .m3ob import M3obConfig, M3obForNextLocation
from .mhsa import MHSAConfig, MHSAForNextLocation
from .nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation
from .rqvae import RQVAEConfig, RQVAEModel

__all__ = ["CaLLiPerConfig", "CaLLiPerModel", "M3obConfig", "M3obForNextLocation", "MHSAConfig", "MHSAForNextLocation", "NextLocMoEConfig",
           "NextLocMoEForNextLocation", "RQVAEConfig", "RQVAEModel", "auto"]
