"""Model folders of hf-mobility (one self-contained folder per method, loadable with ``trust_remote_code``)."""

from . import auto
from .rqvae import RQVAEConfig, RQVAEModel

__all__ = ["RQVAEConfig", "RQVAEModel", "auto"]
