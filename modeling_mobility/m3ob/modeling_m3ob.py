"""M3ob next-location recommender (Dai et al., "Learning Multi-Modal Mobility Dynamics for Generalized Next Location
Recommendation", arXiv 2512.22605).

The paper publishes no code. This implementation follows its structure; everything the paper does not fix is an
hf-mobility choice, not from the paper, and is marked so below and in [`M3obConfig`].

- Graph (from the paper: TransE knowledge-graph embeddings, a kNN relational graph over them). The frozen TransE
  location embeddings `kg_embeddings` `(N, kg_embedding_dim)` are trained outside the model; [`build_knn_graph`] links
  every location to its `num_neighbors` most cosine-similar locations. hf-mobility choices: cosine similarity, self
  excluded, the graph symmetrised (union of both directions), weights = cosine similarity clipped at 0. The graph
  (`edge_index`, `edge_weight`) is a saved buffer, so a saved model predicts without rebuilding it.
- Node encoders (paper: parallel GCNs over the ID and image modalities on the same graph). ID: a learned table
  `e_id = E[n]`, then `num_gcn_layers` `GCNConv` layers (symmetric normalisation with self-loops, edge weights)
  with the activation and dropout between layers: `h_id`. Image: frozen features `(N, image_feature_dim)` (e.g.
  remote-sensing image embeddings) through an MLP `x_img = W2 act(W1 f + b1) + b2` (hf-mobility choice), then a GCN
  stack of the same shape: `h_img`.
- Fusion (paper: a sigmoid gate over the concatenated modalities, then a residual to the original embeddings).
  `"gate"`: `g = sigmoid(W_g [h_id ; h_img] + b_g)` per location and dimension, `h = g * h_id + (1 - g) * h_img`;
  `"sum"`: `h = h_id + h_img`. Then (hf-mobility choice of the residual's exact form)
  `fused = LayerNorm(h + e_id + x_img)`. With the ID modality only, `fused = LayerNorm(h_id + e_id)`.
- Alignment (paper: a knowledge-graph-guided contrastive alignment of the image modality). hf-mobility choices: a
  symmetric InfoNCE ([`symmetric_info_nce`]) between `P_img h_img` (the image representation after its GCN, the one
  that is fused) and `P_kg kg_embeddings` (a linear projection of the frozen TransE embeddings), both L2-normalised,
  scaled by a learnable `exp(logit_scale)` (initial `1 / alignment_temperature`, clamped to at most 100 as in CLIP),
  over the distinct locations of the batch (history and targets; a random subset of `alignment_max_nodes` when there
  are more), while training only.
- Sequence model (paper: a transformer over the fused sequence with user and time context). hf-mobility choices:
  input step = `fused[location] + hour + weekday + position` embeddings (the quarter-hour column of `time_ids` is not
  used), positions counted back from the most recent visit (0 = last visit, so histories of any length align at the
  prediction end), dropout, then post-norm encoder layers (separate q/k/v/o projections, bidirectional over the
  history with padded steps masked as keys); the output at the last valid step plus the user embedding is the
  sequence representation `s`.
- Heads (paper: next location, category, activity and time). Next location: `(W_q s) . fused[n]` for every location
  `n`, `-inf` outside `candidate_mask`. Category, activity and time slot: a linear layer each on `s`. The category
  and activity labels come from the target location through the saved maps `location_categories` and
  `category_activities`, the time label from the target's time (hour, or weekday x 24 + hour).
- Loss: `CE(location) + category_loss_weight * CE(category) + activity_loss_weight * CE(activity) +
  time_loss_weight * CE(time) + alignment_weight * InfoNCE` (the weights are hf-mobility choices).

Node representations are recomputed in every forward over all `N` locations, so gradients reach the ID table, the
GCNs and the image MLP through both the history and the candidate side; nothing is cached across calls.

The file imports only torch, torch_geometric and transformers (and its sibling configuration file), so a saved folder
loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` without this library installed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_m3ob import M3obConfig

__all__ = [
    "M3obForNextLocation",
    "M3obNodeRepresentations",
    "M3obOutput",
    "M3obPreTrainedModel",
    "NUM_TIME_FEATURES",
    "build_knn_graph",
    "symmetric_info_nce",
    "time_ids_from_timestamps",
]

logger = logging.get_logger(__name__)

# columns of `time_ids`: hour of day, quarter of the hour, weekday (0 = Monday); their vocabulary sizes
NUM_TIME_FEATURES = (24, 4, 7)
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
# elements of the similarity block of `build_knn_graph` (float32: 512 MiB); sets the default chunk size
_KNN_BLOCK_ELEMENTS = 2**27
_KNN_EDGE_CHUNK = 2**16  # edges whose weights are recomputed at once
# CLIP's cap on the contrastive logit scale: exp(logit_scale) <= 100
_MAX_LOGIT_SCALE = math.log(100.0)
_IGNORE_INDEX = -100


# functions


@torch.no_grad()
def build_knn_graph(
    embeddings: torch.Tensor, num_neighbors: int, *, chunk_size: int | None = None
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """The symmetric kNN graph of cosine similarity between embeddings (M3ob's relational graph over TransE location
    embeddings).

    Every row is linked to its `num_neighbors` most similar other rows (self excluded; `min(num_neighbors, N - 1)`
    when there are fewer rows). hf-mobility choices, not from the paper: the graph is symmetrised, i.e. the union of
    the edges `i -> j` and `j -> i` (both directions carry the same weight), and an edge's weight is the cosine
    similarity clipped at 0 (GCN normalisation needs non-negative weights; an edge of weight 0 has no effect). Rows of
    zero norm have similarity 0 with everything.

    Similarities are computed in blocks of `chunk_size` rows against all rows (a matrix product and a top-k per
    block), so memory stays at `chunk_size x N` floats; the weights of the selected edges are then recomputed edge by
    edge, so they do not depend on the chunking. The result is deterministic and sorted by (source, target); only
    exact (or within-rounding) ties between candidate neighbours can be broken differently by another chunk size.

    Args:
        embeddings (`torch.Tensor` of shape `(N, D)`):
            One embedding per node (any device; computed in float32).
        num_neighbors (`int`):
            Neighbours per node before symmetrisation (`k`).
        chunk_size (`int`, *optional*):
            Rows per similarity block. Defaults to `max(1, 2**27 // N)` (a block of at most 512 MiB).

    Returns:
        `tuple(torch.LongTensor, torch.FloatTensor)`: `edge_index` of shape `(2, E)` (row 0 source, row 1 target; both
        directions of every edge present) and `edge_weight` of shape `(E,)`, on the device of `embeddings`.
    """
    if not torch.is_tensor(embeddings):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"`embeddings` must have shape (N >= 1, D >= 1), got {tuple(embeddings.shape)}.")
    for name, value in (("num_neighbors", num_neighbors), ("chunk_size", chunk_size)):
        if name == "chunk_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    num_neighbors = int(num_neighbors)
    chunk_size = None if chunk_size is None else int(chunk_size)
    x = embeddings.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("`embeddings` contains NaN or infinite values.")
    n, device = x.shape[0], x.device
    k = min(num_neighbors, n - 1)
    if k == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device), torch.zeros(0, device=device)
    x = F.normalize(x, dim=1)
    chunk_size = min(chunk_size or max(1, _KNN_BLOCK_ELEMENTS // n), n)
    x_t = x.t().contiguous()  # (D, N)
    buffer = torch.empty(chunk_size, n, device=device)  # one block, reused (a fresh one per block costs page faults)
    sources, targets = [], []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = torch.mm(x[start:stop], x_t, out=buffer[: stop - start])  # (c, N) cosine similarities
        rows = torch.arange(stop - start, device=device)
        block[rows, rows + start] = float("-inf")  # no self loops
        columns = block.topk(k, dim=1).indices  # (c, k)
        sources.append((rows + start).repeat_interleave(k))
        targets.append(columns.reshape(-1))
    del buffer
    source, target = torch.cat(sources), torch.cat(targets)
    # union of both directions (sorted, duplicates dropped)
    keys = torch.unique(torch.cat([source * n + target, target * n + source]))  # (E,) sorted
    edge_index = torch.stack([keys // n, keys % n])  # (2, E)
    # the weights again, edge by edge: the same value from both ends and for any chunking (a block's matrix product
    # may round differently with its shape)
    edge_weight = torch.cat([
        (x[edge_index[0, i : i + _KNN_EDGE_CHUNK]] * x[edge_index[1, i : i + _KNN_EDGE_CHUNK]]).sum(-1)
        for i in range(0, edge_index.shape[1], _KNN_EDGE_CHUNK)
    ]).clamp_min(0.0)  # in chunks of edges: two (E, D) gathers at once would cost more memory than the blocks
    return edge_index, edge_weight


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) of paired rows: row `i` of `a` and row `i` of `b` are a positive pair, every other
    row of the other side a negative.

    `a` and `b` are L2-normalised, `logits = exp(logit_scale) * a @ b.T`, and the loss is the mean of the
    cross-entropy of `logits` (each `a` row against all `b` rows) and of `logits.T`, both with the diagonal as target.

    Args:
        a (`torch.Tensor` of shape `(M, D)`): one side (e.g. projected image representations).
        b (`torch.Tensor` of shape `(M, D)`): the other side (e.g. projected TransE embeddings).
        logit_scale (`torch.Tensor` or `float`): the log of the multiplier of the cosine similarities (the inverse
            temperature is `exp(logit_scale)`); clamp it before calling if needed.

    Returns:
        `torch.Tensor` of shape `()`.
    """
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(
            f"`a` and `b` must have the same shape (M >= 1, D), got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    scale = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device).exp()
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # (M, M)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def time_ids_from_timestamps(timestamps, tz_offset_min=0, day0_weekday: int = 3) -> torch.LongTensor:
    """Time features `(..., 3)` = (hour, quarter of the hour, weekday with 0 = Monday) of timestamps, in local time
    (the format of MHSA's `time_ids`).

    Args:
        timestamps (array-like of int): seconds (UTC epoch, or seconds since the dataset's day 0).
        tz_offset_min (array-like of int or `int`, *optional*, defaults to 0): offset of local time from the
            timestamps' clock, in minutes (broadcast against `timestamps`).
        day0_weekday (`int`, *optional*, defaults to 3): weekday of day 0 (3: 1970-01-01 was a Thursday).

    Returns:
        `torch.LongTensor` of shape `timestamps.shape + (3,)`.
    """
    local = torch.as_tensor(timestamps, dtype=torch.long) + torch.as_tensor(tz_offset_min, dtype=torch.long) * 60
    day = torch.div(local, 86400, rounding_mode="floor")
    minute = torch.div(local - day * 86400, 60, rounding_mode="floor")
    return torch.stack([minute // 60, (minute % 60) // 15, (day + int(day0_weekday)) % 7], dim=-1)


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Mean cross-entropy over the samples whose label is not -100 (0, still attached to the graph, when none is)."""
    keep = labels != _IGNORE_INDEX
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])


def _as_tensor(value, dtype: torch.dtype | None = None) -> torch.Tensor:
    flags = getattr(value, "flags", None)  # a read-only NumPy array (e.g. a view of an Arrow buffer): torch would warn
    if flags is not None and not torch.is_tensor(value) and not flags.writeable:
        value = value.copy()
    tensor = value if torch.is_tensor(value) else torch.as_tensor(value)
    return tensor.detach() if dtype is None else tensor.detach().to(dtype)


# outputs


@dataclass
class M3obOutput(ModelOutput):
    r"""
    Output of [`M3obForNextLocation.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `location_loss + category_loss_weight * category_loss + activity_loss_weight * activity_loss +
            time_loss_weight * time_loss + alignment_weight * alignment_loss` (the terms that apply; when `labels` is
            given).
        logits (`torch.FloatTensor` of shape `(batch_size, num_locations)`):
            Next-location scores; `-inf` outside `candidate_mask`.
        category_logits (`torch.FloatTensor` of shape `(batch_size, num_categories)`, *optional*):
            Next-category scores (when `num_categories > 0`).
        activity_logits (`torch.FloatTensor` of shape `(batch_size, num_activities)`, *optional*):
            Next-activity scores (when `num_activities > 0`).
        time_logits (`torch.FloatTensor` of shape `(batch_size, num_time_slots)`, *optional*):
            Next-time-slot scores (when `num_time_slots > 0`).
        location_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the next location (samples whose label is -100 or outside `candidate_mask` do not count).
        category_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the target location's category (unknown categories do not count).
        activity_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the target's activity (unknown activities do not count).
        time_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of the target's time slot.
        alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Symmetric InfoNCE between image and TransE embeddings of the batch's locations (training only).
        gate (`torch.FloatTensor` of shape `(num_locations,)`, *optional*):
            Per location, the mean over dimensions of the fusion gate (1 = all ID modality, 0 = all image modality);
            `"gate"` fusion only.
        query (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The vector whose dot product with a location's fused embedding is its score.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    category_logits: torch.FloatTensor | None = None
    activity_logits: torch.FloatTensor | None = None
    time_logits: torch.FloatTensor | None = None
    location_loss: torch.FloatTensor | None = None
    category_loss: torch.FloatTensor | None = None
    activity_loss: torch.FloatTensor | None = None
    time_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    gate: torch.FloatTensor | None = None
    query: torch.FloatTensor | None = None


@dataclass
class M3obNodeRepresentations(ModelOutput):
    r"""
    Per-location representations of [`M3obForNextLocation.node_representations`] (all `(num_locations, hidden_size)`).

    Args:
        fused (`torch.FloatTensor`): `LayerNorm(h + id_embeddings + image_inputs)`, the location embeddings of the
            sequence model and the candidates.
        id_embeddings (`torch.FloatTensor`): the learned ID table (input of the ID GCN).
        id_hidden (`torch.FloatTensor`): output of the ID GCN (`h_id`).
        image_inputs (`torch.FloatTensor`, *optional*): the image MLP's output (input of the image GCN).
        image_hidden (`torch.FloatTensor`, *optional*): output of the image GCN (`h_img`).
        gate (`torch.FloatTensor`, *optional*): the fusion gate `g` (`"gate"` fusion).
        mixed (`torch.FloatTensor`): the fused modalities before the residual and the norm (`h`).
    """

    fused: torch.FloatTensor | None = None
    id_embeddings: torch.FloatTensor | None = None
    id_hidden: torch.FloatTensor | None = None
    image_inputs: torch.FloatTensor | None = None
    image_hidden: torch.FloatTensor | None = None
    gate: torch.FloatTensor | None = None
    mixed: torch.FloatTensor | None = None


# building blocks


class M3obGraphEncoder(nn.Module):
    """`num_gcn_layers` `GCNConv` layers (`hidden_size -> hidden_size`, self-loops added, symmetric normalisation,
    edge weights), with the activation and dropout between layers (not after the last)."""

    def __init__(self, config: M3obConfig):
        super().__init__()
        self.convs = nn.ModuleList(
            [GCNConv(config.hidden_size, config.hidden_size) for _ in range(config.num_gcn_layers)]
        )
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, edge_index: torch.LongTensor, edge_weight: torch.Tensor) -> torch.Tensor:
        edge_weight = edge_weight.to(x.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, edge_weight)  # (N, d)
            if i < len(self.convs) - 1:
                x = self.dropout(self.act(x))
        return x


class M3obImageProjection(nn.Module):
    """MLP of the frozen image features: `down(act(up(f)))`, `image_feature_dim -> hidden_size -> hidden_size`."""

    def __init__(self, config: M3obConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.image_feature_dim, config.hidden_size)
        self.down_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(features)))


class M3obAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (so adapters such as LoRA can target them)."""

    def __init__(self, config: M3obConfig):
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


class M3obLayer(nn.Module):
    """Post-norm transformer encoder layer (as `torch.nn.TransformerEncoderLayer` with `norm_first=False`)."""

    def __init__(self, config: M3obConfig):
        super().__init__()
        self.self_attn = M3obAttention(config)
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


# models


class M3obPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for [`M3obForNextLocation`]."""

    config_class = M3obConfig
    base_model_prefix = "m3ob"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) linear weights and embeddings, zero biases, the unknown-user row zero, unit
        layer norms, Glorot-uniform GCN weights with zero biases (PyG's default), the alignment log-scale at
        `log(1 / alignment_temperature)`; the frozen buffers empty (zero TransE embeddings, image features and graph,
        unknown categories and activities) and every location a candidate, until set or loaded. Loaded tensors are
        never overwritten (the `transformers.initialization` functions skip them), so this also initialises exactly
        the keys a checkpoint lacks."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, GCNConv):
            init.xavier_uniform_(module.lin.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, M3obForNextLocation):
            init.zeros_(module.kg_embeddings)
            init.zeros_(module.edge_index)
            init.zeros_(module.edge_weight)
            init.constant_(module.location_categories, -1)
            init.constant_(module.category_activities, -1)
            init.ones_(module.candidate_mask)
            if module.image_features is not None:
                init.zeros_(module.image_features)
            if module.alignment_logit_scale is not None:
                init.constant_(module.alignment_logit_scale, math.log(1.0 / self.config.alignment_temperature))


class M3obForNextLocation(M3obPreTrainedModel):
    r"""
    M3ob: multi-modal location representations on a kNN graph of TransE embeddings, fused per location, read by a
    transformer over the history; see [`M3obConfig`] and the module docstring for the architecture.

    Inputs are integer indices: locations index the location table (`config.location_ids`), users are 0 for an unknown
    user and `i + 1` for `config.user_ids[i]`. The batch keys are those of MHSA (`train/mhsa.py`'s
    `MHSASamples.batch`), so the same dataset and collator feed both models; [`~M3obForNextLocation.prepare_inputs`]
    builds a batch from ids and timestamps.

    Before training, set the frozen inputs (all saved with the weights as buffers):
    [`~M3obForNextLocation.set_graph`] (TransE embeddings and the kNN graph),
    [`~M3obForNextLocation.set_image_features`] (image modality), [`~M3obForNextLocation.set_location_categories`]
    (category and activity labels) and [`~M3obForNextLocation.set_candidate_mask`] (locations that may be predicted).

    Example:

    ```python
    >>> import torch
    >>> from modeling_mobility.m3ob import M3obConfig, M3obForNextLocation

    >>> config = M3obConfig(location_ids=[f"l{i}" for i in range(6)], user_ids=["u1"], kg_embedding_dim=8,
    ...                     image_feature_dim=4, num_neighbors=2, hidden_size=16, intermediate_size=32)
    >>> model = M3obForNextLocation(config)
    >>> model.set_graph(torch.randn(6, 8))  # builds the kNN graph
    >>> model.set_image_features(torch.randn(6, 4))
    >>> batch = model.prepare_inputs([["l0", "l3"]], [[1333263600, 1333267200]], [1333270800], users=["u1"])
    >>> model.eval()(**batch).logits.shape
    torch.Size([1, 6])

    ```
    """

    def __init__(self, config: M3obConfig):
        super().__init__(config)
        n, d = config.num_locations, config.hidden_size
        # frozen inputs, saved with the weights
        self.register_buffer("kg_embeddings", torch.zeros(n, config.kg_embedding_dim), persistent=True)
        self.register_buffer("edge_index", torch.zeros(2, config.num_edges, dtype=torch.long), persistent=True)
        self.register_buffer("edge_weight", torch.zeros(config.num_edges), persistent=True)
        self.register_buffer("location_categories", torch.full((n,), -1, dtype=torch.long), persistent=True)
        self.register_buffer(
            "category_activities", torch.full((config.num_categories,), -1, dtype=torch.long), persistent=True
        )
        self.register_buffer("candidate_mask", torch.ones(n, dtype=torch.bool), persistent=True)
        if config.use_image:
            self.register_buffer("image_features", torch.zeros(n, config.image_feature_dim), persistent=True)
        else:
            self.image_features = None
        # node encoders and fusion
        self.location_embeddings = nn.Embedding(n, d)
        self.id_encoder = M3obGraphEncoder(config)
        if config.use_image:
            self.image_projection = M3obImageProjection(config)
            self.image_encoder = M3obGraphEncoder(config)
            self.gate_proj = nn.Linear(2 * d, d) if config.fusion == "gate" else None
        else:
            self.image_projection = self.image_encoder = self.gate_proj = None
        self.fusion_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        # image-knowledge-graph alignment
        if config.use_alignment:
            self.image_alignment_proj = nn.Linear(d, d)
            self.kg_alignment_proj = nn.Linear(config.kg_embedding_dim, d)
            self.alignment_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.alignment_temperature)))
        else:
            self.image_alignment_proj = self.kg_alignment_proj = self.alignment_logit_scale = None
        # sequence model
        self.hour_embeddings = nn.Embedding(NUM_TIME_FEATURES[0], d)
        self.weekday_embeddings = nn.Embedding(NUM_TIME_FEATURES[2], d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.input_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([M3obLayer(config) for _ in range(config.num_hidden_layers)])
        self.user_embeddings = nn.Embedding(config.num_users + 1, d, padding_idx=0)
        if config.use_target_time:
            self.target_hour_embeddings = nn.Embedding(NUM_TIME_FEATURES[0], d)
            self.target_weekday_embeddings = nn.Embedding(NUM_TIME_FEATURES[2], d)
        else:
            self.target_hour_embeddings = self.target_weekday_embeddings = None
        self.head_dropout = nn.Dropout(config.hidden_dropout_prob)
        # heads
        self.location_head = nn.Linear(d, d)
        self.category_head = nn.Linear(d, config.num_categories) if config.num_categories else None
        self.activity_head = nn.Linear(d, config.num_activities) if config.num_activities else None
        self.time_head = nn.Linear(d, config.num_time_slots) if config.num_time_slots else None
        self._lookups: dict[str, dict[str, int]] = {}
        self.post_init()

    # frozen inputs

    def _check_rows(self, name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
        n = self.config.num_locations
        if tensor.ndim != 2 or tensor.shape != (n, width):
            raise ValueError(
                f"`{name}` must have shape ({n}, {width}) (num_locations, width), got {tuple(tensor.shape)}."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        return tensor

    @torch.no_grad()
    def set_graph(self, kg_embeddings, edge_index=None, edge_weight=None) -> None:
        """Set the frozen TransE location embeddings and the relational graph (saved with the weights).

        Without `edge_index`, the graph is the kNN graph of the embeddings ([`build_knn_graph`] with
        `config.num_neighbors`). `config.num_edges` becomes the new edge count.

        Args:
            kg_embeddings (array-like of shape `(num_locations, kg_embedding_dim)`):
                The TransE embeddings of the locations, in table order.
            edge_index (array-like of int of shape `(2, E)`, *optional*):
                Edges (row 0 source, row 1 target) between location-table rows. Give both directions of an undirected
                edge.
            edge_weight (array-like of shape `(E,)`, *optional*):
                Non-negative edge weights (defaults to 1 when `edge_index` is given without them).
        """
        n = self.config.num_locations
        kg = self._check_rows("kg_embeddings", _as_tensor(kg_embeddings, torch.float32), self.config.kg_embedding_dim)
        if edge_index is None:
            if edge_weight is not None:
                raise ValueError("`edge_weight` was given without `edge_index`.")
            edge_index, edge_weight = build_knn_graph(kg, self.config.num_neighbors)
        edge_index = _as_tensor(edge_index)
        if edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_index.is_floating_point():
            raise ValueError(
                f"`edge_index` must be an integer tensor of shape (2, E), got {edge_index.dtype} "
                f"{tuple(edge_index.shape)}."
            )
        edge_index = edge_index.long()
        if edge_index.numel() and bool(((edge_index < 0) | (edge_index >= n)).any()):
            bad = edge_index[(edge_index < 0) | (edge_index >= n)][:5].tolist()
            raise ValueError(f"`edge_index` must hold location-table rows in [0, {n}), got e.g. {bad}.")
        num_edges = edge_index.shape[1]
        edge_weight = torch.ones(num_edges) if edge_weight is None else _as_tensor(edge_weight, torch.float32)
        if edge_weight.shape != (num_edges,):
            raise ValueError(
                f"`edge_weight` must have shape ({num_edges},) (one per edge), got {tuple(edge_weight.shape)}."
            )
        if not bool(torch.isfinite(edge_weight).all()) or bool((edge_weight < 0).any()):
            raise ValueError("`edge_weight` must be finite and >= 0 (GCN normalisation needs non-negative weights).")
        device = self.kg_embeddings.device
        self.kg_embeddings = kg.to(device=device, dtype=self.kg_embeddings.dtype)
        self.edge_index = edge_index.to(device)
        self.edge_weight = edge_weight.to(device=device, dtype=self.edge_weight.dtype)
        self.config.num_edges = int(num_edges)

    @torch.no_grad()
    def set_image_features(self, features) -> None:
        """Set the frozen image features `(num_locations, image_feature_dim)` of the locations (saved with the
        weights), e.g. embeddings of a remote-sensing image of each location by a frozen vision encoder."""
        if self.image_features is None:
            raise ValueError("`set_image_features` needs the image modality (`image_feature_dim` > 0).")
        features = self._check_rows("features", _as_tensor(features, torch.float32), self.config.image_feature_dim)
        self.image_features.copy_(features.to(self.image_features))

    @torch.no_grad()
    def set_location_categories(self, location_categories, category_activities=None) -> None:
        """Set the labels of the category and activity heads (saved with the weights).

        Args:
            location_categories (array-like of int of shape `(num_locations,)`):
                Category of every location in `[0, num_categories)`, -1 when unknown (no category/activity loss for
                targets there).
            category_activities (array-like of int of shape `(num_categories,)`, *optional*):
                Activity type of every category in `[0, num_activities)`, -1 when unknown. Required when
                `num_activities > 0`.
        """
        n, c, a = self.config.num_locations, self.config.num_categories, self.config.num_activities
        if not c:
            raise ValueError("`set_location_categories` needs `num_categories` > 0.")
        categories = _as_tensor(location_categories)
        if categories.shape != (n,) or categories.is_floating_point():
            raise ValueError(
                f"`location_categories` must be integers of shape ({n},), got {categories.dtype} "
                f"{tuple(categories.shape)}."
            )
        if bool(((categories < -1) | (categories >= c)).any()):
            raise ValueError(f"`location_categories` must be in [0, {c}) or -1 (unknown).")
        if category_activities is None:
            if a:
                raise ValueError("`category_activities` is required when `num_activities` > 0.")
        else:
            if not a:
                raise ValueError("`category_activities` was given but `num_activities` is 0.")
            activities = _as_tensor(category_activities)
            if activities.shape != (c,) or activities.is_floating_point():
                raise ValueError(
                    f"`category_activities` must be integers of shape ({c},), got {activities.dtype} "
                    f"{tuple(activities.shape)}."
                )
            if bool(((activities < -1) | (activities >= a)).any()):
                raise ValueError(f"`category_activities` must be in [0, {a}) or -1 (unknown).")
            self.category_activities.copy_(activities.long().to(self.category_activities.device))
        self.location_categories.copy_(categories.long().to(self.location_categories.device))

    @torch.no_grad()
    def set_candidate_mask(self, mask) -> None:
        """Set which locations may be predicted (`(num_locations,)` bools; the others score `-inf`), e.g. those that
        occurred in training: the ID rows of the others are trained only through the graph."""
        mask = _as_tensor(mask)
        if mask.shape != (self.config.num_locations,) or mask.dtype != torch.bool:
            raise ValueError(
                f"`mask` must be a bool tensor of shape ({self.config.num_locations},), got dtype {mask.dtype} and "
                f"shape {tuple(mask.shape)}."
            )
        if not bool(mask.any()):
            raise ValueError("`mask` must allow at least one candidate location, got all False.")
        self.candidate_mask.copy_(mask.to(self.candidate_mask.device))

    # node representations

    def node_representations(self) -> M3obNodeRepresentations:
        """The representations of every location (with gradients): the two GCN branches, the gate and the fused
        embeddings (see the module docstring)."""
        if self.config.num_edges == 0:
            logger.warning_once("M3ob has no relational graph yet (`set_graph`): the GCNs see only self-loops.")
        id_embeddings = self.location_embeddings.weight  # (N, d)
        id_hidden = self.id_encoder(id_embeddings, self.edge_index, self.edge_weight)
        if self.image_projection is None:
            mixed = id_hidden
            return M3obNodeRepresentations(
                fused=self.fusion_norm(mixed + id_embeddings), id_embeddings=id_embeddings, id_hidden=id_hidden,
                mixed=mixed,
            )
        image_inputs = self.image_projection(self.image_features.to(id_embeddings.dtype))  # (N, d)
        image_hidden = self.image_encoder(image_inputs, self.edge_index, self.edge_weight)
        gate = None
        if self.gate_proj is not None:
            gate = torch.sigmoid(self.gate_proj(torch.cat([id_hidden, image_hidden], dim=-1)))  # (N, d)
            mixed = gate * id_hidden + (1.0 - gate) * image_hidden
        else:
            mixed = id_hidden + image_hidden
        return M3obNodeRepresentations(
            fused=self.fusion_norm(mixed + id_embeddings + image_inputs), id_embeddings=id_embeddings,
            id_hidden=id_hidden, image_inputs=image_inputs, image_hidden=image_hidden, gate=gate, mixed=mixed,
        )

    @torch.no_grad()
    def fused_location_embeddings(self) -> torch.Tensor:
        """The fused location embeddings `(num_locations, hidden_size)` without gradients (e.g. for a PCA plot; call
        `model.eval()` first to switch dropout off)."""
        return self.node_representations().fused

    def alignment_loss(self, nodes: M3obNodeRepresentations, locations: torch.LongTensor) -> torch.Tensor:
        """Symmetric InfoNCE between the projected image representations (`image_hidden`) and the projected TransE
        embeddings of the distinct `locations` (at most `alignment_max_nodes`, a random subset beyond)."""
        if self.alignment_logit_scale is None:
            raise ValueError("the alignment needs the image modality and `alignment_weight` > 0.")
        locations = torch.unique(locations)
        if locations.shape[0] > self.config.alignment_max_nodes:
            keep = torch.randperm(locations.shape[0], device=locations.device)[: self.config.alignment_max_nodes]
            locations = locations[keep]
        if locations.shape[0] < 2:  # nothing to contrast
            return nodes.image_hidden.sum() * 0.0
        image = self.image_alignment_proj(nodes.image_hidden[locations])
        kg = self.kg_alignment_proj(self.kg_embeddings[locations].to(image.dtype))
        scale = self.alignment_logit_scale.clamp(0.0, _MAX_LOGIT_SCALE)
        return symmetric_info_nce(image, kg, scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the alignment log-scale parameter in place to `[0, log(100)]` (forward uses the clamped value anyway;
        a training callback may call this after every optimiser step)."""
        if self.alignment_logit_scale is not None:
            self.alignment_logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)

    # id helpers

    def _lookup(self, kind: str) -> dict[str, int]:
        vocabulary = self.config.location_ids if kind == "location" else self.config.user_ids
        if vocabulary is None:
            raise ValueError(f"this model's config has no `{kind}_ids` vocabulary; pass integer indices instead.")
        if kind not in self._lookups:
            offset = 0 if kind == "location" else 1  # user row 0 is the unknown user
            self._lookups[kind] = {v: i + offset for i, v in enumerate(vocabulary)}
        return self._lookups[kind]

    def location_index(self, location_ids: Sequence[str]) -> torch.LongTensor:
        """Rows of the location table of `location_ids`; an id outside the vocabulary raises a `ValueError`."""
        lookup = self._lookup("location")
        missing = [loc for loc in location_ids if str(loc) not in lookup]
        if missing:
            raise ValueError(
                f"{len(missing)} location id(s) are not in the model's location vocabulary (e.g. {missing[:5]})."
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
        history_tz_offset_min: int = 0,
        target_tz_offset_min: int = 0,
        day0_weekday: int = 3,
    ) -> dict[str, torch.Tensor]:
        """A right-padded batch for `forward` from location ids and timestamps (a convenience for small batches).

        Args:
            history_location_ids (`Sequence[Sequence[str]]`): per sample, the visited location ids, oldest first.
            history_timestamps (`Sequence[Sequence[int]]`): per sample, the visit times (seconds).
            target_timestamps (`Sequence[int]`): per sample, the time of the visit to predict.
            users (`Sequence[str]`, *optional*): per sample, the user id (unknown users share one row).
            history_tz_offset_min (`int`, *optional*, defaults to 0): local-time offset (minutes) of the visits.
            target_tz_offset_min (`int`, *optional*, defaults to 0): local-time offset of the targets.
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
        input_ids = torch.zeros(n, width, dtype=torch.long)
        time_ids = torch.zeros(n, width, 3, dtype=torch.long)
        attention_mask = torch.zeros(n, width, dtype=torch.long)
        for row, (locations, stamps) in enumerate(zip(history_location_ids, history_timestamps)):
            input_ids[row, : len(locations)] = self.location_index(locations)
            time_ids[row, : len(locations)] = time_ids_from_timestamps(
                list(stamps), history_tz_offset_min, day0_weekday
            )
            attention_mask[row, : len(locations)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "time_ids": time_ids,
            "target_time_ids": time_ids_from_timestamps(list(target_timestamps), target_tz_offset_min, day0_weekday),
        }
        if users is not None:
            batch["user_ids"] = self.user_index(users)
        return {k: v.to(self.device) for k, v in batch.items()}

    # forward

    def _check_inputs(self, input_ids, attention_mask, time_ids, user_ids, target_time_ids, labels) -> None:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`input_ids` must have shape (batch, length >= 1), got {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        if time_ids is None or time_ids.shape != (batch, length, 3):
            got = None if time_ids is None else tuple(time_ids.shape)
            raise ValueError(f"`time_ids` (hour, quarter, weekday) must have shape ({batch}, {length}, 3), got {got}.")
        if user_ids is not None and user_ids.shape != (batch,):
            raise ValueError(f"`user_ids` must have shape ({batch},), got {tuple(user_ids.shape)}.")
        if target_time_ids is not None and target_time_ids.shape != (batch, 3):
            raise ValueError(f"`target_time_ids` must have shape ({batch}, 3), got {tuple(target_time_ids.shape)}.")
        if self.config.use_target_time and target_time_ids is None:
            raise ValueError("`target_time_ids` is required with `use_target_time=True`.")
        if labels is not None and labels.reshape(-1).shape[0] != batch:
            raise ValueError(f"`labels` must have one entry per sample ({batch}), got shape {tuple(labels.shape)}.")
        if (
            labels is not None
            and self.time_head is not None
            and self.config.time_loss_weight > 0
            and target_time_ids is None
        ):
            raise ValueError("`target_time_ids` is required with `labels`: it gives the label of the time head.")

    def _time_slots(self, target_time_ids: torch.LongTensor) -> torch.LongTensor:
        """Label of the time head: the hour (24 slots) or weekday x 24 + hour (168 slots)."""
        hour, weekday = target_time_ids[:, 0], target_time_ids[:, 2]
        return hour if self.config.num_time_slots == 24 else weekday * 24 + hour

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        time_ids: torch.LongTensor | None = None,
        user_ids: torch.LongTensor | None = None,
        target_time_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
    ) -> M3obOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Location-table rows of the history visits, oldest first. Padded steps (either side) may hold any
                value.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for visits, 0 for padding. Every row needs at least one visit. Defaults to all ones.
            time_ids (`torch.LongTensor` of shape `(batch_size, sequence_length, 3)`):
                Local (hour 0-23, quarter of the hour 0-3, weekday 0-6 with 0 = Monday) of every visit; see
                [`time_ids_from_timestamps`]. The quarter is not used.
            user_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                User-table rows (0 = unknown user). Defaults to the unknown user.
            target_time_ids (`torch.LongTensor` of shape `(batch_size, 3)`, *optional*):
                Time features of the visit to predict: the label of the time head (required with `labels` when the
                time head is trained), and an input only with `config.use_target_time`.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Location-table row of the next location; `-100` ignores a sample. The category, activity and time
                labels are derived from it and from `target_time_ids`.
            return_dict (`bool`, *optional*):
                Return an [`M3obOutput`] (default) or a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(input_ids, attention_mask, time_ids, user_ids, target_time_ids, labels)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = valid.sum(1)  # (B,)
        if bool((lengths == 0).any()):
            raise ValueError("every sample needs at least one history visit (a row of `attention_mask` is all 0).")
        if int(lengths.max()) > self.config.max_position_embeddings:
            raise ValueError(
                f"a history has {int(lengths.max())} visits, more than `max_position_embeddings` "
                f"({self.config.max_position_embeddings}); keep only the most recent visits."
            )
        num_locations = self.config.num_locations
        input_ids = input_ids.masked_fill(~valid, 0)
        if bool(((input_ids < 0) | (input_ids >= num_locations)).any()):
            raise ValueError(f"`input_ids` must be location-table rows in [0, {num_locations}).")
        time_ids = time_ids.masked_fill(~valid[..., None], 0)
        if bool(((time_ids < 0) | (time_ids >= time_ids.new_tensor(NUM_TIME_FEATURES))).any()):
            raise ValueError("`time_ids` columns must be hour in [0, 24), quarter in [0, 4) and weekday in [0, 7).")
        if user_ids is not None and bool(((user_ids < 0) | (user_ids > self.config.num_users)).any()):
            raise ValueError(f"`user_ids` must be user-table rows in [0, {self.config.num_users}].")

        nodes = self.node_representations()
        fused = nodes.fused  # (N, d)

        # history: fused location + hour + weekday + position counted back from the last visit
        positions = (lengths[:, None] - valid.long().cumsum(1)).clamp_min(0)  # (B, T): 0 at the last visit
        hidden = (
            fused[input_ids]
            + self.hour_embeddings(time_ids[..., 0])
            + self.weekday_embeddings(time_ids[..., 2])
            + self.position_embeddings(positions)
        )  # (B, T, d)
        hidden = self.input_dropout(hidden)
        length = input_ids.shape[1]
        # valid keys only; every query also sees itself so padded rows stay finite
        allowed = valid[:, None, :] | torch.eye(length, dtype=torch.bool, device=valid.device)[None]  # (B, T, T)
        allowed = allowed[:, None]  # (B, 1, T, T)
        for layer in self.layers:
            hidden = layer(hidden, allowed)

        # sequence representation: last valid step + user (+ target time)
        steps = torch.arange(length, device=input_ids.device)
        last = (valid.long() * (steps + 1)).argmax(1)  # (B,) index of the last valid step
        state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
        if user_ids is not None:
            state = state + self.user_embeddings(user_ids)
        if self.target_hour_embeddings is not None:
            state = (
                state
                + self.target_hour_embeddings(target_time_ids[:, 0])
                + self.target_weekday_embeddings(target_time_ids[:, 2])
            )
        state = self.head_dropout(state)

        query = self.location_head(state)  # (B, d)
        logits = (query @ fused.t()).masked_fill(~self.candidate_mask[None, :], float("-inf"))  # (B, N)
        category_logits = self.category_head(state) if self.category_head is not None else None
        activity_logits = self.activity_head(state) if self.activity_head is not None else None
        time_logits = self.time_head(state) if self.time_head is not None else None

        loss = location_loss = category_loss = activity_loss = time_loss = alignment_loss = None
        if labels is not None:
            labels = labels.reshape(-1).long()
            keep = labels != _IGNORE_INDEX
            if bool(((labels[keep] < 0) | (labels[keep] >= num_locations)).any()):
                raise ValueError(f"`labels` must be location-table rows in [0, {num_locations}) or -100.")
            rows = labels.clamp_min(0)
            # a target outside the candidates cannot be predicted and gives no location gradient
            location_labels = labels.masked_fill(~(keep & self.candidate_mask[rows]), _IGNORE_INDEX)
            location_loss = _masked_cross_entropy(logits, location_labels)
            loss = location_loss
            categories = self.location_categories[rows].masked_fill(~keep, -1)  # (B,) -1 = unknown
            if category_logits is not None:
                category_loss = _masked_cross_entropy(category_logits, categories.masked_fill(categories < 0, -100))
                loss = loss + self.config.category_loss_weight * category_loss
            if activity_logits is not None:
                activities = self.category_activities[categories.clamp_min(0)].masked_fill(categories < 0, -1)
                activity_loss = _masked_cross_entropy(activity_logits, activities.masked_fill(activities < 0, -100))
                loss = loss + self.config.activity_loss_weight * activity_loss
            if time_logits is not None and target_time_ids is not None:
                slots = self._time_slots(target_time_ids.long()).masked_fill(~keep, _IGNORE_INDEX)
                time_loss = _masked_cross_entropy(time_logits, slots)
                loss = loss + self.config.time_loss_weight * time_loss
            if self.training and self.alignment_logit_scale is not None:
                alignment_loss = self.alignment_loss(nodes, torch.cat([input_ids[valid], labels[keep]]))
                loss = loss + self.config.alignment_weight * alignment_loss

        gate = nodes.gate.mean(-1) if nodes.gate is not None else None  # (N,)
        output = M3obOutput(
            loss=loss, logits=logits, category_logits=category_logits, activity_logits=activity_logits,
            time_logits=time_logits, location_loss=location_loss, category_loss=category_loss,
            activity_loss=activity_loss, time_loss=time_loss, alignment_loss=alignment_loss, gate=gate, query=query,
        )
        return output if return_dict else output.to_tuple()
