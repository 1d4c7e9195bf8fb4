"""Batched greedy decoding for causal LMs without `generate`: a reserved KV cache written in place, finished rows
dropped from the batch, and a pluggable token chooser (argmax, or a grammar such as
[`train.humob_grammar.HumobAnswerLogitsProcessor.next_tokens`]).

Why not `model.generate`: with a small model on a CPU the per-step cost is dominated not by the weights but by

- the KV cache: transformers' `DynamicCache` grows by `torch.cat`, which copies the whole cache of every layer at every
  step (prompts of ~1,000 tokens, answers of ~200-400), so a batch pays for its whole cache at every step;
- rows that have finished: `generate` keeps decoding them (as padding) until the longest answer of the batch is done,
  and answers of one batch differ in length;
- per-step bookkeeping of `generate` around a forward pass of a few milliseconds.

[`greedy_decode`] keeps the keys and values in one buffer per layer reserved for the prompt plus the longest budget
(a write of the new position per step, no copy), removes a row from the batch as soon as it emits an end-of-sequence
token or reaches its own budget, and calls the model directly. On a CPU it prefills the prompts one at a time and
merges their caches: a padded batch prefill would attend through an explicit mask (the slow path of SDPA) over every
pad position, which on the demo model cost more than all the decoding steps. The result equals greedy `generate` with each row's
own `max_new_tokens` (up to the float rounding of a different batch composition).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["ReservedCache", "greedy_decode"]


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers reserved for `capacity` positions: an update writes the
    new positions in place and `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def allocate(self, batch: int, like_keys: torch.Tensor, like_values: torch.Tensor) -> None:
        """Reserve zeroed buffers for `batch` rows shaped like the given `(.., heads, .., dim)` states (zeros: a padded
        position is masked out of attention, but a NaN there would still reach the output through 0 x NaN)."""
        self.dtype, self.device = like_keys.dtype, like_keys.device
        self._keys = like_keys.new_zeros((batch, like_keys.shape[1], self.capacity, like_keys.shape[-1]))
        self._values = like_values.new_zeros((batch, like_values.shape[1], self.capacity, like_values.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.allocate(key_states.shape[0], key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"the reserved KV cache holds {self.capacity} positions; position {end} does not fit")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


class ReservedCache(DynamicCache):
    """A `DynamicCache` whose layers reserve room for `capacity` positions up front (see the module docstring)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        Cache.__init__(self, layer_class_to_replicate=functools.partial(_ReservedLayer, int(capacity)))
        self.capacity = int(capacity)

    def place_row(self, row: int, batch: int, states: Cache, end: int) -> None:
        """Copy the keys and values of a one-row cache `states` (one prompt, prefilled alone) into row `row` of this
        `batch`-row cache, right-aligned so that they end at position `end` (left padding before them); call it for
        every row, then [`set_length`] with `end`."""
        for index, layer in enumerate(states.layers):
            while len(self.layers) <= index:
                self.layers.append(_ReservedLayer(self.capacity))
            target = self.layers[index]
            if not target.is_initialized:
                target.allocate(batch, layer.keys, layer.values)
            n = layer.keys.shape[-2]
            target._keys[row, :, end - n:end] = layer.keys[0]
            target._values[row, :, end - n:end] = layer.values[0]

    def set_length(self, length: int) -> None:
        """Declare the first `length` positions of every layer filled (after [`place_row`])."""
        for layer in self.layers:
            layer.length = int(length)
            layer.keys, layer.values = layer._keys[:, :, :length], layer._values[:, :, :length]


def argmax_chooser(rows: np.ndarray, scores: torch.Tensor) -> np.ndarray:
    """Greedy choice: the highest-scoring token of each row (the first one on ties, as `generate`)."""
    return scores.argmax(-1).cpu().numpy()


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: Sequence[int] | np.ndarray,
    eos_token_ids: Sequence[int],
    choose: Callable[[np.ndarray, torch.Tensor], np.ndarray] | None = None,
    prefill_rows: bool | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; returns each row's new tokens (ending with its eos when it emitted one,
    at most its own `max_new_tokens`).

    Args:
        model: a causal LM (`forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
            logits_to_keep)`, e.g. any transformers `*ForCausalLM`), in eval mode.
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch, width)`): left-padded prompts.
        max_new_tokens (`Sequence[int]`): per row, the most new tokens (>= 1).
        eos_token_ids (`Sequence[int]`): a row stops after emitting one of them.
        choose (`Callable`, *optional*): `choose(rows, scores) -> tokens`: `rows` the original row indices still
            decoding, `scores` their next-token logits `(len(rows), vocab)`; returns one token id per row. Default:
            argmax.
        prefill_rows (`bool`, *optional*): prefill the prompts one at a time (each without padding) and merge their
            caches, instead of one padded batch. Default: on a CPU (where the padded batch is several times slower:
            an explicit attention mask and the pad positions), not on other devices.
    """
    choose = choose or argmax_chooser
    budgets = np.asarray(max_new_tokens, dtype=np.int64).reshape(-1)
    batch, width = input_ids.shape
    if len(budgets) != batch or (batch and budgets.min() < 1):
        raise ValueError(f"max_new_tokens needs one budget >= 1 per row ({batch} rows), got {budgets.tolist()}")
    if batch == 0:
        return []
    eos = np.asarray(list(eos_token_ids), dtype=np.int64)
    device = input_ids.device
    attention = attention_mask.long()
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)  # as generate does for left padding
    cache = ReservedCache(width + int(budgets.max()))
    lengths_in = attention.sum(-1)
    if prefill_rows is None:
        prefill_rows = device.type == "cpu"
    if prefill_rows and batch > 1 and bool((lengths_in != width).any()):
        # one prompt at a time, without padding (causal attention without a mask), then merged left-padded: on a CPU
        # a padded batch prefill attends through an explicit mask (SDPA's slow path) and over every pad position
        rows_scores = []
        for row in range(batch):
            n = int(lengths_in[row])
            states = DynamicCache()
            out = model(input_ids=input_ids[row:row + 1, width - n:], past_key_values=states, use_cache=True,
                        logits_to_keep=1)
            rows_scores.append(out.logits[:, -1])
            cache.place_row(row, batch, states, width)
        cache.set_length(width)
        scores = torch.cat(rows_scores, dim=0)
    else:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1]
    next_position = positions[:, -1] + 1
    alive = np.arange(batch)
    generated: list[list[int]] = [[] for _ in range(batch)]
    lengths = np.zeros(batch, dtype=np.int64)
    while True:
        tokens = np.asarray(choose(alive, scores), dtype=np.int64).reshape(-1)
        if len(tokens) != len(alive):
            raise ValueError(f"choose returned {len(tokens)} tokens for {len(alive)} rows")
        for row, token in zip(alive.tolist(), tokens.tolist()):
            generated[row].append(token)
        lengths[alive] += 1
        done = np.isin(tokens, eos) | (lengths[alive] >= budgets[alive])
        if done.all():
            return generated
        if done.any():
            keep = np.flatnonzero(~done)
            index = torch.as_tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, next_position = attention[index], next_position[index]
            alive, tokens = alive[keep], tokens[keep]
        attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=1)
        out = model(input_ids=torch.as_tensor(tokens, device=device)[:, None], attention_mask=attention,
                    position_ids=next_position[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1]
        next_position = next_position + 1
