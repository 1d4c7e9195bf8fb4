"""MHSA next-location predictor: the multi-head self-attention model of mie-lab ("How do you go where?", Hong et al.),
as used downstream of frozen CaLLiPer location embeddings in "Into the Unknown" (arXiv 2506.14070).

A sample is a user's history (visited locations with their local times) and the time of the next visit; the model
scores candidate locations for that next visit.

- Input step `t`: location embedding + time embedding (hour of day (24) + quarter of the hour (4) + weekday (7)),
  scaled by `sqrt(hidden_size)`, plus a sinusoidal position (positions count valid steps only, so padding on either
  side does not move them), then dropout.
- A causal transformer encoder (post-norm layers with separate q/k/v/o projections, GELU feed-forward, final layer
  norm); padded steps are masked out as keys.
- Head: the encoder output at the last valid step + the user embedding + the embedding of the target's time (the time
  of the visit to predict is known when predicting it; `use_target_time=False` drops it, as in the mie-lab code), then
  a residual fully connected block (BatchNorm by default, as in the paper) gives a `hidden_size` query.
- Scores: dot product of the query with the candidate location embeddings. For `location_encoder="id"` the
  candidates use the (tied) ID table and locations outside `candidate_mask` (never seen in training, so untrained)
  score `-inf`; for `location_encoder="features"` they use the frozen feature table (standardised per dimension with
  a fixed mean and scale, see [`MHSAForNextLocation.fit_feature_standardization`]) through a trainable projection,
  so locations never seen in training, or added after training with
  [`MHSAForNextLocation.set_location_features`], are ranked like any other. The published code has a fixed softmax
  layer over training location ids instead, which cannot rank new places.

The file imports only torch, numpy and transformers (and its sibling configuration file), so a saved folder loads
with `AutoModel.from_pretrained(folder, trust_remote_code=True)` without this library installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_mhsa import MHSAConfig

__all__ = [
    "MHSAForNextLocation",
    "MHSAOutput",
    "MHSAPreTrainedModel",
    "NUM_TIME_FEATURES",
    "time_ids_from_timestamps",
]

logger = logging.get_logger(__name__)

# columns of `time_ids`: hour of day, quarter of the hour, weekday (0 = Monday); their vocabulary sizes
NUM_TIME_FEATURES = (24, 4, 7)
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
NUM_HISTORY_FEATURES = 3  # visited, log(1 + visits), recency (see `MHSAForNextLocation.history_features`)
HISTORY_BIAS_INIT = 1.0  # initial weight of each history feature


def time_ids_from_timestamps(timestamps, tz_offset_min=0, day0_weekday: int = 3) -> torch.LongTensor:
    """Time features `(..., 3)` = (hour, quarter of the hour, weekday with 0 = Monday) of timestamps, in local time.

    Args:
        timestamps (array-like of int): seconds (UTC epoch, or seconds since the dataset's day 0).
        tz_offset_min (array-like of int or `int`, *optional*, defaults to 0): offset of local time from the
            timestamps' clock, in minutes (broadcast against `timestamps`).
        day0_weekday (`int`, *optional*, defaults to 3): weekday of day 0 (3: 1970-01-01 was a Thursday).

    Returns:
        `torch.LongTensor` of shape `timestamps.shape + (3,)`.
    """
    local = np.asarray(timestamps, dtype=np.int64) + np.asarray(tz_offset_min, dtype=np.int64) * 60
    day = np.floor_divide(local, 86400)
    minute = (local - day * 86400) // 60
    features = np.stack([minute // 60, (minute % 60) // 15, (day + int(day0_weekday)) % 7], axis=-1)
    return torch.from_numpy(features.astype(np.int64))


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encodings `(..., dim)` of integer positions (first half sines, second half cosines)."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )  # (dim / 2,)
    angles = positions.float()[..., None] * inv_freq  # (..., dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# outputs


@dataclass
class MHSAOutput(ModelOutput):
    r"""
    Output of [`MHSAForNextLocation.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean cross-entropy of the labels over the candidates (returned when `labels` is given). Samples whose
            label is `-100` or a candidate outside `candidate_mask` do not count.
        logits (`torch.FloatTensor` of shape `(batch_size, num_candidates)`):
            Scores of the candidates (the whole location table by default); `-inf` for candidates outside
            `candidate_mask`.
        query (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The head's output, whose dot product with a candidate embedding is the candidate's score.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Encoder output at every history step (padded steps hold unused values).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    query: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


# building blocks


class MHSATimeEmbedding(nn.Module):
    """Sum of hour (24), quarter-of-hour (4) and weekday (7) embeddings of `time_ids` `(..., 3)`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hour = nn.Embedding(NUM_TIME_FEATURES[0], hidden_size)
        self.quarter = nn.Embedding(NUM_TIME_FEATURES[1], hidden_size)
        self.weekday = nn.Embedding(NUM_TIME_FEATURES[2], hidden_size)

    def forward(self, time_ids: torch.LongTensor) -> torch.Tensor:
        return self.hour(time_ids[..., 0]) + self.quarter(time_ids[..., 1]) + self.weekday(time_ids[..., 2])


class MHSAAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (so adapters such as LoRA can target them)."""

    def __init__(self, config: MHSAConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D / H)
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(hidden_states))
        k = heads(self.k_proj(hidden_states))
        v = heads(self.v_proj(hidden_states))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D / H)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, width))


class MHSALayer(nn.Module):
    """Post-norm transformer encoder layer (as `torch.nn.TransformerEncoderLayer` with `norm_first=False`)."""

    def __init__(self, config: MHSAConfig):
        super().__init__()
        self.self_attn = MHSAAttention(config)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention = self.self_attn(hidden_states, attention_mask)
        hidden_states = self.attention_norm(hidden_states + self.dropout(attention))
        feed_forward = self.down_proj(self.dropout(self.act(self.up_proj(hidden_states))))
        return self.output_norm(hidden_states + self.dropout(feed_forward))


class MHSAHead(nn.Module):
    """Residual fully connected block of the head: `norm(x + dropout(down(dropout(act(up(x))))))`."""

    def __init__(self, config: MHSAConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.down_proj = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.dropout = nn.Dropout(config.head_dropout_prob)
        if config.head_norm == "batch_norm":
            self.norm = nn.BatchNorm1d(config.hidden_size)
        else:
            self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.down_proj(self.dropout(self.act(self.up_proj(hidden_states))))
        return self.norm(hidden_states + self.dropout(residual))


# models


class MHSAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for [`MHSAForNextLocation`]."""

    config_class = MHSAConfig
    base_model_prefix = "mhsa"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) linear weights and embeddings, zero biases, the unknown-user row zero, unit
        norms; the feature table zero (filled by `set_location_features` or loaded), its standardisation the identity
        and every location a candidate."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            super()._init_weights(module)
        elif isinstance(module, MHSAForNextLocation):
            init.ones_(module.candidate_mask)
            if module.history_bias is not None:
                # prior: a place of the history is more likely, more so when visited often or recently
                init.constant_(module.history_bias.weight, HISTORY_BIAS_INIT)
            if module.location_residuals is not None:
                init.zeros_(module.location_residuals.weight)
                init.zeros_(module.residual_mask)
            if module.location_features is not None:
                init.zeros_(module.location_features)
                init.zeros_(module.location_feature_mean)
                init.ones_(module.location_feature_scale)


class MHSAForNextLocation(MHSAPreTrainedModel):
    r"""
    The MHSA next-location predictor; see [`MHSAConfig`] for the architecture and the two location encoders.

    Inputs are integer indices: locations index the location table (`config.location_ids`), users are 0 for an unknown
    user and `i + 1` for `config.user_ids[i]`; [`~MHSAForNextLocation.prepare_inputs`] builds a batch from ids and
    timestamps.

    Example:

    ```python
    >>> import torch
    >>> from modeling_mobility.mhsa import MHSAConfig, MHSAForNextLocation

    >>> config = MHSAConfig(location_ids=["a", "b", "c"], user_ids=["u1"], hidden_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=4, intermediate_size=64)
    >>> model = MHSAForNextLocation(config).eval()
    >>> batch = model.prepare_inputs([["a", "b"]], [[1333263600, 1333267200]], [1333270800], users=["u1"])
    >>> model(**batch).logits.shape
    torch.Size([1, 3])

    ```
    """

    def __init__(self, config: MHSAConfig):
        super().__init__(config)
        d = config.hidden_size
        if config.location_encoder == "id":
            self.location_embeddings = nn.Embedding(config.num_locations, d)
            self.location_features = None
            self.location_feature_mean = self.location_feature_scale = None
        else:
            self.register_buffer(
                "location_features", torch.zeros(config.num_locations, config.location_feature_dim), persistent=True
            )
            # fixed per-dimension standardisation of the features (identity until fitted; kept when rows are added)
            self.register_buffer("location_feature_mean", torch.zeros(config.location_feature_dim), persistent=True)
            self.register_buffer("location_feature_scale", torch.ones(config.location_feature_dim), persistent=True)
            self.location_input_projection = nn.Linear(config.location_feature_dim, d)
            self.location_output_projection = nn.Linear(config.location_feature_dim, d)
        self.location_residuals = None
        if config.location_encoder == "features" and config.location_residual:
            self.location_residuals = nn.Embedding(config.num_locations, d)
            self.register_buffer("residual_mask", torch.zeros(config.num_locations, dtype=torch.bool), persistent=True)
        self.register_buffer("candidate_mask", torch.ones(config.num_locations, dtype=torch.bool), persistent=True)
        self.time_embeddings = MHSATimeEmbedding(d)
        self.input_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([MHSALayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.user_embeddings = (
            nn.Embedding(config.num_users + 1, d, padding_idx=0) if config.use_user_embedding else None
        )
        self.target_time_embeddings = MHSATimeEmbedding(d) if config.use_target_time else None
        self.head = MHSAHead(config)
        # learned weights of the history features [visited, log(1 + visits), recency]
        self.history_bias = nn.Linear(NUM_HISTORY_FEATURES, 1, bias=False) if config.history_bias else None
        self._lookups: dict[str, tuple[int, dict[str, int]]] = {}
        self.post_init()

    # location table

    def location_input_embeddings(self, indices: torch.LongTensor) -> torch.Tensor:
        """Input embeddings `(..., hidden_size)` of location indices."""
        if self.location_features is None:
            return self.location_embeddings(indices)
        return self.location_input_projection(self._standardized_features(indices)) + self._residuals(indices)

    def candidate_embeddings(self, candidate_indices: torch.LongTensor | None = None) -> torch.Tensor:
        """Candidate embeddings `(num_candidates, hidden_size)`: the location table, or the given rows of it."""
        if self.location_features is None:
            table = self.location_embeddings.weight
            return table if candidate_indices is None else table[candidate_indices]
        return self.location_output_projection(self._standardized_features(candidate_indices)) + self._residuals(
            candidate_indices
        )

    def history_features(
        self,
        input_ids: torch.LongTensor,
        valid: torch.Tensor,
        candidate_indices: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Per sample and candidate, `(visited, log(1 + visits), recency)` from the sample's history, shape
        `(batch_size, num_candidates, 3)`; recency is `1 / (1 + k)` where `k` is the number of visits after the last
        visit to the candidate (1 for the last visited location), 0 when the candidate is not in the history.

        Args:
            input_ids (`torch.LongTensor` `(batch_size, sequence_length)`): location-table rows of the history.
            valid (`torch.Tensor` `(batch_size, sequence_length)`): true (or 1) for visits, false for padding.
            candidate_indices (`torch.LongTensor` `(num_candidates,)`, *optional*): the candidates (default: all).
        """
        valid = valid.bool()
        batch = input_ids.shape[0]
        counts = torch.zeros(batch, self.config.num_locations, device=input_ids.device)
        counts.scatter_add_(1, input_ids, valid.float())
        # visits after each step: (number of valid steps) - (valid steps up to and including it)
        after = valid.sum(1, keepdim=True) - valid.long().cumsum(1)
        recency_steps = torch.where(valid, 1.0 / (1.0 + after.float()), torch.zeros((), device=input_ids.device))
        recency = torch.zeros_like(counts).scatter_reduce_(1, input_ids, recency_steps, reduce="amax")
        if candidate_indices is not None:
            counts, recency = counts[:, candidate_indices], recency[:, candidate_indices]
        return torch.stack([(counts > 0).float(), torch.log1p(counts), recency], dim=-1)

    def _residuals(self, indices: torch.LongTensor | None = None):
        """Learned residuals of the locations in `residual_mask` (zero for the others, which get no gradient)."""
        if self.location_residuals is None:
            return 0.0
        weight = self.location_residuals.weight * self.residual_mask.unsqueeze(-1).to(self.location_residuals.weight)
        return weight if indices is None else weight[indices]

    @torch.no_grad()
    def set_residual_mask(self, mask) -> None:
        """Mark the locations that get a learned residual (`location_residual=True`): those seen in training."""
        if self.location_residuals is None:
            raise ValueError("`set_residual_mask` needs `location_encoder='features'` and `location_residual=True`.")
        mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        if mask.shape != (self.config.num_locations,) or mask.dtype != torch.bool:
            raise ValueError(
                f"`mask` must be a bool array of shape ({self.config.num_locations},), got dtype {mask.dtype} and "
                f"shape {tuple(mask.shape)}."
            )
        self.residual_mask.copy_(mask.to(self.residual_mask.device))

    def _standardized_features(self, indices: torch.LongTensor | None = None) -> torch.Tensor:
        features = self.location_features if indices is None else self.location_features[indices]
        return (features - self.location_feature_mean) / self.location_feature_scale

    @torch.no_grad()
    def fit_feature_standardization(self, rows=None) -> None:
        """Fit the fixed per-dimension standardisation of the feature table on some of its rows (all by default).

        Frozen embeddings such as CaLLiPer's are L2-normalised and often share a large common component, so nearby
        places differ only slightly; centring and scaling every dimension to unit spread across locations lets the
        trainable projections tell them apart. The training script fits it on the locations seen in training; the
        mean and scale are saved with the model and stay fixed when locations are added later.

        Args:
            rows (array-like of bool `(num_locations,)` or of int, *optional*): the rows to fit on.
        """
        if self.location_features is None:
            raise ValueError("`fit_feature_standardization` needs `location_encoder='features'`.")
        table = self.location_features
        if rows is not None:
            rows = torch.as_tensor(np.asarray(rows) if not torch.is_tensor(rows) else rows, device=table.device)
            table = table[rows]
        if table.shape[0] < 2:
            raise ValueError(f"standardisation needs at least 2 feature rows, got {table.shape[0]}.")
        std = table.std(0)
        self.location_feature_mean.copy_(table.mean(0))
        # a dimension that barely varies is not blown up beyond 1000x the widest one
        self.location_feature_scale.copy_(std.clamp_min(1e-3 * float(std.max().clamp_min(1e-12))))

    @torch.no_grad()
    def set_candidate_mask(self, mask) -> None:
        """Set which locations may be predicted (`(num_locations,)` bools; the others score `-inf`).

        The training script marks, for the ID variant, the locations that occurred in the training samples: the ID
        rows of the others are untrained. For the feature variant it uses the same mask while training only (places
        absent from the training data are not negatives of every step) and saves the model with every location a
        candidate.
        """
        mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        if mask.shape != (self.config.num_locations,) or mask.dtype != torch.bool:
            raise ValueError(
                f"`mask` must be a bool array of shape ({self.config.num_locations},), got dtype {mask.dtype} and "
                f"shape {tuple(mask.shape)}."
            )
        if not bool(mask.any()):
            raise ValueError("`mask` must allow at least one candidate location, got all False.")
        self.candidate_mask.copy_(mask.to(self.candidate_mask.device))

    @torch.no_grad()
    def set_location_features(self, features, location_ids: Sequence[str] | None = None, *, append: bool = False):
        """Replace (or extend) the frozen location feature table, e.g. to add places that opened after training.

        Only for `location_encoder="features"`. Every location of the new table becomes a candidate. Features must
        come from the same encoder the model was trained with (e.g. CaLLiPer's `get_location_embeddings` of the new
        places' coordinates).

        Args:
            features (array-like of shape `(N, location_feature_dim)`): feature rows.
            location_ids (`Sequence[str]`, *optional*): ids of the rows. Required with `append=True` or when `N`
                differs from the current table size; without it the current vocabulary is kept.
            append (`bool`, *optional*, defaults to `False`): keep the current table and add these rows; a row whose
                id is already in the vocabulary replaces that location's features.
        """
        if self.location_features is None:
            raise ValueError(
                "`set_location_features` needs `location_encoder='features'`; this model uses learned ID embeddings, "
                "which cannot represent locations never seen in training."
            )
        features = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features).float()
        if features.ndim != 2 or features.shape[1] != self.config.location_feature_dim or features.shape[0] == 0:
            raise ValueError(
                f"`features` must have shape (N >= 1, {self.config.location_feature_dim}), "
                f"got {tuple(features.shape)}."
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("`features` contains NaN or infinite values.")
        if location_ids is not None:
            if isinstance(location_ids, (str, bytes)):
                raise ValueError("`location_ids` must be a sequence of ids, got a single string.")
            location_ids = [str(v) for v in location_ids]
            if len(location_ids) != features.shape[0]:
                raise ValueError(
                    f"`location_ids` has {len(location_ids)} ids for {features.shape[0]} feature rows; "
                    "they must match."
                )
            if len(set(location_ids)) != len(location_ids):
                raise ValueError("`location_ids` must hold distinct ids.")
        device = self.location_features.device
        if append:
            if location_ids is None:
                raise ValueError("`location_ids` is required with `append=True`.")
            old_ids = self.config.location_ids or [str(i) for i in range(self.config.num_locations)]
            position = {loc: i for i, loc in enumerate(old_ids)}
            table = self.location_features.detach().cpu().clone()
            existing = [(position[loc], row) for row, loc in enumerate(location_ids) if loc in position]
            if existing:
                rows = torch.tensor([r for _, r in existing])
                table[torch.tensor([p for p, _ in existing])] = features[rows]
            new_rows = [row for row, loc in enumerate(location_ids) if loc not in position]
            table = torch.cat([table, features[torch.tensor(new_rows, dtype=torch.long)]], dim=0)
            vocabulary = old_ids + [location_ids[row] for row in new_rows]
        else:
            if location_ids is None and features.shape[0] != self.config.num_locations:
                raise ValueError(
                    f"`features` has {features.shape[0]} rows but the table has {self.config.num_locations}; pass "
                    "`location_ids` to set a new vocabulary."
                )
            table = features
            vocabulary = location_ids if location_ids is not None else self.config.location_ids
        if self.location_residuals is not None:  # keep the residual of every location still in the table, by id
            old_ids = self.config.location_ids or [str(i) for i in range(self.config.num_locations)]
            old_row = {loc: i for i, loc in enumerate(old_ids)}
            new_ids = list(vocabulary) if vocabulary is not None else old_ids
            weight = torch.zeros(table.shape[0], self.config.hidden_size, device=device,
                                 dtype=self.location_residuals.weight.dtype)
            mask = torch.zeros(table.shape[0], dtype=torch.bool, device=device)
            pairs = [(i, old_row[loc]) for i, loc in enumerate(new_ids) if loc in old_row]
            if pairs:
                new_rows = torch.tensor([i for i, _ in pairs], device=device)
                old_rows = torch.tensor([j for _, j in pairs], device=device)
                weight[new_rows] = self.location_residuals.weight[old_rows]
                mask[new_rows] = self.residual_mask[old_rows]
            self.location_residuals = nn.Embedding.from_pretrained(weight, freeze=False)
            self.residual_mask = mask
        self.location_features = table.to(device)
        self.candidate_mask = torch.ones(table.shape[0], dtype=torch.bool, device=device)
        self.config.num_locations = int(table.shape[0])
        self.config.location_ids = list(vocabulary) if vocabulary is not None else None
        self._lookups.pop("location", None)

    # id helpers

    def _lookup(self, kind: str) -> dict[str, int]:
        vocabulary = self.config.location_ids if kind == "location" else self.config.user_ids
        if vocabulary is None:
            raise ValueError(f"this model's config has no `{kind}_ids` vocabulary; pass integer indices instead.")
        cached = self._lookups.get(kind)
        if cached is None or cached[0] != id(vocabulary):
            offset = 0 if kind == "location" else 1  # user row 0 is the unknown user
            cached = (id(vocabulary), {v: i + offset for i, v in enumerate(vocabulary)})
            self._lookups[kind] = cached
        return cached[1]

    def location_index(self, location_ids: Sequence[str]) -> torch.LongTensor:
        """Rows of the location table of `location_ids`; an id outside the vocabulary raises a `ValueError`."""
        lookup = self._lookup("location")
        missing = [loc for loc in location_ids if str(loc) not in lookup]
        if missing:
            raise ValueError(
                f"{len(missing)} location id(s) are not in the model's location vocabulary (e.g. {missing[:5]}); "
                "add them with `set_location_features` (features variant)."
            )
        return torch.tensor([lookup[str(loc)] for loc in location_ids], dtype=torch.long)

    def user_index(self, user_ids: Sequence[str]) -> torch.LongTensor:
        """Rows of the user table of `user_ids` (0, the shared unknown-user row, for users not seen in training)."""
        lookup = self._lookup("user") if self.config.user_ids is not None else {}
        return torch.tensor([lookup.get(str(u), 0) for u in user_ids], dtype=torch.long)

    def prepare_inputs(
        self,
        history_location_ids: Sequence[Sequence[str]],
        history_timestamps: Sequence[Sequence[int]],
        target_timestamps: Sequence[int],
        users: Sequence[str] | None = None,
        *,
        history_tz_offset_min=0,
        target_tz_offset_min=0,
        day0_weekday: int = 3,
    ) -> dict[str, torch.Tensor]:
        """A right-padded batch for `forward` from location ids and timestamps (a convenience for small batches).

        Args:
            history_location_ids (`Sequence[Sequence[str]]`): per sample, the visited location ids, oldest first.
            history_timestamps (`Sequence[Sequence[int]]`): per sample, the visit times (seconds).
            target_timestamps (`Sequence[int]`): per sample, the time of the visit to predict.
            users (`Sequence[str]`, *optional*): per sample, the user id (unknown users share one row).
            history_tz_offset_min (`int` or nested sequence, *optional*, defaults to 0): local-time offsets (minutes)
                of the visits: one number for all, or one sequence per sample.
            target_tz_offset_min (`int` or `Sequence[int]`, *optional*, defaults to 0): offsets of the targets.
            day0_weekday (`int`, *optional*, defaults to 3): weekday of timestamp day 0 (3 for Unix time).
        """
        n = len(history_location_ids)
        if len(history_timestamps) != n or len(target_timestamps) != n or (users is not None and len(users) != n):
            raise ValueError("history_location_ids, history_timestamps, target_timestamps and users must have one "
                             f"entry per sample ({n}).")
        lengths = [len(h) for h in history_location_ids]
        if any(len(t) != length for t, length in zip(history_timestamps, lengths)):
            raise ValueError("every history needs one timestamp per visit.")
        if n == 0 or min(lengths) == 0:
            raise ValueError("every sample needs at least one history visit.")
        width = max(lengths)
        flat = [loc for h in history_location_ids for loc in h]
        index = self.location_index(flat)
        if isinstance(history_tz_offset_min, (int, np.integer)):
            offsets = np.full(len(flat), int(history_tz_offset_min))
        else:
            offsets = np.concatenate([np.broadcast_to(np.asarray(o), (length,))
                                      for o, length in zip(history_tz_offset_min, lengths)])
        times = time_ids_from_timestamps(
            np.concatenate([np.asarray(t, dtype=np.int64) for t in history_timestamps]), offsets, day0_weekday
        )
        rows = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
        cols = torch.cat([torch.arange(length) for length in lengths])
        input_ids = torch.zeros(n, width, dtype=torch.long)
        time_ids = torch.zeros(n, width, 3, dtype=torch.long)
        attention_mask = torch.zeros(n, width, dtype=torch.long)
        input_ids[rows, cols] = index
        time_ids[rows, cols] = times
        attention_mask[rows, cols] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "time_ids": time_ids,
            "target_time_ids": time_ids_from_timestamps(
                np.asarray(target_timestamps, dtype=np.int64), target_tz_offset_min, day0_weekday
            ),
        }
        if users is not None:
            batch["user_ids"] = self.user_index(users)
        return {k: v.to(self.device) for k, v in batch.items()}

    # forward

    def _check_inputs(self, input_ids, attention_mask, time_ids, user_ids, target_time_ids):
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        if time_ids is None or time_ids.shape != (batch, length, 3):
            got = None if time_ids is None else tuple(time_ids.shape)
            raise ValueError(f"`time_ids` (hour, quarter, weekday) must have shape ({batch}, {length}, 3), got {got}.")
        if self.config.use_target_time and (target_time_ids is None or target_time_ids.shape != (batch, 3)):
            got = None if target_time_ids is None else tuple(target_time_ids.shape)
            raise ValueError(f"`target_time_ids` must have shape ({batch}, 3) (use_target_time=True), got {got}.")
        if user_ids is not None and user_ids.shape != (batch,):
            raise ValueError(f"`user_ids` must have shape ({batch},), got {tuple(user_ids.shape)}.")

    def forward(
        self,
        input_ids: torch.LongTensor,
        time_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        user_ids: torch.LongTensor | None = None,
        target_time_ids: torch.LongTensor | None = None,
        candidate_indices: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
    ) -> MHSAOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Location-table rows of the history visits, oldest first. Padded steps (either side) may hold any
                value.
            time_ids (`torch.LongTensor` of shape `(batch_size, sequence_length, 3)`):
                Local (hour 0-23, quarter of the hour 0-3, weekday 0-6 with 0 = Monday) of every visit; see
                [`time_ids_from_timestamps`].
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for visits, 0 for padding. Every row needs at least one visit. Defaults to all ones.
            user_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                User-table rows (0 = unknown user). Defaults to the unknown user.
            target_time_ids (`torch.LongTensor` of shape `(batch_size, 3)`, *optional*):
                Time features of the visit to predict; required when `config.use_target_time`.
            candidate_indices (`torch.LongTensor` of shape `(num_candidates,)`, *optional*):
                Location-table rows to score. Defaults to the whole table.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Position of the true next location among the candidates (its table row by default); `-100` ignores
                a sample.
            return_dict (`bool`, *optional*):
                Return an [`MHSAOutput`] (default) or a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(input_ids, attention_mask, time_ids, user_ids, target_time_ids)
        if attention_mask is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            valid = attention_mask.bool()
        lengths = valid.sum(1)  # (B,)
        if bool((lengths == 0).any()):
            raise ValueError("every sample needs at least one history visit (a row of `attention_mask` is all 0).")
        num_locations = self.config.num_locations
        input_ids = input_ids.masked_fill(~valid, 0)
        if bool(((input_ids < 0) | (input_ids >= num_locations)).any()):
            raise ValueError(f"`input_ids` must be location-table rows in [0, {num_locations}).")
        time_ids = time_ids.masked_fill(~valid[..., None], 0)

        # embeddings: (location + time) * sqrt(d) + sinusoidal position of the valid step
        d = self.config.hidden_size
        hidden = (self.location_input_embeddings(input_ids) + self.time_embeddings(time_ids)) * math.sqrt(d)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)  # (B, T): padding never shifts positions
        hidden = self.input_dropout(hidden + sinusoidal_positions(positions, d).to(hidden.dtype))

        # causal attention over valid keys; every query also sees itself so padded rows stay finite
        length = input_ids.shape[1]
        steps = torch.arange(length, device=input_ids.device)
        causal = steps[None, :] <= steps[:, None]  # (T, T): key j visible from query i when j <= i
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=valid.device)[None]
        allowed = allowed[:, None]  # (B, 1, T, T)
        for layer in self.layers:
            hidden = layer(hidden, allowed)
        hidden = self.final_norm(hidden)  # (B, T, d)

        # head: last valid step + user + target time -> residual block -> query
        last = (valid.long() * (steps + 1)).argmax(1)  # (B,) index of the last valid step
        query = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
        if self.user_embeddings is not None and user_ids is not None:
            if bool(((user_ids < 0) | (user_ids > self.config.num_users)).any()):
                raise ValueError(f"`user_ids` must be user-table rows in [0, {self.config.num_users}].")
            query = query + self.user_embeddings(user_ids)
        if self.target_time_embeddings is not None:
            query = query + self.target_time_embeddings(target_time_ids)
        query = self.head(query)

        # scores: dot product with the candidate embeddings; untrained candidates are never predicted
        if candidate_indices is not None:
            candidate_indices = candidate_indices.reshape(-1)
            if bool(((candidate_indices < 0) | (candidate_indices >= num_locations)).any()):
                raise ValueError(f"`candidate_indices` must be location-table rows in [0, {num_locations}).")
            allowed_candidates = self.candidate_mask[candidate_indices]
        else:
            allowed_candidates = self.candidate_mask
        logits = query @ self.candidate_embeddings(candidate_indices).t()  # (B, C)
        if self.history_bias is not None:
            features = self.history_features(input_ids, valid, candidate_indices).to(logits.dtype)  # (B, C, 3)
            logits = logits + self.history_bias(features).squeeze(-1)
        logits = logits.masked_fill(~allowed_candidates[None, :], float("-inf"))

        loss = None
        if labels is not None:
            labels = labels.reshape(-1).long()
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"`labels` must have one entry per sample ({logits.shape[0]}), got {labels.shape[0]}."
                )
            keep = labels != -100
            if bool(((labels[keep] < 0) | (labels[keep] >= logits.shape[1])).any()):
                raise ValueError(f"`labels` must be candidate positions in [0, {logits.shape[1]}) or -100.")
            keep &= allowed_candidates[labels.clamp_min(0)]  # a target outside the candidates gives no gradient
            if bool(keep.any()):
                loss = F.cross_entropy(logits[keep], labels[keep])
            else:
                loss = logits.new_zeros(()) + 0.0 * query.sum()

        if not return_dict:
            output = (logits, query, hidden)
            return ((loss,) + output) if loss is not None else output
        return MHSAOutput(loss=loss, logits=logits, query=query, last_hidden_state=hidden)
