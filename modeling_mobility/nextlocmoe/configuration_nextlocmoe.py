"""Configuration of NextLocMoE (arXiv 2505.24597): a truncated, frozen Llama-family decoder with a location-semantics
mixture of experts at the input and a personalised, history-aware mixture of LoRA experts in selected layers."""

from __future__ import annotations

import copy
import math
import numbers

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["NextLocMoEConfig"]

ROUTING_MODES = ("threshold", "topk")
# the five urban-function experts of the paper (location-semantics MoE)
DEFAULT_FUNCTION_NAMES = ("entertainment", "commercial", "education", "public", "residential")
# the eleven persona experts of the paper (personalised MoE)
DEFAULT_ROLE_NAMES = (
    "student",
    "teacher",
    "office_worker",
    "visitor",
    "night_shift_worker",
    "remote_worker",
    "service_worker",
    "public_official",
    "fitness_enthusiast",
    "retail_employee",
    "undefined",
)
# a tiny Llama decoder: the default backbone, for tests and inspection (recipes pass a real one)
DEFAULT_BACKBONE = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
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
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value!r}.")
    return value


def _check_names(name: str, values) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"`{name}` must be a non-empty list of strings, got {values!r}.")
    out = [str(v) for v in values]
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}` must hold distinct names, got {out}.")
    return out


def _check_pair(name: str, values, *, positive: bool = False) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or len(values) != 2:
        raise ValueError(f"`{name}` must be a pair (x, y) of numbers, got {values!r}.")
    out = [_check_float(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if positive and min(out) <= 0:
        raise ValueError(f"`{name}` must be > 0 in both coordinates, got {out}.")
    return out


def _backbone_from(value) -> PreTrainedConfig:
    """A config instance (deep-copied: truncation must not change the caller's) from a config, a dict or None."""
    if value is None:
        value = dict(DEFAULT_BACKBONE)
    if isinstance(value, PreTrainedConfig):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        values = dict(value)
        model_type = values.pop("model_type", "llama")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise ValueError(f"`backbone_config` has an unknown `model_type` {model_type!r}: {err}") from err
    raise ValueError(
        f"`backbone_config` must be a PreTrainedConfig, a dict with a `model_type` or None, got {type(value).__name__}."
    )


class NextLocMoEConfig(PreTrainedConfig):
    r"""
    Configuration of [`NextLocMoEForNextLocation`], NextLocMoE (Liu et al., arXiv 2505.24597): next-location
    prediction as coordinate regression with a frozen, truncated Llama-family decoder fed with step features instead
    of tokens.

    A step (a stay record) is the concatenation of a location embedding of its z-scored Web-Mercator coordinates
    (`location_dim`), weekday and hour embeddings (`time_dim` each) and a duration feature (`duration_dim`), so
    `step_dim = location_dim + 2 * time_dim + duration_dim` (176 in the paper). A causal temporal convolutional network
    over the long history gives a history summary that conditions two mixtures of experts:

    - the location-semantics MoE on the current window: one 2 -> `location_dim` expert per urban function
      (`function_names`), a router MLP on [history summary ; step features], top-`function_top_k` weighted by the
      raw softmax probabilities, added to the step's location embedding;
    - the personalised MoE replacing the MLP of the decoder layers `moe_layers`: one expert per persona
      (`role_names`), each the frozen MLP plus LoRA updates of its gate/up/down projections, routed per token by a
      history-aware router (token hidden state, history summary and a frozen persona vector), with cumulative
      probability threshold routing (`routing="threshold"`) or top-k routing.

    The decoder reads [a fixed text prompt (`prompt_token_ids`) ; the projected history ; the projected current
    window]; heads on the last position regress the next coordinates (metres) and the stay duration (hours). The
    loss is the mean Euclidean distance in metres plus `entropy_weight` times the mean personalised-router entropy.

    Defaults follow the published configuration (Llama-3.2-3B truncated to 12 layers, MoE in layers 8 and 10,
    11 personas, 5 functions, LoRA r 16 / alpha 16 / dropout 0.02, threshold 0.8 with at most 5 experts, entropy
    weight 300), except the backbone: the default `backbone_config` is a tiny Llama built in code (tests, demo); use
    [`NextLocMoEForNextLocation.from_backbone`] to start from a pretrained decoder.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the decoder (any Llama-family model whose decoder layers have an `mlp` with `gate_proj`,
            `up_proj`, `down_proj` and `act_fn`). A dict needs its `model_type` (defaults to `"llama"`). Defaults to a
            tiny Llama (hidden 64, 2 layers, 4 heads, intermediate 128, vocabulary 256).
        num_backbone_layers (`int`, *optional*):
            Keep only the first `num_backbone_layers` decoder layers (1 to the backbone's depth); sets
            `backbone_config.num_hidden_layers`. The paper keeps 12 of Llama-3.2-3B's 28.
        history_length (`int`, *optional*, defaults to 40):
            Maximum number of long-history steps.
        current_length (`int`, *optional*, defaults to 5):
            Maximum number of current-window steps.
        location_dim (`int`, *optional*, defaults to 128):
            Width of the location embedding of a step.
        time_dim (`int`, *optional*, defaults to 16):
            Width of each of the weekday (7) and hour (24) embeddings.
        duration_dim (`int`, *optional*, defaults to 16):
            Width of the duration feature.
        tcn_levels (`int`, *optional*, defaults to 5):
            Residual blocks of the history TCN (dilation `2**level`).
        tcn_kernel_size (`int`, *optional*, defaults to 4):
            Kernel size of the TCN convolutions.
        tcn_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the TCN blocks.
        function_names (`list[str]`, *optional*, defaults to the paper's five urban functions):
            One location-semantics expert per name.
        function_top_k (`int`, *optional*, defaults to 2):
            Function experts used per current step.
        router_hidden_size (`int`, *optional*, defaults to 128):
            Hidden width of the function router and of the personalised router's fusion MLP.
        role_names (`list[str]`, *optional*, defaults to the paper's eleven personas):
            One personalised expert per name.
        moe_layers (`list[int]`, *optional*):
            Indices of the (truncated) decoder layers whose MLP becomes a personalised MoE. Defaults to every second
            layer from two thirds of the depth (12 layers: `[8, 10]`; 2 layers: `[1]`).
        lora_rank (`int`, *optional*, defaults to 16):
            Rank of each expert's LoRA updates.
        lora_alpha (`float`, *optional*, defaults to 16):
            LoRA scale numerator (updates are scaled by `lora_alpha / lora_rank`).
        lora_dropout (`float`, *optional*, defaults to 0.02):
            Dropout on the LoRA inputs.
        routing (`str`, *optional*, defaults to `"threshold"`):
            `"threshold"`: per token, the smallest set of most probable experts whose cumulative probability reaches
            `routing_threshold`, at most `max_experts`; `"topk"`: the `routing_top_k` most probable experts. Kept
            probabilities are renormalised to sum to 1.
        routing_threshold (`float`, *optional*, defaults to 0.8):
            Cumulative probability of threshold routing, in (0, 1].
        max_experts (`int`, *optional*, defaults to 5):
            Cap on the experts of threshold routing.
        routing_top_k (`int`, *optional*, defaults to 2):
            Experts per token of top-k routing.
        entropy_weight (`float`, *optional*, defaults to 300.0):
            Weight of the mean router entropy in the loss (pushes the router towards confident routing).
        load_balance_weight (`float`, *optional*, defaults to 0.0):
            Weight of a Switch-Transformer-style load-balancing term (number of experts x sum over experts of the
            mean routing weight (held constant) times the mean router probability; 1 when balanced), averaged over the
            MoE layers. The paper has none (0, the default). An hf-mobility choice for short training runs: the LoRA
            updates start at zero, so all experts are equal and, at first, only the entropy term moves the router, which
            then collapses onto one expert for every token (only that expert ever trains); a small weight keeps
            different tokens on different experts while the entropy term keeps each token's routing confident.
        predict_offset (`bool`, *optional*, defaults to `False`):
            Regress the step from the last real record of the current window (`xy = last + head * coord_std`) instead of
            the absolute position (`xy = coord_mean + head * coord_std`, the paper). An hf-mobility choice: the
            prediction then starts at the last visited place, and the head learns where people go from there.
        history_pointer (`bool`, *optional*, defaults to `False`):
            Add a pointer head over the visits of the two windows (an hf-mobility choice; the paper has only the point
            regression): attention from the last position to every real visit, plus one "elsewhere" logit, trained by
            the log-likelihood of the visits at the target's coordinates (or of "elsewhere" when the target is not in
            the windows). Ranking then puts the window's places first, by pointer mass, and every other candidate
            after them by distance from the regressed point. A point regressor averages between the places a user
            may go next; the pointer can rank each of them. The regression head and its loss are unchanged.
        pointer_size (`int`, *optional*, defaults to 128):
            Width of the pointer's query and key projections.
        pointer_weight (`float`, *optional*, defaults to 1000.0):
            Weight of the pointer's negative log-likelihood (nats) next to the distance loss (metres): one nat counts
            as much as one kilometre.
        coord_mean (`list[float]`, *optional*, defaults to `[0.0, 0.0]`):
            Mean of the (x, y) Web-Mercator coordinates in metres, for z-scoring (set from the training split).
        coord_std (`list[float]`, *optional*, defaults to `[1000.0, 1000.0]`):
            Standard deviation of (x, y) in metres (> 0).
        duration_min_hours (`float`, *optional*, defaults to 0.1):
            Lower end of the min-max scaling of durations (shorter stays are clamped).
        duration_max_hours (`float`, *optional*, defaults to 24.0):
            Upper end of the min-max scaling of durations (longer stays are clamped).
        prompt_token_ids (`list[int]`, *optional*, defaults to `[]`):
            Token ids (backbone vocabulary) of the fixed text prompt put before the steps.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the new linear layers and embeddings.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the new layer norms.

    Example:

    ```python
    >>> from modeling_mobility.nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation

    >>> config = NextLocMoEConfig(history_length=8, current_length=3, location_dim=16, time_dim=4, duration_dim=4)
    >>> config.moe_layers
    [1]
    >>> model = NextLocMoEForNextLocation(config)

    ```"""

    model_type = "hf-mobility-nextlocmoe"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="llama",
            init_kwargs={k: v for k, v in DEFAULT_BACKBONE.items() if k != "model_type"},
        )
    }

    def __init__(
        self,
        backbone_config: PreTrainedConfig | dict | None = None,
        num_backbone_layers: int | None = None,
        history_length: int = 40,
        current_length: int = 5,
        location_dim: int = 128,
        time_dim: int = 16,
        duration_dim: int = 16,
        tcn_levels: int = 5,
        tcn_kernel_size: int = 4,
        tcn_dropout: float = 0.1,
        function_names: list[str] | tuple[str, ...] = DEFAULT_FUNCTION_NAMES,
        function_top_k: int = 2,
        router_hidden_size: int = 128,
        role_names: list[str] | tuple[str, ...] = DEFAULT_ROLE_NAMES,
        moe_layers: list[int] | None = None,
        lora_rank: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.02,
        routing: str = "threshold",
        routing_threshold: float = 0.8,
        max_experts: int = 5,
        routing_top_k: int = 2,
        entropy_weight: float = 300.0,
        load_balance_weight: float = 0.0,
        predict_offset: bool = False,
        history_pointer: bool = False,
        pointer_size: int = 128,
        pointer_weight: float = 1000.0,
        coord_mean: list[float] | tuple[float, float] = (0.0, 0.0),
        coord_std: list[float] | tuple[float, float] = (1000.0, 1000.0),
        duration_min_hours: float = 0.1,
        duration_max_hours: float = 24.0,
        prompt_token_ids: list[int] | tuple[int, ...] = (),
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        **kwargs,
    ):
        backbone = _backbone_from(backbone_config)
        for attribute in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if not isinstance(getattr(backbone, attribute, None), int):
                raise ValueError(
                    f"`backbone_config` ({type(backbone).__name__}) must be a decoder config with an integer "
                    f"`{attribute}`."
                )
        depth = backbone.num_hidden_layers
        if num_backbone_layers is not None:
            num_backbone_layers = _check_int("num_backbone_layers", num_backbone_layers, 1)
            if num_backbone_layers > depth:
                raise ValueError(
                    f"`num_backbone_layers` must be between 1 and the backbone's {depth} layers, got "
                    f"{num_backbone_layers}."
                )
            backbone.num_hidden_layers = num_backbone_layers
            layer_types = getattr(backbone, "layer_types", None)
            if isinstance(layer_types, (list, tuple)) and len(layer_types) > num_backbone_layers:
                backbone.layer_types = list(layer_types[:num_backbone_layers])
            depth = num_backbone_layers
        self.backbone_config = backbone
        self.num_backbone_layers = num_backbone_layers

        self.history_length = _check_int("history_length", history_length, 1)
        self.current_length = _check_int("current_length", current_length, 1)
        self.location_dim = _check_int("location_dim", location_dim, 1)
        self.time_dim = _check_int("time_dim", time_dim, 1)
        self.duration_dim = _check_int("duration_dim", duration_dim, 1)
        self.tcn_levels = _check_int("tcn_levels", tcn_levels, 1)
        self.tcn_kernel_size = _check_int("tcn_kernel_size", tcn_kernel_size, 1)
        self.tcn_dropout = _check_float("tcn_dropout", tcn_dropout, minimum=0.0, maximum=1.0)
        if self.tcn_dropout == 1.0:
            raise ValueError("`tcn_dropout` must be < 1, got 1.0.")

        self.function_names = _check_names("function_names", function_names)
        self.function_top_k = _check_int("function_top_k", function_top_k, 1)
        if self.function_top_k > len(self.function_names):
            raise ValueError(
                f"`function_top_k` ({self.function_top_k}) must be <= the number of function experts "
                f"({len(self.function_names)})."
            )
        self.router_hidden_size = _check_int("router_hidden_size", router_hidden_size, 1)
        self.role_names = _check_names("role_names", role_names)
        num_roles = len(self.role_names)

        if moe_layers is None:
            moe_layers = list(range((2 * depth) // 3, depth, 2))
        if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, (list, tuple)) or not moe_layers:
            raise ValueError(f"`moe_layers` must be a non-empty list of layer indices, got {moe_layers!r}.")
        layers = [_check_int("moe_layers[i]", i, 0) for i in moe_layers]
        if max(layers) >= depth or len(set(layers)) != len(layers):
            raise ValueError(
                f"`moe_layers` must hold distinct indices in [0, {depth}) (the truncated depth), got {list(moe_layers)}."
            )
        self.moe_layers = sorted(layers)

        self.lora_rank = _check_int("lora_rank", lora_rank, 1)
        self.lora_alpha = _check_float("lora_alpha", lora_alpha, minimum=0.0, exclusive=True)
        self.lora_dropout = _check_float("lora_dropout", lora_dropout, minimum=0.0, maximum=1.0)
        if self.lora_dropout == 1.0:
            raise ValueError("`lora_dropout` must be < 1, got 1.0.")
        if routing not in ROUTING_MODES:
            raise ValueError(f"`routing` must be one of {list(ROUTING_MODES)}, got {routing!r}.")
        self.routing = routing
        self.routing_threshold = _check_float(
            "routing_threshold", routing_threshold, minimum=0.0, exclusive=True, maximum=1.0
        )
        self.max_experts = _check_int("max_experts", max_experts, 1)
        if self.max_experts > num_roles:
            raise ValueError(f"`max_experts` ({self.max_experts}) must be <= the number of role experts ({num_roles}).")
        self.routing_top_k = _check_int("routing_top_k", routing_top_k, 1)
        if self.routing_top_k > num_roles:
            raise ValueError(
                f"`routing_top_k` ({self.routing_top_k}) must be <= the number of role experts ({num_roles})."
            )
        self.entropy_weight = _check_float("entropy_weight", entropy_weight, minimum=0.0)
        self.load_balance_weight = _check_float("load_balance_weight", load_balance_weight, minimum=0.0)
        if not isinstance(predict_offset, bool):
            raise ValueError(f"`predict_offset` must be a bool, got {predict_offset!r}.")
        self.predict_offset = predict_offset
        if not isinstance(history_pointer, bool):
            raise ValueError(f"`history_pointer` must be a bool, got {history_pointer!r}.")
        self.history_pointer = history_pointer
        self.pointer_size = _check_int("pointer_size", pointer_size, 1)
        self.pointer_weight = _check_float("pointer_weight", pointer_weight, minimum=0.0)

        self.coord_mean = _check_pair("coord_mean", coord_mean)
        self.coord_std = _check_pair("coord_std", coord_std, positive=True)
        self.duration_min_hours = _check_float("duration_min_hours", duration_min_hours, minimum=0.0)
        self.duration_max_hours = _check_float("duration_max_hours", duration_max_hours)
        if self.duration_max_hours <= self.duration_min_hours:
            raise ValueError(
                f"`duration_max_hours` ({self.duration_max_hours}) must be > `duration_min_hours` "
                f"({self.duration_min_hours})."
            )

        if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, (list, tuple)):
            raise ValueError(f"`prompt_token_ids` must be a list of token ids, got {type(prompt_token_ids).__name__}.")
        vocab = backbone.vocab_size
        ids = [_check_int("prompt_token_ids[i]", t, 0) for t in prompt_token_ids]
        if any(t >= vocab for t in ids):
            raise ValueError(f"`prompt_token_ids` must be ids of the backbone vocabulary [0, {vocab}), got {max(ids)}.")
        self.prompt_token_ids = ids

        self.initializer_range = _check_float("initializer_range", initializer_range, minimum=0.0, exclusive=True)
        self.layer_norm_eps = _check_float("layer_norm_eps", layer_norm_eps, minimum=0.0, exclusive=True)
        super().__init__(**kwargs)

    @property
    def step_dim(self) -> int:
        """Width of a step's feature vector: `location_dim + 2 * time_dim + duration_dim`."""
        return self.location_dim + 2 * self.time_dim + self.duration_dim

    @property
    def num_functions(self) -> int:
        """Number of location-semantics (urban function) experts."""
        return len(self.function_names)

    @property
    def num_roles(self) -> int:
        """Number of personalised (persona) experts."""
        return len(self.role_names)
