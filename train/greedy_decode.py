"""Batched greedy decoding for causal LMs without `generate`: a reserved KV cache written in place, finished rows
dropped from the batch, and a pluggable token chooser (argmax, or a grammar such as
[`train.humob_grammar.HumobAnswerLogitsProcessor.next_tokens`]). Two loops:

- [`continuous_greedy_decode`] (what prediction uses): continuous batching over a list of prompts. A finished prompt's
  slot of the [`SlotCache`] takes the next prompt at once, so the batch stays full until the prompts run out, and the
  live slots are always the first ones (a step reads views of the cache, a finished slot costs one row copy at most).
  Its decode steps pass their own 4D attention mask: SDPA or eager attention.
- [`greedy_decode`]: one left-padded static batch; finished rows are dropped ([`ReservedCache`]). For attention
  implementations that take no custom mask (flash attention).

Why not `model.generate`: with a small model on a CPU the per-step cost is dominated not by the weights but by

- the KV cache: transformers' `DynamicCache` grows by `torch.cat`, which copies the whole cache of every layer at every
  step (prompts of ~1,000 tokens, answers of ~200-400), so a batch pays for its whole cache at every step;
- rows that have finished: `generate` keeps decoding them (as padding) until the longest answer of the batch is done,
  and answers of one batch differ in length;
- per-step bookkeeping of `generate` around a forward pass of a few milliseconds.

Both keep the keys and values in one buffer per layer reserved up front (a write of the new position per step, no
copy), take a row out of the decoding as soon as it emits an end-of-sequence token or reaches its own budget, and
call the model directly. Both prefill the prompts one at a time (the static loop on a CPU only): a padded batch
prefill would attend through an explicit mask (the slow path of SDPA) over every pad position, which on the demo model
cost more than all the decoding steps. The results equal greedy `generate` with each prompt's own `max_new_tokens`
(up to the float rounding of a different batch composition).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tokenization_mobility.constrained import cache_keyword

__all__ = ["ReservedCache", "SlotCache", "continuous_greedy_decode", "greedy_decode"]


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
        model: a causal LM (`forward(input_ids, attention_mask, position_ids, cache | past_key_values,
            use_cache, logits_to_keep)`, e.g. any transformers `*ForCausalLM`), in eval mode.
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
    key = cache_keyword(model)
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
            out = model(input_ids=input_ids[row:row + 1, width - n:], use_cache=True, **{key: states},
                        logits_to_keep=1)
            rows_scores.append(out.logits[:, -1])
            cache.place_row(row, batch, states, width)
        cache.set_length(width)
        scores = torch.cat(rows_scores, dim=0)
    else:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **{key: cache},
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
                    position_ids=next_position[:, None], **{key: cache}, use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1]
        next_position = next_position + 1


# ----------------------------------------------------------------------------------------------------------------------
# Continuous batching
# ----------------------------------------------------------------------------------------------------------------------

# attention implementations whose decode step takes a 4D mask made here (boolean for SDPA, additive for eager)
CONTINUOUS_ATTENTION = ("sdpa", "eager")


class _Step:
    """What a decode step writes, shared by the layers of a [`SlotCache`]: the `rows` first slots take one new
    position each, at their own column `columns`, and attention reads the first `width` columns."""

    def __init__(self):
        self.rows = 0
        self.columns: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.width = 0


class _SlotLayer(DynamicLayer):
    """One layer of a [`SlotCache`]: keys and values in `(slots, heads, capacity, dim)` buffers, each slot
    left-aligned (its positions 0..length-1 at columns 0..length-1)."""

    def __init__(self, slots: int, capacity: int, step: _Step):
        super().__init__()
        self.slots, self.capacity, self.step = int(slots), int(capacity), step

    def allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor) -> None:
        """Zeroed buffers shaped like the given `(.., heads, .., dim)` states (zeros: a column past a slot's length
        is masked out, but a NaN there would still reach the output through 0 x NaN)."""
        self.dtype, self.device = like_keys.dtype, like_keys.device
        self._keys = like_keys.new_zeros((self.slots, like_keys.shape[1], self.capacity, like_keys.shape[-1]))
        self._values = like_values.new_zeros((self.slots, like_values.shape[1], self.capacity, like_values.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.step
        if key_states.shape[0] != step.rows or key_states.shape[-2] != 1:
            raise RuntimeError(f"a SlotCache decode step takes one new position for each of its {step.rows} live "
                               f"slots, got states of shape {tuple(key_states.shape)}")
        self._keys[step.slots, :, step.columns] = key_states[:, :, 0]
        self._values[step.slots, :, step.columns] = value_states[:, :, 0]
        self.keys, self.values = self._keys[: step.rows, :, : step.width], self._values[: step.rows, :, : step.width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.step.width


class SlotCache(DynamicCache):
    """A KV cache of `slots` independent rows with room for `capacity` positions each, for continuous batching: a
    prompt prefilled alone is copied into a free slot ([`place`]), a decode step appends one position to each of the
    first `rows` slots at that slot's own column ([`begin_step`]), and a finished slot is refilled or overwritten by
    the last live one ([`move`]), so that the live slots are always the first ones and a step reads views, not
    copies."""

    def __init__(self, slots: int, capacity: int):
        if slots < 1 or capacity < 1:
            raise ValueError(f"slots and capacity must be positive, got {slots} and {capacity}")
        self.step = _Step()
        Cache.__init__(self, layer_class_to_replicate=functools.partial(_SlotLayer, int(slots), int(capacity),
                                                                        self.step))
        self.slots, self.capacity = int(slots), int(capacity)

    def place(self, slot: int, states: Cache) -> None:
        """Copy the keys and values of a one-row cache (one prompt prefilled alone) to columns 0.. of `slot`."""
        for index, layer in enumerate(states.layers):
            while len(self.layers) <= index:
                self.layers.append(_SlotLayer(self.slots, self.capacity, self.step))
            target = self.layers[index]
            if not target.is_initialized:
                target.allocate(layer.keys, layer.values)
            n = layer.keys.shape[-2]
            if n > self.capacity:
                raise RuntimeError(f"the slot cache holds {self.capacity} positions per slot; a prompt of {n} does "
                                   "not fit")
            target._keys[slot, :, :n] = layer.keys[0]
            target._values[slot, :, :n] = layer.values[0]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` to slot `target`."""
        for layer in self.layers:
            if layer.is_initialized:
                layer._keys[target, :, :length] = layer._keys[source, :, :length]
                layer._values[target, :, :length] = layer._values[source, :, :length]

    def begin_step(self, rows: int, columns: torch.Tensor) -> None:
        """Declare the next decode step: slots `0..rows-1` each write one position, at `columns[i]`."""
        width = int(columns.max()) + 1 if rows else 0
        if width > self.capacity:
            raise RuntimeError(f"the slot cache holds {self.capacity} positions per slot; position {width} does not "
                               "fit")
        self.step.rows, self.step.columns, self.step.width = int(rows), columns, width
        self.step.slots = torch.arange(rows, device=columns.device)


def continuous_greedy_decode(
    model,
    prompts: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
    *,
    max_new_tokens: Sequence[int] | np.ndarray,
    eos_token_ids: Sequence[int],
    choose: Callable[[np.ndarray, torch.Tensor], np.ndarray] | None = None,
    max_batch: int = 16,
    on_finish: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy decoding with continuous batching: up to `max_batch` prompts decode together, and as soon as one ends
    (its eos or its own budget) the next prompt takes its place, so the batch stays full until the prompts run out
    (a static batch decodes until its longest answer is done, with fewer and fewer live rows). Returns each prompt's
    new tokens, as [`greedy_decode`] does.

    Each prompt is prefilled alone (without padding: causal attention without a mask), except its last token, and
    copied into a free slot of a [`SlotCache`] (each slot left-aligned at its own length); its last token then goes
    through the batched decode steps with the others. A decode step passes its own 4D attention mask (each slot sees
    its own positions), so the model's attention must take one: SDPA or eager (`CONTINUOUS_ATTENTION`). The prompts
    are admitted in the given order; ordering them by length keeps the live slots of similar length (attention reads
    every slot up to the longest). Results equal greedy `generate` per prompt up to the float rounding of a
    different batch composition.

    Args:
        model: a causal LM (`forward(input_ids, attention_mask, position_ids, cache | past_key_values,
            use_cache, logits_to_keep)`, e.g. any transformers `*ForCausalLM`) with SDPA or eager attention, in eval mode.
        prompts (`Sequence`): token ids of each prompt (at least one token each).
        max_new_tokens (`Sequence[int]`): per prompt, the most new tokens (>= 1).
        eos_token_ids (`Sequence[int]`): a prompt's answer stops after one of them.
        choose (`Callable`, *optional*): `choose(prompts, scores) -> tokens`: `prompts` the indices of the prompts
            whose next token is due, `scores` their next-token logits `(len(prompts), vocab)`; returns one token id
            each. Default: argmax.
        max_batch (`int`, *optional*, defaults to 16): prompts decoded together (1: one at a time).
        on_finish (`Callable[[int], None]`, *optional*): called with a prompt's index when its answer is done (a
            progress bar).
    """
    choose = choose or argmax_chooser
    n = len(prompts)
    budgets = np.asarray(max_new_tokens, dtype=np.int64).reshape(-1)
    if len(budgets) != n or (n and budgets.min() < 1):
        raise ValueError(f"max_new_tokens needs one budget >= 1 per prompt ({n} prompts), got {budgets.tolist()}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if n == 0:
        return []
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if implementation not in CONTINUOUS_ATTENTION:
        raise ValueError(f"continuous batching passes its own attention mask, which {implementation!r} attention "
                         f"does not take; load the model with attn_implementation in {CONTINUOUS_ATTENTION}")
    device = next(model.parameters()).device
    key = cache_keyword(model)
    ids = [torch.as_tensor(np.asarray(p), dtype=torch.long).reshape(-1) for p in prompts]
    sizes = np.array([len(p) for p in ids], dtype=np.int64)
    if sizes.min() < 1:
        raise ValueError(f"prompts[{int(np.argmin(sizes))}] has no tokens; nothing to decode from")
    eos = np.asarray(list(eos_token_ids), dtype=np.int64)
    slots = min(int(max_batch), n)
    cache = SlotCache(slots, int((sizes + budgets).max()))
    owner = np.full(slots, -1, dtype=np.int64)  # the prompt in each slot
    length = np.zeros(slots, dtype=np.int64)  # positions in each slot's cache
    pending = np.zeros(slots, dtype=np.int64)  # each slot's token to feed at the next step
    generated: list[list[int]] = [[] for _ in range(n)]
    waiting = iter(range(n))

    def admit(slot: int) -> bool:
        i = next(waiting, None)
        if i is None:
            return False
        if sizes[i] > 1:
            states = DynamicCache()
            model(input_ids=ids[i][None, :-1].to(device), use_cache=True, **{key: states}, logits_to_keep=1)
            cache.place(slot, states)
        owner[slot], length[slot], pending[slot] = i, sizes[i] - 1, int(ids[i][-1])
        return True

    live = sum(admit(slot) for slot in range(slots))
    positions = torch.arange(cache.capacity, device=device)
    mask_dtype = next(model.parameters()).dtype if implementation == "eager" else None  # eager adds its mask
    while live:
        columns = torch.as_tensor(length[:live], device=device)
        cache.begin_step(live, columns)
        mask = positions[None, : cache.step.width] <= columns[:, None]
        if mask_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=mask_dtype, device=device).masked_fill(
                ~mask, torch.finfo(mask_dtype).min)
        out = model(input_ids=torch.as_tensor(pending[:live], device=device)[:, None],
                    attention_mask=mask[:, None, None, :], position_ids=columns[:, None], **{key: cache},
                    use_cache=True, logits_to_keep=1)
        length[:live] += 1
        who = owner[:live].copy()
        tokens = np.asarray(choose(who, out.logits[:, -1]), dtype=np.int64).reshape(-1)
        if len(tokens) != live:
            raise ValueError(f"choose returned {len(tokens)} tokens for {live} prompts")
        pending[:live] = tokens
        done = np.zeros(live, dtype=bool)
        for slot, (i, token) in enumerate(zip(who.tolist(), tokens.tolist())):
            generated[i].append(token)
            done[slot] = token in eos or len(generated[i]) >= budgets[i]
        for slot in np.flatnonzero(done).tolist():
            if on_finish is not None:
                on_finish(int(owner[slot]))
            if not admit(slot):
                owner[slot] = -1
        # the live slots first: the last live slot fills each free one below it
        while live and owner[live - 1] < 0:
            live -= 1
        slot = 0
        while slot < live:
            if owner[slot] < 0:
                last = live - 1  # live (the trailing free slots are trimmed), so last > slot
                cache.move(last, slot, int(length[last]))
                owner[slot], length[slot], pending[slot] = owner[last], length[last], pending[last]
                owner[last] = -1
                while live and owner[live - 1] < 0:
                    live -= 1
            slot += 1
    return generated
