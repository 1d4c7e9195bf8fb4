"""Configuration of the CaLLiPer location encoder (Wang et al., CEUS 2025; next-location use: arXiv 2506.14070)."""

from __future__ import annotations

import math
import numbers

from transformers import PreTrainedConfig

__all__ = ["CaLLiPerConfig"]

# Scale ranges used when `min_lambda` / `max_lambda` are left out: the FSQ-NYC setting of "Into the Unknown" for
# longitude/latitude in degrees, the London (British National Grid) setting of CaLLiPer for projected metres.
DEFAULT_LAMBDAS = {"degrees": (0.01, 10.0), "metres": (100.0, 10000.0)}
_UNIT_ALIASES = {
    "degrees": "degrees",
    "degree": "degrees",
    "deg": "degrees",
    "metres": "metres",
    "meters": "metres",
    "metre": "metres",
    "meter": "metres",
    "m": "metres",
}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_float(
    name: str, value, *, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if exclusive else '>='} {minimum}, got {value!r}.")
    if maximum is not None and value >= maximum:
        raise ValueError(f"`{name}` must be < {maximum}, got {value!r}.")
    return value


class CaLLiPerConfig(PreTrainedConfig):
    r"""
    Configuration of [`CaLLiPerModel`], the CaLLiPer location encoder: a multi-scale sinusoidal ("grid", Space2Vec)
    encoding of a coordinate pair followed by a residual fully connected network, trained contrastively against the
    frozen sentence embeddings of point-of-interest texts (CaLLiPer, Wang et al., CEUS 2025). The trained encoder
    embeds *any* coordinate, seen in training or not, which is what "Into the Unknown" (arXiv 2506.14070) uses for
    next-location prediction with unseen locations.

    The defaults are the FSQ-NYC setting of "Into the Unknown": longitude/latitude in degrees, `frequency_num=32`,
    scales 0.01 to 10 degrees, hidden width 256 with 4 residual blocks and dropout 0.5, 128-d output, 384-d text
    embeddings (all-MiniLM-L6-v2). CaLLiPer's London setting uses projected British National Grid metres with scales
    100 m to 10,000 m (`coordinate_unit="metres"`, the default scales for that unit).

    Args:
        frequency_num (`int`, *optional*, defaults to 32):
            Number of scales `S` of the grid encoding. The encoding has `4 * frequency_num` features (sin and cos per
            scale and per coordinate).
        min_lambda (`float`, *optional*):
            Smallest scale, in `coordinate_unit`s. Defaults to 0.01 for degrees and 100 for metres.
        max_lambda (`float`, *optional*):
            Largest scale, in `coordinate_unit`s; must exceed `min_lambda`. Defaults to 10 for degrees and 10,000 for
            metres.
        coordinate_unit (`str`, *optional*, defaults to `"degrees"`):
            `"degrees"`: inputs are (longitude, latitude) in degrees, checked to lie in [-180, 180] x [-90, 90].
            `"metres"`: inputs are projected (x, y) = (easting, northing) in metres (e.g. British National Grid).
            `"meters"` is accepted and stored as `"metres"`.
        hidden_size (`int`, *optional*, defaults to 256):
            Width of the fully connected network.
        num_residual_blocks (`int`, *optional*, defaults to 4):
            Residual blocks `x + ReLU(W2 Dropout(ReLU(W1 x)))` after the input layer. May be 0.
        dropout (`float`, *optional*, defaults to 0.5):
            Dropout probability inside every residual block (0.5 as in the original code).
        embedding_dim (`int`, *optional*, defaults to 128):
            Size of the location embedding and of the projected text embedding.
        text_embedding_dim (`int`, *optional*, defaults to 384):
            Size of the frozen sentence embeddings given to the text projection (384 for all-MiniLM-L6-v2).
        logit_scale_init_value (`float`, *optional*, defaults to `log(1 / 0.07)`):
            Initial value of the learnable log temperature (CLIP's initialisation).
        logit_scale_min (`float`, *optional*, defaults to 0.0):
            Lower bound of the log temperature.
        logit_scale_max (`float`, *optional*, defaults to `log(100)`):
            Upper bound of the log temperature, so that the logit scale is at most 100 as in CLIP. `None` removes the
            cap (the original CaLLiPer has none; the clamp is an hf-mobility choice).

    Example:

    ```python
    >>> from modeling_mobility.calliper import CaLLiPerConfig, CaLLiPerModel

    >>> config = CaLLiPerConfig()  # longitude/latitude in degrees, scales 0.01 to 10 degrees
    >>> model = CaLLiPerModel(config)
    >>> CaLLiPerConfig(coordinate_unit="metres").min_lambda  # projected metres: 100 m to 10 km by default
    100.0
    ```"""

    model_type = "hf-mobility-calliper"

    def __init__(
        self,
        frequency_num: int = 32,
        min_lambda: float | None = None,
        max_lambda: float | None = None,
        coordinate_unit: str = "degrees",
        hidden_size: int = 256,
        num_residual_blocks: int = 4,
        dropout: float = 0.5,
        embedding_dim: int = 128,
        text_embedding_dim: int = 384,
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_min: float = 0.0,
        logit_scale_max: float | None = math.log(100.0),
        **kwargs,
    ):
        unit = _UNIT_ALIASES.get(coordinate_unit.strip().lower()) if isinstance(coordinate_unit, str) else None
        if unit is None:
            raise ValueError(f"`coordinate_unit` must be 'degrees' or 'metres', got {coordinate_unit!r}.")
        self.coordinate_unit = unit
        default_min, default_max = DEFAULT_LAMBDAS[unit]
        self.frequency_num = _check_int("frequency_num", frequency_num, 1)
        self.min_lambda = _check_float(
            "min_lambda", default_min if min_lambda is None else min_lambda, minimum=0.0, exclusive=True
        )
        self.max_lambda = _check_float("max_lambda", default_max if max_lambda is None else max_lambda)
        if self.max_lambda <= self.min_lambda:
            raise ValueError(f"`max_lambda` ({self.max_lambda}) must be larger than `min_lambda` ({self.min_lambda}).")
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_residual_blocks = _check_int("num_residual_blocks", num_residual_blocks, 0)
        self.dropout = _check_float("dropout", dropout, minimum=0.0, maximum=1.0)
        self.embedding_dim = _check_int("embedding_dim", embedding_dim, 1)
        self.text_embedding_dim = _check_int("text_embedding_dim", text_embedding_dim, 1)
        self.logit_scale_init_value = _check_float("logit_scale_init_value", logit_scale_init_value)
        self.logit_scale_min = _check_float("logit_scale_min", logit_scale_min)
        self.logit_scale_max = None if logit_scale_max is None else _check_float("logit_scale_max", logit_scale_max)
        upper = math.inf if self.logit_scale_max is None else self.logit_scale_max
        if not self.logit_scale_min <= self.logit_scale_init_value <= upper:
            raise ValueError(
                f"`logit_scale_init_value` ({self.logit_scale_init_value}) must lie in [logit_scale_min, "
                f"logit_scale_max] = [{self.logit_scale_min}, {self.logit_scale_max}]."
            )
        super().__init__(**kwargs)

    @property
    def positional_encoding_dim(self) -> int:
        """Features of the grid encoding of a 2-d coordinate: `4 * frequency_num`."""
        return 4 * self.frequency_num
