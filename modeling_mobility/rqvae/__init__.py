"""RQ-VAE location quantizer (QT-Mob). Importing this package registers the classes for `save_pretrained`, so a saved
folder carries its code (`auto_map` + the two files) and loads with `trust_remote_code=True`."""

from .configuration_rqvae import RQVAEConfig
from .modeling_rqvae import RQVAEModel, RQVAEOutput, RQVAEPreTrainedModel, codebook_statistics

RQVAEConfig.register_for_auto_class()
RQVAEModel.register_for_auto_class("AutoModel")

__all__ = ["RQVAEConfig", "RQVAEModel", "RQVAEOutput", "RQVAEPreTrainedModel", "codebook_statistics"]
