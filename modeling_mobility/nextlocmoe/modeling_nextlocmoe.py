"""NextLocMoE (Liu et al., arXiv 2505.24597): next-location prediction as coordinate regression with a frozen,
truncated Llama-family decoder and two mixtures of experts.

A sample is a user's long history (up to `history_length` stay records) and current window (up to `current_length`
records), each record an (x, y) Web-Mercator point in metres, a weekday, an hour and a stay duration in hours; the
model regresses the (x, y) of the next record.

- Step features: a location embedding of the z-scored coordinates, weekday and hour embeddings and a duration feature
  of the min-max scaled duration, concatenated (`config.step_dim`).
- History encoder: a causal dilated temporal convolutional network over the history ([`TemporalConvNet`]); its output
  at the last real history step is the history summary (zeros for an empty history).
- Location-semantics MoE (current window only): one 2 -> `location_dim` expert per urban function, a router MLP on
  [history summary ; step features], top-k of the softmax weighted by the raw probabilities (not renormalised, as
  published), added to the step's location embedding.
- Decoder input: [embeddings of the fixed text prompt (the backbone's frozen table) ; Linear(step) of the history ;
  a second Linear(step) of the current window], passed as `inputs_embeds` with the standard `attention_mask` (so the
  decoder applies a real causal mask over the real steps) and positions that count real steps only.
- Personalised MoE ([`PersonalizedMoEMLP`]) in the decoder layers `moe_layers`: per-persona experts = the frozen MLP
  plus LoRA updates of gate/up/down, routed per token by a history-aware router with cumulative-probability threshold
  routing ([`threshold_routing`]) or top-k routing ([`topk_routing`]).
- Heads on the last real position: Linear -> z-scored (x, y) -> metres; Linear + ReLU -> min-max scaled duration ->
  hours (reported, not in the loss). Loss = mean Euclidean distance in metres + `entropy_weight` x router entropy.

Where this differs from the published code (all documented at the place they apply): threshold routing follows the
paper's rule (the code's threshold branch mixes index spaces and drops the expert cap), the decoder gets a real
causal + padding mask through its standard argument (the code hands its mask to attention under a keyword Llama
attention ignores), description vectors average the real tokens only (the code includes padding), and the TCN uses
plain convolutions (the code's pytorch-tcn default uses weight normalisation).

The file imports only torch, numpy and transformers (and its sibling configuration file), so a saved folder loads
with `AutoModel.from_pretrained(folder, trust_remote_code=True)` without this library installed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_nextlocmoe import NextLocMoEConfig

__all__ = [
    "NUM_HOURS",
    "NUM_WEEKDAYS",
    "NextLocMoEForNextLocation",
    "NextLocMoEOutput",
    "NextLocMoEPreTrainedModel",
    "PersonalizedMoEMLP",
    "TemporalConvNet",
    "threshold_routing",
    "topk_routing",
]

logger = logging.get_logger(__name__)

NUM_WEEKDAYS = 7
NUM_HOURS = 24
# slack on the cumulative mass of threshold routing, so that float rounding (0.5 + 0.3 = 0.79999995) does not add an
# expert to a prefix that reaches the threshold exactly
_THRESHOLD_TOLERANCE = 1e-6


# routing rules


def _renormalised(probs: torch.Tensor, keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Scatter a keep-mask from sorted to expert order and renormalise the kept probabilities to sum 1."""
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep.to(probs.dtype)
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


def threshold_routing(probs: torch.Tensor, threshold: float, max_experts: int) -> torch.Tensor:
    """Cumulative-probability ("confidence threshold") routing, the rule of the NextLocMoE paper.

    Per row, the experts are ranked by probability (descending; ties keep the lower expert index first), the smallest
    prefix whose cumulative probability reaches `threshold` is kept (at least one expert, at most `max_experts`), the
    kept probabilities are renormalised to sum to 1 and written back at their expert ids, zeros elsewhere.

    The published code's threshold branch mixes the sorted and the unsorted index spaces and then drops the cap, so in
    practice nearly all experts fire (it drops one, effectively arbitrary, position) with unnormalised weights; this is
    the paper's rule instead.

    Args:
        probs (`torch.Tensor` of shape `(..., num_experts)`): routing probabilities (rows summing to 1).
        threshold (`float`): cumulative probability to reach, in (0, 1].
        max_experts (`int`): cap on the kept experts (>= 1).

    Returns:
        `torch.Tensor` of the shape of `probs`: the routing weights, differentiable with respect to the kept
        probabilities (the selection itself is discrete).
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}.")
    if int(max_experts) < 1:
        raise ValueError(f"`max_experts` must be >= 1, got {max_experts!r}.")
    sorted_probs, order = probs.detach().sort(dim=-1, descending=True, stable=True)
    mass_before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))  # (..., E): mass of the experts ranked above
    keep_sorted = mass_before < float(threshold) - _THRESHOLD_TOLERANCE
    keep_sorted[..., 0] = True
    keep_sorted[..., int(max_experts) :] = False
    return _renormalised(probs, keep_sorted, order)


def topk_routing(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k routing: per row, the `k` most probable experts (ties keep the lower expert index first), their
    probabilities renormalised to sum to 1, zeros elsewhere.

    Args:
        probs (`torch.Tensor` of shape `(..., num_experts)`): routing probabilities.
        k (`int`): experts per row, 1 to `num_experts`.

    Returns:
        `torch.Tensor` of the shape of `probs`: the routing weights, differentiable with respect to the kept
        probabilities.
    """
    if not 1 <= int(k) <= probs.shape[-1]:
        raise ValueError(f"`k` must be between 1 and the number of experts ({probs.shape[-1]}), got {k!r}.")
    _, order = probs.detach().sort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.zeros_like(probs, dtype=torch.bool)
    keep_sorted[..., : int(k)] = True
    return _renormalised(probs, keep_sorted, order)


# outputs


@dataclass
class NextLocMoEOutput(ModelOutput):
    r"""
    Output of [`NextLocMoEForNextLocation.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean Euclidean distance (metres) between predicted and true coordinates + `config.entropy_weight` x
            `router_entropy` (+ `config.load_balance_weight` x `load_balance` when that weight is set, +
            `config.pointer_weight` x `pointer_nll` with `config.history_pointer`; returned when `labels` is given).
        distance (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            Euclidean distance (metres) of each prediction to its label (returned when `labels` is given).
        xy (`torch.FloatTensor` of shape `(batch_size, 2)`):
            Predicted next (x, y) in metres (the coordinate system of the inputs).
        duration (`torch.FloatTensor` of shape `(batch_size,)`):
            Predicted stay duration in hours (reported only; not part of the loss).
        router_entropy (`torch.FloatTensor` of shape `()`):
            Entropy of the personalised routers' softmax, averaged over the real tokens of the batch and over the MoE
            layers.
        load_balance (`torch.FloatTensor` of shape `()`):
            The load-balancing term (1 when every expert gets the same routing mass and probability, up to the number
            of experts when one expert takes everything), averaged over the MoE layers.
        expert_load (`torch.FloatTensor` of shape `(num_moe_layers, num_roles)`):
            Mean routing weight of each persona expert over the real tokens of the batch, per MoE layer.
        role_weights (`torch.FloatTensor` of shape `(batch_size, num_roles)`):
            Per sample, the mean routing weight of each persona expert over its real tokens (prompt included),
            averaged over the MoE layers.
        function_weights (`torch.FloatTensor` of shape `(batch_size, current_steps, num_functions)`):
            Weights of the location-semantics experts per current step (raw softmax probabilities of the top-k, zeros
            elsewhere and on padded steps).
        pointer_probs (`torch.FloatTensor` of shape `(batch_size, history_steps + current_steps + 1)`, *optional*):
            With `config.history_pointer`: the pointer's probability of each visit of [history ; current] (0 on
            padded steps) and, last, of "elsewhere" (a place outside the windows); each row sums to 1.
        pointer_nll (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            With `config.history_pointer` and `labels`: minus the log of the pointer mass on the visits at the
            label's coordinates (or on "elsewhere" when no real visit is there).
    """

    loss: torch.FloatTensor | None = None
    distance: torch.FloatTensor | None = None
    xy: torch.FloatTensor | None = None
    duration: torch.FloatTensor | None = None
    router_entropy: torch.FloatTensor | None = None
    load_balance: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None
    role_weights: torch.FloatTensor | None = None
    function_weights: torch.FloatTensor | None = None
    pointer_probs: torch.FloatTensor | None = None
    pointer_nll: torch.FloatTensor | None = None


# building blocks


class TemporalBlock(nn.Module):
    """One residual block of [`TemporalConvNet`]: two causal dilated convolutions (left padding only), each followed
    by ReLU and dropout, plus the identity; padded steps are reset to zero after every convolution."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.left_padding = (kernel_size - 1) * dilation
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # hidden_states: (B, C, T); mask: (B, 1, T) of 0/1
        out = self.dropout(F.relu(self.conv1(F.pad(hidden_states, (self.left_padding, 0))))) * mask
        out = self.dropout(F.relu(self.conv2(F.pad(out, (self.left_padding, 0))))) * mask
        return F.relu(out + hidden_states) * mask


class TemporalConvNet(nn.Module):
    """Causal temporal convolutional network over a step sequence: `num_levels` residual blocks with dilation
    `2**level`, then a LayerNorm over the channels. Input and output `(batch, time, channels)`.

    Output step `t` depends on input steps `<= t` only. Padded steps (`mask` False) enter as zeros and are reset to
    zero after every convolution, so a real step sees padding exactly as it sees the causal zero padding before the
    sequence start: extra left padding does not change the output at real steps; padded steps output zeros.

    The published model uses pytorch-tcn at its defaults (kernel 4, dilations 2^i, dropout 0.1, ReLU, no skip
    connections) with weight normalisation on the convolutions; these are plain convolutions (an hf-mobility choice:
    the reparametrisation changes optimisation only, and plain weights save and initialise like any other layer).
    """

    def __init__(self, channels: int, num_levels: int = 5, kernel_size: int = 4, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(
            [TemporalBlock(channels, kernel_size, 2**level, dropout) for level in range(num_levels)]
        )
        self.norm = nn.LayerNorm(channels, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        step_mask = mask.to(hidden_states.dtype)[:, None, :]  # (B, 1, T)
        out = hidden_states.transpose(1, 2) * step_mask  # (B, C, T)
        for block in self.blocks:
            out = block(out, step_mask)
        return self.norm(out.transpose(1, 2)) * mask[..., None].to(hidden_states.dtype)  # (B, T, C)


class LoRAExpert(nn.Module):
    """The low-rank updates of one persona expert on the gate, up and down projections of a gated MLP:
    `delta(x) = B(A(dropout(x))) * lora_alpha / lora_rank`, `A` Kaiming-uniform, `B` zero (so a new expert equals the
    frozen MLP). Parameters are plain tensors (`*_lora_A`: `(rank, in)`, `*_lora_B`: `(out, rank)`), initialised here
    and in [`NextLocMoEPreTrainedModel._init_weights`]."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        shapes = {"gate": (hidden_size, intermediate_size), "up": (hidden_size, intermediate_size),
                  "down": (intermediate_size, hidden_size)}
        for name, (fan_in, fan_out) in shapes.items():
            self.register_parameter(f"{name}_lora_A", nn.Parameter(torch.empty(rank, fan_in)))
            self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.empty(fan_out, rank)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                nn.init.kaiming_uniform_(getattr(self, f"{name}_lora_A"), a=math.sqrt(5))
                nn.init.zeros_(getattr(self, f"{name}_lora_B"))

    def delta(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """The update of projection `name` ("gate", "up" or "down") for `inputs` `(N, in)` -> `(N, out)`."""
        lora_a, lora_b = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
        hidden = F.linear(self.dropout(inputs.to(lora_a.dtype)), lora_a)  # (N, rank)
        return (F.linear(hidden, lora_b) * self.scaling).to(inputs.dtype)


class HistoryAwareRouter(nn.Module):
    """Persona router: per token and expert `i`, a fusion MLP over [token hidden state ; history summary ;
    persona vector `i`] (-> `router_hidden_size` -> ReLU -> hidden -> ReLU -> LayerNorm, shared by the experts), then
    a shared Linear(hidden -> 1) gives the expert's logit."""

    def __init__(self, hidden_size: int, summary_size: int, router_hidden_size: int, layer_norm_eps: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.summary_size = summary_size
        self.fusion_in = nn.Linear(2 * hidden_size + summary_size, router_hidden_size)
        self.fusion_out = nn.Linear(router_hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.gate = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor, summary: torch.Tensor, personas: torch.Tensor) -> torch.Tensor:
        """Logits `(N, E)` from token states `(N, D)`, their samples' history summaries `(N, S)` and personas `(E, D)`.

        The first fusion layer on the concatenation is computed part by part (token and summary once per token,
        persona once per expert), which equals the concatenated form without materialising `(N, E, 2D + S)`."""
        d, s = self.hidden_size, self.summary_size
        weight = self.fusion_in.weight  # (R, 2D + S), columns in the order [token ; summary ; persona]
        hidden_states, summary, personas = (t.to(weight.dtype) for t in (hidden_states, summary, personas))
        per_token = F.linear(hidden_states, weight[:, :d]) + F.linear(summary, weight[:, d : d + s])  # (N, R)
        per_token = per_token + self.fusion_in.bias
        per_expert = F.linear(personas, weight[:, d + s :])  # (E, R)
        n, e = per_token.shape[0], per_expert.shape[0]
        fused = F.relu(per_token[:, None, :] + per_expert[None, :, :]).reshape(n * e, -1)  # (N E, R)
        # the (N E, D) activations dominate the router's cost: one addmm straight into a 2-D buffer, ReLU in place
        wide = torch.addmm(self.fusion_out.bias, fused, self.fusion_out.weight.t()).relu_()
        # gate(LayerNorm(wide)) without materialising the normalised copy: with w the gate's weights and gamma, beta the
        # norm's, it is ((wide . w*gamma) - mean * sum(w*gamma)) / std + (w . beta + bias), exactly
        w_gamma = self.gate.weight[0] * self.norm.weight  # (D,)
        var, mean = torch.var_mean(wide, dim=-1, correction=0)
        logits = (wide @ w_gamma - mean * w_gamma.sum()) * torch.rsqrt(var + self.norm.eps)
        return (logits + (self.gate.weight[0] @ self.norm.bias + self.gate.bias)).view(n, e)  # (N, E)


class PersonalizedMoEMLP(nn.Module):
    """Personalised mixture of experts replacing a decoder layer's gated MLP (`LlamaMLP`-like: `gate_proj`,
    `up_proj`, `down_proj`, `act_fn`).

    The frozen projections of the original MLP are adopted under their original names (so the state-dict keys of the
    backbone stay valid); expert `i` is that MLP with the LoRA updates of `experts[i]` on gate, up and down. A
    [`HistoryAwareRouter`] scores the experts per token from the token's hidden state, the sample's history summary
    and the persona vectors (`persona_vectors`, a frozen, saved buffer set by
    [`NextLocMoEForNextLocation.set_semantic_vectors`]); softmax, then threshold or top-k routing
    (`config.routing`). Each expert runs only on the tokens routed to it; outputs are summed with the routing weights.
    With all LoRA updates zero the layer equals the original MLP on real tokens.

    The per-sample context (history summary and token mask) does not travel through the decoder layer call: the outer
    model sets it with [`~PersonalizedMoEMLP.set_context`] before the decoder forward and clears it after. Padded
    tokens are not routed and output zeros. After a forward the module holds `router_entropy` (mean entropy of the
    router softmax over the real tokens, a scalar tensor), `router_probs` and `routing_weights` (`(B, L, E)`, zeros on
    padded tokens) for the outer model to collect.
    """

    def __init__(self, mlp: nn.Module, config: NextLocMoEConfig):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise ValueError(
                    f"the decoder MLP ({type(mlp).__name__}) has no `{name}`: the personalised MoE needs a Llama-style "
                    "gated MLP (gate_proj, up_proj, down_proj, act_fn)."
                )
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        hidden_size, intermediate_size = self.gate_proj.in_features, self.gate_proj.out_features
        self.num_experts = config.num_roles
        self.routing = config.routing
        self.routing_threshold = config.routing_threshold
        self.max_experts = config.max_experts
        self.routing_top_k = config.routing_top_k
        self.experts = nn.ModuleList(
            [
                LoRAExpert(hidden_size, intermediate_size, config.lora_rank, config.lora_alpha, config.lora_dropout)
                for _ in range(self.num_experts)
            ]
        )
        self.router = HistoryAwareRouter(hidden_size, config.step_dim, config.router_hidden_size, config.layer_norm_eps)
        personas = torch.randn(self.num_experts, hidden_size) * config.initializer_range  # until set from descriptions
        self.register_buffer("persona_vectors", personas, persistent=True)
        self._summary: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self.router_entropy: torch.Tensor | None = None
        self.load_balance: torch.Tensor | None = None
        self.router_probs: torch.Tensor | None = None
        self.routing_weights: torch.Tensor | None = None

    def set_context(self, summary: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Set the per-sample history summary `(B, step_dim)` and the real-token mask `(B, L)` (None: all real) for
        the next forward."""
        self._summary = summary
        self._token_mask = token_mask

    def clear_context(self) -> None:
        self._summary = None
        self._token_mask = None

    def route(self, probs: torch.Tensor) -> torch.Tensor:
        """Routing weights `(N, E)` from router probabilities `(N, E)` with the configured rule."""
        if self.routing == "topk":
            return topk_routing(probs, self.routing_top_k)
        return threshold_routing(probs, self.routing_threshold, self.max_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._summary is None:
            raise RuntimeError(
                "PersonalizedMoEMLP needs the history summary: call it through NextLocMoEForNextLocation.forward, or "
                "`set_context(summary, token_mask)` first."
            )
        batch, length, width = hidden_states.shape
        token_mask = self._token_mask
        if token_mask is None:
            token_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        if token_mask.shape != (batch, length) or self._summary.shape[0] != batch:
            raise ValueError(
                f"the MoE context (summary {tuple(self._summary.shape)}, mask {tuple(token_mask.shape)}) does not match "
                f"the hidden states {tuple(hidden_states.shape)}."
            )
        flat = hidden_states.reshape(batch * length, width)
        real = token_mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the real tokens
        tokens = flat[real]  # (N, D)
        summary = self._summary[real // length]  # (N, S)

        logits = self.router(tokens, summary, self.persona_vectors).float()  # (N, E)
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        weights = self.route(probs)  # (N, E)
        if real.numel():
            self.router_entropy = -(probs * log_probs).sum(-1).mean()
            # Switch-style balance: E * sum_e (mean routing weight, held constant) * (mean router probability)
            self.load_balance = self.num_experts * (weights.detach().mean(0) * probs.mean(0)).sum()
        else:
            self.router_entropy = logits.sum() * 0.0
            self.load_balance = logits.sum() * 0.0

        base_gate = self.gate_proj(tokens)  # (N, I): shared by all experts
        base_up = self.up_proj(tokens)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows = (weights[:, index] > 0).nonzero().squeeze(1)  # the tokens routed to this expert
            if rows.numel() == 0:
                continue
            expert_in = tokens[rows]
            gate = base_gate[rows] + expert.delta("gate", expert_in)
            up = base_up[rows] + expert.delta("up", expert_in)
            inner = self.act_fn(gate) * up  # (n, I)
            expert_out = self.down_proj(inner) + expert.delta("down", inner)  # (n, D)
            out.index_add_(0, rows, expert_out * weights[rows, index, None].to(expert_out.dtype))

        result = torch.zeros_like(flat).index_copy(0, real, out).view(batch, length, width)
        dense = logits.new_zeros(batch * length, self.num_experts)
        self.router_probs = dense.index_copy(0, real, probs).view(batch, length, -1)
        self.routing_weights = dense.index_copy(0, real, weights).view(batch, length, -1)
        return result


# models


class NextLocMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for [`NextLocMoEForNextLocation`]."""

    config_class = NextLocMoEConfig
    base_model_prefix = "nextlocmoe"
    main_input_name = "history_xy"
    supports_gradient_checkpointing = False
    _no_split_modules = ["PersonalizedMoEMLP", "TemporalConvNet"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """[`~PreTrainedModel.from_pretrained`], then the backbone is frozen again (but for its norms and the MoE
        experts and routers): loading creates parameters that all require gradients."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # a tuple with output_loading_info=True
        if isinstance(model, NextLocMoEForNextLocation):
            model._freeze_backbone()
        return loaded

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) linear/convolution weights and embeddings, zero biases, unit layer norms (the
        modules outside the backbone; the personalised MoE modules are set by `initialize_weights`)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @torch.no_grad()
    def _init_moe_weights(self, moe: PersonalizedMoEMLP) -> None:
        """LoRA `A` Kaiming-uniform and `B` zero (a new expert equals the frozen MLP), router layers as in
        `_init_weights`, persona vectors drawn like the token embeddings of a freshly initialised backbone
        (Normal(0, initializer_range), so the experts are distinguishable before `set_semantic_vectors` replaces
        them)."""
        std = self.config.initializer_range
        for expert in moe.experts:
            for name in ("gate", "up", "down"):
                init.kaiming_uniform_(getattr(expert, f"{name}_lora_A"), a=math.sqrt(5))
                init.zeros_(getattr(expert, f"{name}_lora_B"))
        for layer in (moe.router.fusion_in, moe.router.fusion_out, moe.router.gate):
            init.normal_(layer.weight, mean=0.0, std=std)
            init.zeros_(layer.bias)
        init.ones_(moe.router.norm.weight)
        init.zeros_(moe.router.norm.bias)
        init.normal_(moe.persona_vectors, mean=0.0, std=std)

    @torch.no_grad()
    def initialize_weights(self):
        """Transformers' initialisation, then the personalised MoE modules: they live inside the backbone, whose own
        `_init_weights` (which transformers dispatches to for the backbone's subtree) does not know them. Loaded
        tensors are never overwritten (the `transformers.initialization` functions skip them)."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, PersonalizedMoEMLP):
                self._init_moe_weights(module)


class NextLocMoEForNextLocation(NextLocMoEPreTrainedModel):
    r"""
    NextLocMoE: a frozen, truncated Llama-family decoder (`self.backbone`, trainable only in its RMSNorm/LayerNorm
    weights) reading step features, with a location-semantics MoE on the current window and personalised LoRA-expert
    MoEs in the layers `config.moe_layers`; see [`NextLocMoEConfig`] and the module docstring.

    Trainable: the step-feature layers, the TCN, the function experts and router, the history and current
    projections, the persona routers, the LoRA weights, the heads and the backbone's norms.

    Start from a pretrained decoder with [`~NextLocMoEForNextLocation.from_backbone`], then set the expert
    initialisation from description texts with [`~NextLocMoEForNextLocation.description_vectors`] and
    [`~NextLocMoEForNextLocation.set_semantic_vectors`].

    Example:

    ```python
    >>> import torch
    >>> from modeling_mobility.nextlocmoe import NextLocMoEConfig, NextLocMoEForNextLocation

    >>> config = NextLocMoEConfig(history_length=6, current_length=2, location_dim=16, time_dim=4, duration_dim=4)
    >>> model = NextLocMoEForNextLocation(config).eval()
    >>> batch = {
    ...     "history_xy": torch.randn(1, 6, 2) * 1000, "history_time": torch.zeros(1, 6, 2, dtype=torch.long),
    ...     "history_duration": torch.ones(1, 6), "history_mask": torch.ones(1, 6, dtype=torch.bool),
    ...     "current_xy": torch.randn(1, 2, 2) * 1000, "current_time": torch.zeros(1, 2, 2, dtype=torch.long),
    ...     "current_duration": torch.ones(1, 2), "current_mask": torch.ones(1, 2, dtype=torch.bool),
    ... }
    >>> model(**batch).xy.shape
    torch.Size([1, 2])

    ```
    """

    def __init__(self, config: NextLocMoEConfig):
        super().__init__(config)
        step_dim = config.step_dim
        self.backbone = AutoModel.from_config(config.backbone_config)
        layers = getattr(self.backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList) or self.backbone.get_input_embeddings() is None:
            raise ValueError(
                f"the backbone ({type(self.backbone).__name__}) must be a decoder base model with `layers` and input "
                "embeddings (a Llama-family `AutoModel`)."
            )
        hidden_size = self.backbone.get_input_embeddings().embedding_dim
        for index in config.moe_layers:
            layers[index].mlp = PersonalizedMoEMLP(layers[index].mlp, config)
        self._freeze_backbone()

        # step features
        self.location_embedding = nn.Linear(2, config.location_dim, bias=False)
        self.weekday_embedding = nn.Embedding(NUM_WEEKDAYS, config.time_dim)
        self.hour_embedding = nn.Embedding(NUM_HOURS, config.time_dim)
        self.duration_embedding = nn.Linear(1, config.duration_dim, bias=False)
        # location-semantics MoE (current window)
        self.function_experts = nn.ModuleList(
            [nn.Linear(2, config.location_dim, bias=False) for _ in range(config.num_functions)]
        )
        self.function_router = nn.Sequential(
            nn.Linear(2 * step_dim, config.router_hidden_size), nn.ReLU(), nn.Linear(config.router_hidden_size,
                                                                                   config.num_functions)
        )
        # history encoder and decoder input projections
        self.history_encoder = TemporalConvNet(
            step_dim, config.tcn_levels, config.tcn_kernel_size, config.tcn_dropout, config.layer_norm_eps
        )
        self.history_projection = nn.Linear(step_dim, hidden_size)
        self.current_projection = nn.Linear(step_dim, hidden_size)
        # heads
        self.location_head = nn.Linear(hidden_size, 2, bias=False)
        self.duration_head = nn.Linear(hidden_size, 1, bias=False)
        if config.history_pointer:  # an hf-mobility choice (see NextLocMoEConfig.history_pointer)
            self.pointer_query = nn.Linear(hidden_size, config.pointer_size)
            self.pointer_key = nn.Linear(hidden_size, config.pointer_size)
            self.pointer_elsewhere = nn.Linear(hidden_size, 1)
        self.post_init()

    # structure

    def _freeze_backbone(self) -> None:
        """Freeze the backbone's own parameters but those of its norms (RMSNorm / LayerNorm modules); the LoRA experts
        and routers of the personalised MoE layers stay trainable. Run at construction and after `from_pretrained`
        (loading creates parameters that require gradients)."""
        added = {id(p) for moe in self.moe_mlps() for part in (moe.experts, moe.router) for p in part.parameters()}
        for module in self.backbone.modules():
            trainable = "Norm" in type(module).__name__
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(trainable or id(parameter) in added)

    def moe_mlps(self) -> list[PersonalizedMoEMLP]:
        """The personalised MoE modules, in the order of `config.moe_layers`."""
        return [self.backbone.layers[index].mlp for index in self.config.moe_layers]

    # expert initialisation from descriptions

    @torch.no_grad()
    def description_vectors(self, token_id_lists: Sequence[Sequence[int]], max_tokens: int = 60) -> torch.Tensor:
        """Mean static token embedding (the backbone's input embedding table, not contextual) of each token-id list.

        Each list is truncated to `max_tokens`; the mean runs over its real tokens only (an hf-mobility choice: the
        published code pads to a fixed length and includes the padding embeddings in the mean, which shrinks short
        descriptions towards the pad vector). The paper uses 60 tokens for function descriptions and 50 for personas.

        Returns:
            `torch.FloatTensor` of shape `(len(token_id_lists), hidden_size)` (float32).
        """
        table = self.backbone.get_input_embeddings().weight
        if int(max_tokens) < 1:
            raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens!r}.")
        vectors = []
        for i, ids in enumerate(token_id_lists):
            ids = [int(t) for t in list(ids)[: int(max_tokens)]]
            if not ids:
                raise ValueError(f"token list {i} is empty: every description needs at least one token.")
            if min(ids) < 0 or max(ids) >= table.shape[0]:
                raise ValueError(f"token list {i} has ids outside the backbone vocabulary [0, {table.shape[0]}).")
            vectors.append(table[torch.tensor(ids, device=table.device)].float().mean(0))
        if not vectors:
            raise ValueError("`token_id_lists` is empty.")
        return torch.stack(vectors)

    @torch.no_grad()
    def set_semantic_vectors(
        self,
        function_vectors: torch.Tensor | None = None,
        persona_vectors: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Initialise the experts from description vectors (e.g. [`description_vectors`] of the description texts).

        Args:
            function_vectors (`torch.Tensor` of shape `(num_functions, hidden_size)`, *optional*):
                One vector per function expert (order of `config.function_names`). Each is mapped by a freshly drawn
                Linear(hidden_size -> location_dim) (PyTorch's default initialisation, from `generator` when given)
                and a LayerNorm without affine parameters; the result is used as both columns of the expert's
                2 -> location_dim weight. The projection is discarded: the experts then train freely.
            persona_vectors (`torch.Tensor` of shape `(num_roles, hidden_size)`, *optional*):
                One vector per persona (order of `config.role_names`), copied into the frozen `persona_vectors` buffer
                of every personalised MoE layer.
            generator (`torch.Generator`, *optional*): random source of the projection.
        """
        hidden_size = self.backbone.get_input_embeddings().embedding_dim
        expected = {"function_vectors": self.config.num_functions, "persona_vectors": self.config.num_roles}
        for name, value in (("function_vectors", function_vectors), ("persona_vectors", persona_vectors)):
            if value is not None and tuple(value.shape) != (expected[name], hidden_size):
                raise ValueError(
                    f"`{name}` must have shape ({expected[name]}, {hidden_size}), got {tuple(value.shape)}."
                )
        if persona_vectors is not None:
            for moe in self.moe_mlps():
                moe.persona_vectors.copy_(persona_vectors.to(moe.persona_vectors))
        if function_vectors is not None:
            location_dim = self.config.location_dim
            weight = torch.empty(location_dim, hidden_size)
            bias = torch.empty(location_dim)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(hidden_size)
            nn.init.uniform_(bias, -bound, bound, generator=generator)
            projected = F.linear(function_vectors.detach().float().cpu(), weight, bias)  # (F, location_dim)
            columns = F.layer_norm(projected, (location_dim,))
            for expert, column in zip(self.function_experts, columns):
                expert.weight.copy_(column[:, None].expand(location_dim, 2).to(expert.weight))

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str | os.PathLike, **config_kwargs) -> NextLocMoEForNextLocation:
        """A new model around a pretrained decoder.

        Args:
            backbone (`PreTrainedModel` or `str`): a Llama-family causal LM or base model, or a folder to load with
                `AutoModelForCausalLM.from_pretrained`.
            **config_kwargs: the other [`NextLocMoEConfig`] arguments (e.g. `num_backbone_layers=12`); the backbone
                config is the decoder's own (truncated to `num_backbone_layers`).

        The embeddings, the first `num_backbone_layers` decoder layers and the final norm are copied into the new model
        (the personalised MoE layers wrap the copied MLPs); every other part is freshly initialised. The new model is in
        PyTorch's default dtype; cast it afterwards (`model.to(torch.bfloat16)`) to save memory.
        """
        if "backbone_config" in config_kwargs:
            raise ValueError("`from_backbone` takes the backbone config from `backbone`; do not pass `backbone_config`.")
        if isinstance(backbone, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_pretrained(backbone)
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(f"`backbone` must be a PreTrainedModel or a folder, got {type(backbone).__name__}.")
        base = backbone.base_model
        config = NextLocMoEConfig(backbone_config=base.config, **config_kwargs)
        model = cls(config)
        depth = config.backbone_config.num_hidden_layers
        state = {}
        for key, value in base.state_dict().items():
            parts = key.split(".")
            if parts[0] == "layers" and int(parts[1]) >= depth:
                continue
            state[key] = value
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        new_parts = (".experts.", ".router.", ".persona_vectors")
        missing = [key for key in missing if not any(part in key for part in new_parts)]
        if missing or unexpected:
            raise ValueError(
                f"the backbone's weights do not fit the model built from its config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})."
            )
        return model

    # forward

    def _check_inputs(self, name: str, xy, time, duration, mask, max_length: int) -> torch.Tensor:
        """Validate one window (history or current); returns its mask as bool `(B, T)`."""
        if xy is None or time is None or duration is None:
            raise ValueError(f"`{name}_xy`, `{name}_time` and `{name}_duration` are required.")
        if xy.ndim != 3 or xy.shape[-1] != 2:
            raise ValueError(f"`{name}_xy` must have shape (batch, length, 2), got {tuple(xy.shape)}.")
        batch, length = xy.shape[:2]
        if length < 1 or length > max_length:
            raise ValueError(
                f"`{name}_xy` has {length} steps; the model takes 1 to {max_length} ({name}_length in the config)."
            )
        if tuple(time.shape) != (batch, length, 2):
            raise ValueError(
                f"`{name}_time` (weekday, hour) must have shape ({batch}, {length}, 2), got {tuple(time.shape)}."
            )
        if tuple(duration.shape) != (batch, length):
            raise ValueError(f"`{name}_duration` must have shape ({batch}, {length}), got {tuple(duration.shape)}.")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=xy.device)
        elif tuple(mask.shape) != (batch, length):
            raise ValueError(f"`{name}_mask` must have shape ({batch}, {length}), got {tuple(mask.shape)}.")
        mask = mask.bool()
        if time.dtype.is_floating_point:
            raise ValueError(f"`{name}_time` must hold integer (weekday, hour) ids, got {time.dtype}.")
        real = time[mask]  # (n, 2)
        if bool(((real[:, 0] < 0) | (real[:, 0] >= NUM_WEEKDAYS) | (real[:, 1] < 0) | (real[:, 1] >= NUM_HOURS)).any()):
            raise ValueError(f"`{name}_time` must hold weekdays in [0, 6] and hours in [0, 23] on real steps.")
        return mask

    def _step_parts(self, xy, time, duration, mask):
        """z-scored coordinates `(B, T, 2)` and the [weekday ; hour ; duration] features `(B, T, 2 time + dur)` of a
        window; padded steps get zero coordinates, time ids 0 and the minimum duration."""
        config = self.config
        mean = torch.tensor(config.coord_mean, device=xy.device, dtype=torch.float32)
        std = torch.tensor(config.coord_std, device=xy.device, dtype=torch.float32)
        z = ((xy.float() - mean) / std).masked_fill(~mask[..., None], 0.0)
        time = time.long().masked_fill(~mask[..., None], 0)
        low, high = config.duration_min_hours, config.duration_max_hours
        scaled = ((duration.float().clamp(low, high) - low) / (high - low)).masked_fill(~mask, 0.0)
        dtype = self.location_embedding.weight.dtype
        others = torch.cat(
            [
                self.weekday_embedding(time[..., 0]),
                self.hour_embedding(time[..., 1]),
                self.duration_embedding(scaled[..., None].to(dtype)),
            ],
            dim=-1,
        )
        return z.to(dtype), others

    def forward(
        self,
        history_xy: torch.FloatTensor | None = None,
        history_time: torch.LongTensor | None = None,
        history_duration: torch.FloatTensor | None = None,
        history_mask: torch.BoolTensor | None = None,
        current_xy: torch.FloatTensor | None = None,
        current_time: torch.LongTensor | None = None,
        current_duration: torch.FloatTensor | None = None,
        current_mask: torch.BoolTensor | None = None,
        labels: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
    ) -> NextLocMoEOutput | tuple:
        r"""
        Windows are left-padded (the most recent step last); masks are True on real steps. Padded steps may hold any
        value.

        Args:
            history_xy (`torch.FloatTensor` of shape `(batch_size, history_steps, 2)`):
                Web-Mercator (x, y) in metres of the long-history records (`history_steps <= config.history_length`).
            history_time (`torch.LongTensor` of shape `(batch_size, history_steps, 2)`):
                (weekday 0-6, hour 0-23) of every history record.
            history_duration (`torch.FloatTensor` of shape `(batch_size, history_steps)`):
                Stay durations in hours (clamped to `[duration_min_hours, duration_max_hours]`).
            history_mask (`torch.BoolTensor` of shape `(batch_size, history_steps)`, *optional*):
                True on real records (defaults to all real). A sample may have no real history record.
            current_xy, current_time, current_duration, current_mask:
                The same for the current window (`current_steps <= config.current_length`).
            labels (`torch.FloatTensor` of shape `(batch_size, 2)`, *optional*):
                The next record's (x, y) in metres; gives `loss` and `distance`.
            return_dict (`bool`, *optional*):
                Return a [`NextLocMoEOutput`] (default) or a tuple of its non-None fields.
        """
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        history_mask = self._check_inputs(
            "history", history_xy, history_time, history_duration, history_mask, config.history_length
        )
        current_mask = self._check_inputs(
            "current", current_xy, current_time, current_duration, current_mask, config.current_length
        )
        batch = history_xy.shape[0]
        if current_xy.shape[0] != batch:
            raise ValueError(f"history ({batch}) and current ({current_xy.shape[0]}) windows have different batch sizes.")
        if labels is not None and tuple(labels.shape) != (batch, 2):
            raise ValueError(f"`labels` must have shape ({batch}, 2) (x, y in metres), got {tuple(labels.shape)}.")
        device = history_xy.device
        rows = torch.arange(batch, device=device)

        # history: step features -> TCN -> summary at the last real step (zeros without one)
        history_z, history_others = self._step_parts(history_xy, history_time, history_duration, history_mask)
        history_features = torch.cat([self.location_embedding(history_z), history_others], dim=-1)
        history_features = history_features * history_mask[..., None].to(history_features.dtype)  # (B, H, S)
        encoded = self.history_encoder(history_features, history_mask)  # (B, H, S)
        steps = torch.arange(1, history_mask.shape[1] + 1, device=device)
        last_history = (history_mask.long() * steps).argmax(1)  # (B,)
        summary = encoded[rows, last_history] * history_mask.any(1, keepdim=True).to(encoded.dtype)  # (B, S)

        # current window: location-semantics MoE on top of the base location embedding
        current_z, current_others = self._step_parts(current_xy, current_time, current_duration, current_mask)
        base_location = self.location_embedding(current_z)  # (B, C, location_dim)
        base_features = torch.cat([base_location, current_others], dim=-1)  # (B, C, S)
        router_input = torch.cat([summary[:, None, :].expand_as(base_features), base_features], dim=-1)
        function_probs = self.function_router(router_input).float().softmax(-1)  # (B, C, F)
        top = function_probs.topk(config.function_top_k, dim=-1)
        function_weights = torch.zeros_like(function_probs).scatter(-1, top.indices, top.values)  # raw probabilities
        function_weights = function_weights * current_mask[..., None]
        expert_outputs = torch.stack([expert(current_z) for expert in self.function_experts], dim=-2)  # (B, C, F, l)
        semantic = (function_weights[..., None].to(expert_outputs.dtype) * expert_outputs).sum(-2)
        current_features = torch.cat([base_location + semantic, current_others], dim=-1)
        current_features = current_features * current_mask[..., None].to(current_features.dtype)  # (B, C, S)

        # decoder input: [prompt ; history ; current]
        embeddings = self.backbone.get_input_embeddings()
        prompt_ids = torch.tensor(config.prompt_token_ids, dtype=torch.long, device=device)
        prompt = embeddings(prompt_ids)[None].expand(batch, -1, -1)  # (B, P, D)
        inputs_embeds = torch.cat(
            [
                prompt,
                self.history_projection(history_features).to(prompt.dtype),
                self.current_projection(current_features).to(prompt.dtype),
            ],
            dim=1,
        )  # (B, P + H + C, D)
        prompt_mask = torch.ones(batch, prompt_ids.shape[0], dtype=torch.bool, device=device)
        token_mask = torch.cat([prompt_mask, history_mask, current_mask], dim=1)  # (B, L)
        if not bool(token_mask.any(1).all()):
            raise ValueError("every sample needs at least one real step (or a prompt): a row has nothing to read.")
        position_ids = (token_mask.long().cumsum(1) - 1).clamp_min(0)  # padding never shifts positions

        moes = self.moe_mlps()
        for moe in moes:
            moe.set_context(summary, token_mask)
        try:
            hidden = self.backbone(
                inputs_embeds=inputs_embeds,
                attention_mask=token_mask.long(),
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state  # (B, L, D)
        finally:
            for moe in moes:
                moe.clear_context()

        # heads on the last real position (the last current step under left padding)
        positions = torch.arange(1, token_mask.shape[1] + 1, device=device)
        last = (token_mask.long() * positions).argmax(1)  # (B,)
        final = hidden[rows, last].to(self.location_head.weight.dtype)  # (B, D)
        mean = torch.tensor(config.coord_mean, device=device, dtype=torch.float32)
        std = torch.tensor(config.coord_std, device=device, dtype=torch.float32)
        step = self.location_head(final).float() * std  # (B, 2) metres
        if config.predict_offset:  # from the last real record of the current window (the mean without one)
            current_steps = torch.arange(1, current_mask.shape[1] + 1, device=device)
            last_current = (current_mask.long() * current_steps).argmax(1)  # (B,)
            anchor = torch.where(current_mask.any(1, keepdim=True), current_xy[rows, last_current].float(), mean)
            xy = anchor + step
        else:
            xy = step + mean  # (B, 2) metres
        low, high = config.duration_min_hours, config.duration_max_hours
        duration = low + F.relu(self.duration_head(final).float().squeeze(-1)) * (high - low)  # (B,) hours

        # router statistics over the real tokens
        real = token_mask.float()[..., None]  # (B, L, 1)
        router_entropy = torch.stack([moe.router_entropy for moe in moes]).mean()
        load_balance = torch.stack([moe.load_balance for moe in moes]).mean()
        weights = torch.stack([moe.routing_weights for moe in moes])  # (M, B, L, E)
        expert_load = (weights * real).sum((1, 2)) / real.sum().clamp_min(1.0)  # (M, E)
        role_weights = ((weights * real).sum(2) / real.sum(1).clamp_min(1.0)).mean(0)  # (B, E)

        pointer_probs = pointer_nll = None
        if config.history_pointer:
            prompt_length = prompt_ids.shape[0]
            window_mask = token_mask[:, prompt_length:]  # (B, H + C)
            head_dtype = self.pointer_query.weight.dtype
            keys = self.pointer_key(hidden[:, prompt_length:].to(head_dtype))  # (B, H + C, K)
            query = self.pointer_query(final)  # (B, K)
            logits = (keys @ query[:, :, None]).squeeze(-1).float() / math.sqrt(config.pointer_size)
            logits = logits.masked_fill(~window_mask, float("-inf"))
            logits = torch.cat([logits, self.pointer_elsewhere(final).float()], dim=-1)  # (B, H + C + 1)
            log_probs = logits.log_softmax(-1)
            pointer_probs = log_probs.exp()
            if labels is not None:
                window_xy = torch.cat([history_xy, current_xy], dim=1).float()
                # the same place always has bit-identical coordinates (one location-table row, one conversion)
                at_target = (window_xy == labels.float()[:, None, :]).all(-1) & window_mask  # (B, H + C)
                at_target = torch.cat([at_target, ~at_target.any(1, keepdim=True)], dim=-1)
                pointer_nll = -log_probs.masked_fill(~at_target, float("-inf")).logsumexp(-1)  # (B,)

        loss = distance = None
        if labels is not None:
            distance = torch.linalg.vector_norm(xy - labels.float(), dim=-1)  # (B,)
            loss = distance.mean() + config.entropy_weight * router_entropy
            if config.load_balance_weight:
                loss = loss + config.load_balance_weight * load_balance
            if pointer_nll is not None:
                loss = loss + config.pointer_weight * pointer_nll.mean()

        output = NextLocMoEOutput(
            loss=loss,
            distance=distance,
            xy=xy,
            duration=duration,
            router_entropy=router_entropy,
            load_balance=load_balance,
            expert_load=expert_load,
            role_weights=role_weights,
            function_weights=function_weights,
            pointer_probs=pointer_probs,
            pointer_nll=pointer_nll,
        )
        return output if return_dict else output.to_tuple()
