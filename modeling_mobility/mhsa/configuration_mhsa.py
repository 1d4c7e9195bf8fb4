"""Configuration of the MHSA next-location predictor (mie-lab "How do you go where?", used downstream of CaLLiPer in
"Into the Unknown", arXiv 2506.14070)."""

from __future__ import annotations

import numbers

from transformers import PreTrainedConfig

__all__ = ["MHSAConfig"]

LOCATION_ENCODERS = ("id", "features")
HEAD_NORMS = ("batch_norm", "layer_norm")
HIDDEN_ACTS = ("gelu", "relu")


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
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}.")
    return value


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
    return value


def _check_vocabulary(name: str, values) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"`{name}` must be a list of strings, got {type(values).__name__}.")
    out = [str(v) for v in values]
    if len(set(out)) != len(out):
        seen, duplicates = set(), []
        for v in out:
            if v in seen and len(duplicates) < 5:
                duplicates.append(v)
            seen.add(v)
        raise ValueError(f"`{name}` must hold distinct ids, got duplicates {duplicates}.")
    return out


class MHSAConfig(PreTrainedConfig):
    r"""
    Configuration of [`MHSAForNextLocation`], the multi-head self-attention next-location predictor of mie-lab
    ("How do you go where?", Hong et al.), as used with frozen CaLLiPer location embeddings in "Into the Unknown"
    (arXiv 2506.14070).

    A causal transformer encoder reads the history (location embedding + time-of-visit embedding + sinusoidal
    position); the output at the last valid step, plus a user embedding and the embedding of the target's time, goes
    through a residual fully connected block to a query vector; candidates are scored by dot product of the query with
    their embeddings, so the candidate set is the location table, not a fixed softmax layer.

    Locations enter in one of two ways (`location_encoder`):

    - `"id"`: a learned ID embedding table (the "Vanilla-E2E" baseline of the paper), tied between input and output.
      Rows of locations that never occurred in training stay untrained; `candidate_mask` (a buffer the training
      script sets) excludes them from the ranking (score `-inf`).
    - `"features"`: a frozen location feature table (`num_locations x location_feature_dim`, e.g. CaLLiPer's 128-d
      embeddings), saved with the weights as a buffer, standardised per dimension (a fixed mean and scale fitted on
      the training locations, also saved) and mapped to `hidden_size` by a trainable linear input projection;
      candidates use the same table through a separate trainable projection, so any location with a feature row
      (also one added after training with [`MHSAForNextLocation.set_location_features`]) can be ranked.

    The defaults are the paper's (FSQ-NYC/TKY configs of "Into the Unknown"): `hidden_size=128`, 6 layers, 8 heads,
    feed-forward 256, GELU, dropout 0.1, BatchNorm in the head.

    Args:
        num_locations (`int`, *optional*):
            Rows of the location table. Defaults to `len(location_ids)`; required when `location_ids` is not given.
        location_ids (`list[str]`, *optional*):
            The location vocabulary: the dataset's location ids in table order (row `i` of the table is
            `location_ids[i]`). Saved with the model so that it maps ids itself.
        num_users (`int`, *optional*):
            Known users. Defaults to `len(user_ids)` (0 when neither is given). The user table has `num_users + 1`
            rows: row 0 is the shared "unknown user" (a zero vector, never trained), user `user_ids[i]` is row `i + 1`.
        user_ids (`list[str]`, *optional*):
            The user vocabulary (training users).
        location_encoder (`str`, *optional*, defaults to `"id"`):
            `"id"` (learned ID table) or `"features"` (frozen feature table + trainable projections).
        location_feature_dim (`int`, *optional*, defaults to 128):
            Width of the frozen feature table (`"features"` only; CaLLiPer: 128).
        location_features_source (`str`, *optional*):
            Where the feature table came from (e.g. the CaLLiPer folder); informational.
        location_residual (`bool`, *optional*, defaults to `False`):
            `"features"` only, an hf-mobility choice: add a learned per-location residual embedding (tied between input
            and candidates, zero-initialised) to the projected features of the locations seen in training
            (`residual_mask`, set by the training script); other locations (unseen, or added later) keep a zero
            residual and are represented by their features alone. Frozen coordinate-text embeddings of nearby places
            of the same kind are nearly equal, so without it the model can hardly tell two such places apart; the
            published model gets this capacity from its softmax layer over training IDs.
        history_bias (`bool`, *optional*, defaults to `False`):
            An hf-mobility choice (not in the published model): add to every candidate's score a bias computed from
            the sample's own history, `w . [visited, log(1 + visits), 1 / (1 + visits since its last visit)]`, with
            three learned weights `w`. People mostly return to places they know; the
            bias depends on the place's role in the history, never on its identity, so it applies equally to a place
            never seen in training (inductive setting) and lets the model "copy" from the history. Off in the paper
            recipes.
        hidden_size (`int`, *optional*, defaults to 128):
            Model width `d` (`base_emb_size` in the mie-lab code).
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Transformer encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 256):
            Width of each layer's feed-forward block.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation, `"gelu"` or `"relu"`.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the input embeddings and inside every encoder layer.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the attention weights.
        head_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout in the residual fully connected head.
        head_norm (`str`, *optional*, defaults to `"batch_norm"`):
            Normalisation of the head's residual block: `"batch_norm"` (the paper) or `"layer_norm"`.
        use_user_embedding (`bool`, *optional*, defaults to `True`):
            Whether the user embedding is added at the head.
        use_target_time (`bool`, *optional*, defaults to `True`):
            Whether the embedding of the target's time (hour, quarter of hour, weekday; known at prediction time) is
            added to the head input. The mie-lab model does not use it; it costs three small tables.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the layer norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of embeddings and linear weights.

    Example:

    ```python
    >>> from modeling_mobility.mhsa import MHSAConfig, MHSAForNextLocation

    >>> config = MHSAConfig(location_ids=["a", "b", "c"], user_ids=["u1"], hidden_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=4, intermediate_size=64)
    >>> model = MHSAForNextLocation(config)

    ```"""

    model_type = "hf-mobility-mhsa"

    def __init__(
        self,
        num_locations: int | None = None,
        location_ids: list[str] | None = None,
        num_users: int | None = None,
        user_ids: list[str] | None = None,
        location_encoder: str = "id",
        location_feature_dim: int = 128,
        location_features_source: str | None = None,
        location_residual: bool = False,
        history_bias: bool = False,
        hidden_size: int = 128,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        intermediate_size: int = 256,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        head_dropout_prob: float = 0.1,
        head_norm: str = "batch_norm",
        use_user_embedding: bool = True,
        use_target_time: bool = True,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.location_ids = _check_vocabulary("location_ids", location_ids)
        if num_locations is None:
            if self.location_ids is None:
                num_locations = 1  # a placeholder config (e.g. `MHSAConfig()` for inspection); tables need real sizes
            else:
                num_locations = len(self.location_ids)
        self.num_locations = _check_int("num_locations", num_locations, 1)
        if self.location_ids is not None and len(self.location_ids) != self.num_locations:
            raise ValueError(
                f"`num_locations` ({self.num_locations}) must equal len(location_ids) ({len(self.location_ids)})."
            )
        self.user_ids = _check_vocabulary("user_ids", user_ids)
        if num_users is None:
            num_users = 0 if self.user_ids is None else len(self.user_ids)
        self.num_users = _check_int("num_users", num_users, 0)
        if self.user_ids is not None and len(self.user_ids) != self.num_users:
            raise ValueError(f"`num_users` ({self.num_users}) must equal len(user_ids) ({len(self.user_ids)}).")
        self.location_encoder = _check_choice("location_encoder", location_encoder, LOCATION_ENCODERS)
        self.location_feature_dim = _check_int("location_feature_dim", location_feature_dim, 1)
        if location_features_source is not None and not isinstance(location_features_source, str):
            raise ValueError(f"`location_features_source` must be a string or None, got {location_features_source!r}.")
        self.location_features_source = location_features_source
        self.location_residual = _check_bool("location_residual", location_residual)
        if self.location_residual and self.location_encoder != "features":
            raise ValueError("`location_residual=True` needs `location_encoder='features'` (the ID variant is all ID).")
        self.history_bias = _check_bool("history_bias", history_bias)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_hidden_layers = _check_int("num_hidden_layers", num_hidden_layers, 1)
        self.num_attention_heads = _check_int("num_attention_heads", num_attention_heads, 1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.hidden_size % 2:
            raise ValueError(f"`hidden_size` must be even (sinusoidal positions), got {self.hidden_size}.")
        self.intermediate_size = _check_int("intermediate_size", intermediate_size, 1)
        self.hidden_act = _check_choice("hidden_act", hidden_act, HIDDEN_ACTS)
        self.hidden_dropout_prob = _check_float("hidden_dropout_prob", hidden_dropout_prob, 0.0, maximum=1.0)
        self.attention_probs_dropout_prob = _check_float(
            "attention_probs_dropout_prob", attention_probs_dropout_prob, 0.0, maximum=1.0
        )
        self.head_dropout_prob = _check_float("head_dropout_prob", head_dropout_prob, 0.0, maximum=1.0)
        self.head_norm = _check_choice("head_norm", head_norm, HEAD_NORMS)
        self.use_user_embedding = _check_bool("use_user_embedding", use_user_embedding)
        self.use_target_time = _check_bool("use_target_time", use_target_time)
        self.layer_norm_eps = _check_float("layer_norm_eps", layer_norm_eps, 0.0, inclusive=False)
        self.initializer_range = _check_float("initializer_range", initializer_range, 0.0, inclusive=False)
        super().__init__(**kwargs)
