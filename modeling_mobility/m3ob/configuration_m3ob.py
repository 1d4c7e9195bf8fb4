"""Configuration of M3ob (Dai et al., "Learning Multi-Modal Mobility Dynamics for Generalized Next Location
Recommendation", arXiv 2512.22605): GCNs over an ID and an image modality on a kNN graph of frozen TransE location
embeddings, gated fusion, a knowledge-graph-guided contrastive alignment and a transformer with multi-task heads."""

from __future__ import annotations

import math
import numbers

from transformers import PreTrainedConfig

__all__ = ["M3obConfig"]

MODALITIES = (("id",), ("id", "image"))
FUSIONS = ("gate", "sum")
HIDDEN_ACTS = ("gelu", "relu")
# time-slot vocabularies of the time head: the target hour, or weekday x hour
TIME_SLOT_SIZES = (0, 24, 168)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_float(
    name: str, value, *, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None,
    maximum_exclusive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if exclusive else '>='} {minimum}, got {value!r}.")
    if maximum is not None and (value >= maximum if maximum_exclusive else value > maximum):
        raise ValueError(f"`{name}` must be {'<' if maximum_exclusive else '<='} {maximum}, got {value!r}.")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}.")
    return value


def _check_choice(name: str, value, allowed: tuple) -> str:
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


class M3obConfig(PreTrainedConfig):
    r"""
    Configuration of [`M3obForNextLocation`], M3ob (Dai et al., arXiv 2512.22605): next-location recommendation from
    multi-modal location representations learned on a relational graph.

    - A spatial-temporal knowledge graph (locations, categories, activity types and their relations) is embedded with
      TransE outside the model; the frozen location embeddings (`kg_embedding_dim`) and the kNN relational graph built
      from them ([`build_knn_graph`], `num_neighbors`) are saved with the model as buffers (`num_edges` edges).
    - Each modality is encoded over the same graph by `num_gcn_layers` GCN layers: the ID modality from a learned
      location table, the image modality from frozen image features (`image_feature_dim`, e.g. remote-sensing image
      embeddings) through a small MLP.
    - The modalities are fused per location (`fusion`: a sigmoid gate or a sum), plus a residual of the GCN inputs,
      then layer-normalised.
    - A contrastive loss (`alignment_weight`, `alignment_temperature`) aligns the image representations with the
      TransE embeddings.
    - A transformer encoder reads the fused embeddings of the history with hour, weekday and position embeddings; the
      output at the last visit plus a user embedding scores every location by dot product (next location) and feeds
      the next category, activity and time-slot heads.

    The paper publishes no code; every setting that the paper does not fix is an hf-mobility choice, not from the
    paper: all the defaults below except the structure described above (TransE embeddings, kNN graph, GCNs, gate,
    contrastive alignment, transformer, four tasks).

    Args:
        num_locations (`int`, *optional*):
            Rows of the location table (graph nodes). Defaults to `len(location_ids)`; required when `location_ids` is
            not given.
        location_ids (`list[str]`, *optional*):
            The location vocabulary in table order (row `i` is `location_ids[i]`), saved with the model.
        num_users (`int`, *optional*):
            Known users. Defaults to `len(user_ids)` (0 when neither is given). The user table has `num_users + 1`
            rows: row 0 is the shared "unknown user" (a zero vector, never trained), user `user_ids[i]` is row `i + 1`.
        user_ids (`list[str]`, *optional*):
            The user vocabulary (training users).
        num_categories (`int`, *optional*, defaults to 0):
            Location categories (labels of the next-category head; 0 = no category head). The category of every
            location is a buffer set by [`M3obForNextLocation.set_location_categories`].
        num_activities (`int`, *optional*, defaults to 0):
            Activity types (the paper's LLM-derived activities of the categories; 0 = no activity head). Needs
            `num_categories > 0`: a location's activity is the activity of its category.
        num_time_slots (`int`, *optional*, defaults to 24):
            Classes of the next-time head: 24 (the target hour), 168 (weekday x 24 + hour) or 0 (no time head). The
            paper's time-slot scheme is not published (hf-mobility choice, not from the paper).
        kg_embedding_dim (`int`, *optional*, defaults to 64):
            Width of the frozen TransE location embeddings (hf-mobility choice, not from the paper).
        image_feature_dim (`int`, *optional*, defaults to 0):
            Width of the frozen image features; 0 = no image modality.
        modalities (`list[str]`, *optional*):
            `["id"]` or `["id", "image"]`. Defaults to `["id", "image"]` when `image_feature_dim > 0`, else `["id"]`.
        hidden_size (`int`, *optional*, defaults to 128):
            Width of the node representations and of the transformer (hf-mobility choice, not from the paper).
        num_gcn_layers (`int`, *optional*, defaults to 2):
            GCN layers of each modality's graph encoder (hf-mobility choice, not from the paper).
        num_neighbors (`int`, *optional*, defaults to 10):
            `k` of the kNN graph built by [`M3obForNextLocation.set_graph`] when no edges are given
            (hf-mobility choice, not from the paper).
        num_edges (`int`, *optional*, defaults to 0):
            Edges of the saved graph (shape of the `edge_index`/`edge_weight` buffers); set by `set_graph`.
        fusion (`str`, *optional*, defaults to `"gate"`):
            `"gate"`: `g = sigmoid(W [h_id ; h_image] + b)` per location and dimension, `g * h_id + (1 - g) * h_image`
            (the paper); `"sum"`: `h_id + h_image` (an ablation; hf-mobility choice, not from the paper).
        alignment_weight (`float`, *optional*, defaults to 0.1):
            Weight of the image-knowledge-graph contrastive loss (0 = off; only with the image modality;
            hf-mobility choice, not from the paper).
        alignment_temperature (`float`, *optional*, defaults to 0.07):
            Initial temperature of the alignment; learnable as a log-scale, clamped to a scale of at most 100 (as in
            CLIP; hf-mobility choice, not from the paper).
        alignment_max_nodes (`int`, *optional*, defaults to 1024):
            The alignment contrasts the distinct locations of the batch (history and targets); above this many, a
            random subset of them (bounds the quadratic cost; hf-mobility choice, not from the paper).
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Transformer encoder layers (hf-mobility choice, not from the paper).
        num_attention_heads (`int`, *optional*, defaults to 4):
            Attention heads; must divide `hidden_size` (hf-mobility choice, not from the paper).
        intermediate_size (`int`, *optional*, defaults to 256):
            Width of each encoder layer's feed-forward block (hf-mobility choice, not from the paper).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward blocks, the image MLP and between GCN layers: `"gelu"` or `"relu"`
            (hf-mobility choice, not from the paper).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout between GCN layers, on the sequence inputs, inside the encoder layers and before the heads
            (hf-mobility choice, not from the paper).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the attention weights (hf-mobility choice, not from the paper).
        max_position_embeddings (`int`, *optional*, defaults to 128):
            Longest history (learned position embeddings, counted back from the most recent visit;
            hf-mobility choice, not from the paper).
        category_loss_weight (`float`, *optional*, defaults to 0.2):
            Weight of the next-category cross-entropy (hf-mobility choice, not from the paper).
        activity_loss_weight (`float`, *optional*, defaults to 0.2):
            Weight of the next-activity cross-entropy (hf-mobility choice, not from the paper).
        time_loss_weight (`float`, *optional*, defaults to 0.2):
            Weight of the next-time-slot cross-entropy (hf-mobility choice, not from the paper).
        use_target_time (`bool`, *optional*, defaults to `False`):
            Add hour and weekday embeddings of the target's time at the head. The time head predicts that time, so
            this would feed it its own label: it needs `num_time_slots=0` (hf-mobility choice, not from the paper).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the layer norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of embeddings and linear weights.

    Example:

    ```python
    >>> from modeling_mobility.m3ob import M3obConfig, M3obForNextLocation

    >>> config = M3obConfig(location_ids=["a", "b", "c"], user_ids=["u1"], num_categories=2, num_activities=2,
    ...                     kg_embedding_dim=8, image_feature_dim=6, hidden_size=16, intermediate_size=32)
    >>> config.modalities
    ['id', 'image']
    >>> model = M3obForNextLocation(config)

    ```"""

    model_type = "hf-mobility-m3ob"

    def __init__(
        self,
        num_locations: int | None = None,
        location_ids: list[str] | None = None,
        num_users: int | None = None,
        user_ids: list[str] | None = None,
        num_categories: int = 0,
        num_activities: int = 0,
        num_time_slots: int = 24,
        kg_embedding_dim: int = 64,
        image_feature_dim: int = 0,
        modalities: list[str] | None = None,
        hidden_size: int = 128,
        num_gcn_layers: int = 2,
        num_neighbors: int = 10,
        num_edges: int = 0,
        fusion: str = "gate",
        alignment_weight: float = 0.1,
        alignment_temperature: float = 0.07,
        alignment_max_nodes: int = 1024,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 256,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 128,
        category_loss_weight: float = 0.2,
        activity_loss_weight: float = 0.2,
        time_loss_weight: float = 0.2,
        use_target_time: bool = False,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.location_ids = _check_vocabulary("location_ids", location_ids)
        if num_locations is None:
            # 1: a placeholder config (e.g. `M3obConfig()` for inspection); tables need real sizes
            num_locations = 1 if self.location_ids is None else len(self.location_ids)
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
        self.num_categories = _check_int("num_categories", num_categories, 0)
        self.num_activities = _check_int("num_activities", num_activities, 0)
        if self.num_activities and not self.num_categories:
            raise ValueError(
                f"`num_activities` ({self.num_activities}) needs `num_categories` > 0: a location's activity is the "
                "activity of its category."
            )
        self.num_time_slots = _check_choice("num_time_slots", num_time_slots, TIME_SLOT_SIZES)
        self.kg_embedding_dim = _check_int("kg_embedding_dim", kg_embedding_dim, 1)
        self.image_feature_dim = _check_int("image_feature_dim", image_feature_dim, 0)
        if modalities is None:
            modalities = ["id", "image"] if self.image_feature_dim else ["id"]
        if isinstance(modalities, (str, bytes)) or tuple(modalities) not in MODALITIES:
            raise ValueError(f"`modalities` must be one of {[list(m) for m in MODALITIES]}, got {modalities!r}.")
        self.modalities = list(modalities)
        if "image" in self.modalities and not self.image_feature_dim:
            raise ValueError("`modalities` includes 'image', which needs `image_feature_dim` >= 1, got 0.")
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_gcn_layers = _check_int("num_gcn_layers", num_gcn_layers, 1)
        self.num_neighbors = _check_int("num_neighbors", num_neighbors, 1)
        self.num_edges = _check_int("num_edges", num_edges, 0)
        self.fusion = _check_choice("fusion", fusion, FUSIONS)
        self.alignment_weight = _check_float("alignment_weight", alignment_weight, minimum=0.0)
        self.alignment_temperature = _check_float(
            "alignment_temperature", alignment_temperature, minimum=0.01, maximum=1.0
        )
        self.alignment_max_nodes = _check_int("alignment_max_nodes", alignment_max_nodes, 2)
        self.num_hidden_layers = _check_int("num_hidden_layers", num_hidden_layers, 1)
        self.num_attention_heads = _check_int("num_attention_heads", num_attention_heads, 1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        self.intermediate_size = _check_int("intermediate_size", intermediate_size, 1)
        self.hidden_act = _check_choice("hidden_act", hidden_act, HIDDEN_ACTS)
        self.hidden_dropout_prob = _check_float(
            "hidden_dropout_prob", hidden_dropout_prob, minimum=0.0, maximum=1.0, maximum_exclusive=True
        )
        self.attention_probs_dropout_prob = _check_float(
            "attention_probs_dropout_prob", attention_probs_dropout_prob, minimum=0.0, maximum=1.0,
            maximum_exclusive=True,
        )
        self.max_position_embeddings = _check_int("max_position_embeddings", max_position_embeddings, 1)
        self.category_loss_weight = _check_float("category_loss_weight", category_loss_weight, minimum=0.0)
        self.activity_loss_weight = _check_float("activity_loss_weight", activity_loss_weight, minimum=0.0)
        self.time_loss_weight = _check_float("time_loss_weight", time_loss_weight, minimum=0.0)
        self.use_target_time = _check_bool("use_target_time", use_target_time)
        if self.use_target_time and self.num_time_slots:
            raise ValueError(
                "`use_target_time=True` feeds the target's time to the head, which is the label of the time head; "
                f"set `num_time_slots=0` (got {self.num_time_slots}) or `use_target_time=False`."
            )
        self.layer_norm_eps = _check_float("layer_norm_eps", layer_norm_eps, minimum=0.0, exclusive=True)
        self.initializer_range = _check_float("initializer_range", initializer_range, minimum=0.0, exclusive=True)
        super().__init__(**kwargs)

    @property
    def use_image(self) -> bool:
        """Whether the image modality is on."""
        return "image" in self.modalities

    @property
    def use_alignment(self) -> bool:
        """Whether the contrastive image-knowledge-graph alignment is on (image modality and a positive weight)."""
        return self.use_image and self.alignment_weight > 0
