"""Configuration of the RQ-VAE location quantizer (QT-Mob, arXiv 2506.11109; ancestor: LC-Rec / TIGER)."""

from __future__ import annotations

import numbers

from transformers import PreTrainedConfig

__all__ = ["RQVAEConfig"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_float(name: str, value, minimum: float, *, inclusive: bool = True, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    value = float(value)
    low_ok = value >= minimum if inclusive else value > minimum
    high_ok = maximum is None or value < maximum
    if not (low_ok and high_ok):
        bounds = f"{'>=' if inclusive else '>'} {minimum}" + (f" and < {maximum}" if maximum is not None else "")
        raise ValueError(f"`{name}` must be {bounds}, got {value!r}.")
    return value


def _check_bool(name: str, value) -> bool:
    # A real bool only: the ancestors parsed `--bn False` with `type=bool`, which silently turned BatchNorm on.
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}.")
    return value


class RQVAEConfig(PreTrainedConfig):
    r"""
    Configuration of [`RQVAEModel`], the residual-quantized variational auto-encoder that turns a location's semantic
    embedding into a short tuple of discrete codes (one per level), as in QT-Mob (Section 4.2 of arXiv 2506.11109).

    An MLP encoder maps the embedding to a `code_dim` latent; `num_quantizers` residual codebooks quantize it coarse
    to fine; a mirrored MLP decoder reconstructs the embedding from the sum of the chosen code vectors.

    The defaults are a CPU-friendly setting for 384-d sentence-transformer embeddings (all-MiniLM-L6-v2). The paper
    setting embeds descriptions with Llama-3.2-1B-Instruct (mean-pooled, 2048-d) and uses
    `input_dim=2048, hidden_sizes=[2048, 1024, 512, 256, 128, 64], code_dim=32, num_quantizers=4, codebook_size=64`,
    `commitment_weight=0.25` and Sinkhorn on the last level with `sinkhorn_epsilon=0.003`, 50 iterations (LC-Rec uses
    256 codes per level with the same encoder).

    Args:
        input_dim (`int`, *optional*, defaults to 384):
            Size of the input embeddings.
        hidden_sizes (`list[int]`, *optional*, defaults to `[256, 128, 64]`):
            Widths of the encoder's hidden layers, input side first. The decoder mirrors them. May be empty (a single
            linear map each way).
        code_dim (`int`, *optional*, defaults to 32):
            Size of the latent and of every code vector (`e_dim` in the paper code).
        num_quantizers (`int`, *optional*, defaults to 4):
            Number of residual levels, i.e. codes per location.
        codebook_size (`int`, *optional*, defaults to 64):
            Codes per level (the same for every level). `codebook_size ** num_quantizers` is the number of distinct
            locations that can get a unique code.
        commitment_weight (`float`, *optional*, defaults to 0.25):
            Weight β of the commitment term in each level's loss `||sg[r] - e||² + β ||r - sg[e]||²`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability after every hidden layer of encoder and decoder.
        use_batch_norm (`bool`, *optional*, defaults to `False`):
            Whether to add `BatchNorm1d` after every hidden linear layer. Must be a real bool.
        sinkhorn_epsilon (`float`, *optional*, defaults to 0.003):
            Entropic regularisation of the Sinkhorn-balanced assignment on the last level (distances are first
            centred and scaled to [-1, 1]).
        sinkhorn_iterations (`int`, *optional*, defaults to 50):
            Sinkhorn-Knopp iterations. 0 disables the balancing (plain nearest code).
        sinkhorn_last_level (`bool`, *optional*, defaults to `True`):
            Whether the last level uses the Sinkhorn-balanced assignment over the batch during training and, by
            default, in [`RQVAEModel.get_codes`].
        kmeans_iterations (`int`, *optional*, defaults to 50):
            Lloyd iterations of the k-means(++) initialisation of each codebook.
        dead_code_threshold (`int`, *optional*, defaults to 1):
            Codes assigned fewer than this many rows (counted over an epoch) are re-seeded with random residuals of
            their level by [`RQVAEModel.reseed_dead_codes`]. 0 disables re-seeding.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the codebooks (before k-means initialisation).

    Example:

    ```python
    >>> from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel

    >>> config = RQVAEConfig(input_dim=384, num_quantizers=3, codebook_size=32)
    >>> model = RQVAEModel(config)
    ```"""

    model_type = "hf-mobility-rqvae"

    def __init__(
        self,
        input_dim: int = 384,
        hidden_sizes: list[int] | tuple[int, ...] | None = None,
        code_dim: int = 32,
        num_quantizers: int = 4,
        codebook_size: int = 64,
        commitment_weight: float = 0.25,
        dropout: float = 0.0,
        use_batch_norm: bool = False,
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iterations: int = 50,
        sinkhorn_last_level: bool = True,
        kmeans_iterations: int = 50,
        dead_code_threshold: int = 1,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if hidden_sizes is None:
            hidden_sizes = [256, 128, 64]
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, (list, tuple)):
            raise ValueError(f"`hidden_sizes` must be a list of positive integers, got {hidden_sizes!r}.")
        self.input_dim = _check_int("input_dim", input_dim, 1)
        self.hidden_sizes = [_check_int(f"hidden_sizes[{i}]", h, 1) for i, h in enumerate(hidden_sizes)]
        self.code_dim = _check_int("code_dim", code_dim, 1)
        self.num_quantizers = _check_int("num_quantizers", num_quantizers, 1)
        self.codebook_size = _check_int("codebook_size", codebook_size, 2)
        self.commitment_weight = _check_float("commitment_weight", commitment_weight, 0.0)
        self.dropout = _check_float("dropout", dropout, 0.0, maximum=1.0)
        self.use_batch_norm = _check_bool("use_batch_norm", use_batch_norm)
        self.sinkhorn_epsilon = _check_float("sinkhorn_epsilon", sinkhorn_epsilon, 0.0, inclusive=False)
        self.sinkhorn_iterations = _check_int("sinkhorn_iterations", sinkhorn_iterations, 0)
        self.sinkhorn_last_level = _check_bool("sinkhorn_last_level", sinkhorn_last_level)
        self.kmeans_iterations = _check_int("kmeans_iterations", kmeans_iterations, 0)
        self.dead_code_threshold = _check_int("dead_code_threshold", dead_code_threshold, 0)
        self.initializer_range = _check_float("initializer_range", initializer_range, 0.0, inclusive=False)
        super().__init__(**kwargs)

    @property
    def max_unique_codes(self) -> int:
        """Number of distinct code tuples, `codebook_size ** num_quantizers`."""
        return self.codebook_size**self.num_quantizers
