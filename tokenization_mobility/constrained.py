# Copyright 2026 The hf-mobility developers. Licensed under the Apache License, Version 2.0.
"""Constrained decoding over the valid location codes of a [`LocationTokenizer`].

Two interchangeable ways to make `model.generate(...)` (beam search included) produce only real locations:

- [`make_prefix_allowed_tokens_fn`]: the simple path, a trie walk per beam for `prefix_allowed_tokens_fn`;
- [`LocationCodeLogitsProcessor`]: the fast path, a vectorised `LogitsProcessor` built from precomputed tensors.

Both allow, after the prompt, exactly the code tokens of level 0, then the children of the code prefix generated so
far, and only EOS once a full code has been generated; they give identical beams. [`rank_locations`] runs the
deterministic beam search used for Acc@k / NDCG evaluation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging

if TYPE_CHECKING:
    from .tokenization_location import LocationTokenizer

logger = logging.get_logger(__name__)

__all__ = [
    "LocationCodeLogitsProcessor",
    "cache_keyword",
    "make_prefix_allowed_tokens_fn",
    "output_cache",
    "rank_locations",
    "rank_locations_cached",
]

_PROCESSORS = ("vectorised", "prefix_fn")


def _forward_parameters(model) -> set[str]:
    names = set(inspect.signature(model.forward).parameters)
    base = getattr(model, "get_base_model", None)  # a PEFT wrapper forwards **kwargs to the model it wraps
    if not names & {"cache", "past_key_values"} and callable(base) and base() is not model:
        return _forward_parameters(base())
    return names


def cache_keyword(model) -> str:
    """The keyword that passes a KV cache to ``model.forward``: ``"cache"`` where the forward takes it (transformers
    renamed ``past_key_values``, which it accepts with a warning until 5.40), else ``"past_key_values"``."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` before the rename)."""
    keys = out.keys()
    return out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None


def _eos_id(tokenizer: LocationTokenizer, eos_token_id: int | None = None) -> int:
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no `eos_token_id`; set `tokenizer.eos_token` or pass `eos_token_id`")
    if any(int(eos) in ids for ids in tokenizer.code_token_ids):
        raise ValueError(f"eos_token_id={eos} is a location code token; it must be a different token")
    return int(eos)


def make_prefix_allowed_tokens_fn(
    tokenizer: LocationTokenizer, prompt_length: int, eos_token_id: int | None = None
) -> Callable[[int, torch.Tensor], list[int]]:
    r"""
    Build a `prefix_allowed_tokens_fn` for `model.generate` that only lets valid location codes through.

    The function walks the code trie of `tokenizer` over the tokens generated after the prompt
    (`input_ids[prompt_length:]`) and returns the children of the node it reaches. At a leaf (a complete code), after
    EOS, or on a token outside the trie it returns `[eos_token_id]`, never an empty list.

    Args:
        tokenizer ([`LocationTokenizer`]):
            The tokenizer holding the code table.
        prompt_length (`int`):
            Length of the (padded) prompt, i.e. `input_ids.shape[1]` of the batch given to `generate` (left padding
            keeps every row's generated tokens at the same offset).
        eos_token_id (`int`, *optional*):
            Token allowed after a full code; defaults to `tokenizer.eos_token_id`.

    Returns:
        `Callable[[int, torch.Tensor], list[int]]`: the function to pass as `prefix_allowed_tokens_fn`.
    """
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"`prompt_length` must be an int >= 0, got {prompt_length!r}")
    eos = _eos_id(tokenizer, eos_token_id)
    trie = tokenizer.build_trie()
    only_eos = [eos]
    children_cache: dict[int, list[int]] = {}

    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        node = trie
        for token_id in input_ids[prompt_length:].tolist():
            if token_id == eos:
                return only_eos
            node = node.get(token_id)
            if node is None:
                return only_eos
        if not node:
            return only_eos
        allowed = children_cache.get(id(node))
        if allowed is None:
            allowed = children_cache[id(node)] = list(node)
        return allowed

    return prefix_allowed_tokens_fn


class LocationCodeLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that restricts generation after the prompt to valid location codes, vectorised over beams.

    From the code table it precomputes the token ids of every level, a node-transition table over code prefixes
    (`next_node[node, code]`, `-1` when invalid) and an allowed-code mask per prefix node (memory
    O(num_prefix_nodes x codebook_size)). At each step every row's prefix node is found with at most `num_levels`
    gathers; the scores are kept for the allowed code tokens of the current level and set to `-inf` elsewhere; after
    the last level only EOS is allowed. Rows whose generated tokens leave the trie (possible only for beams that are
    already at `-inf`) also get only EOS. The result equals that of `prefix_allowed_tokens_fn` with
    [`make_prefix_allowed_tokens_fn`].

    The prompt length is found on the first call of each generation (when `prompt_length` is not given): a call
    starts a new generation unless it continues the previous one (same rows, one more token, same prompt tokens), so
    one processor can be reused across `generate` calls with prompts of any length.

    Args:
        tokenizer ([`LocationTokenizer`]):
            The tokenizer holding the code table.
        eos_token_id (`int`, *optional*):
            Token allowed after a full code; defaults to `tokenizer.eos_token_id`.
        num_beams (`int`, *optional*):
            When given, a batch item whose allowed tokens are all `-inf` in every beam gets them at score 0 instead
            (the rule of transformers' `PrefixConstrainedLogitsProcessor`); when omitted the same rule is applied per
            row.
        prompt_length (`int`, *optional*):
            Fixed prompt length (`input_ids.shape[1]` given to `generate`); detected automatically when omitted.

    Example:

    ```python
    >>> processor = LocationCodeLogitsProcessor(tokenizer, num_beams=10)
    >>> out = model.generate(**batch, num_beams=10, num_return_sequences=10, do_sample=False,
    ...                      max_new_tokens=tokenizer.num_levels + 1, logits_processor=LogitsProcessorList([processor]))
    ```
    """

    def __init__(
        self,
        tokenizer: LocationTokenizer,
        eos_token_id: int | None = None,
        num_beams: int | None = None,
        prompt_length: int | None = None,
    ):
        if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"`num_beams` must be a positive int or None, got {num_beams!r}")
        if prompt_length is not None and (
            isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0
        ):
            raise ValueError(f"`prompt_length` must be an int >= 0 or None, got {prompt_length!r}")
        self.eos_token_id = _eos_id(tokenizer, eos_token_id)
        self.num_beams = num_beams
        self.prompt_length = prompt_length
        self.num_levels = tokenizer.num_levels
        sizes = tokenizer.codebook_sizes
        max_size = max(sizes)

        # Token ids of the codes of each level (`level_token_ids[level][code]`); levels may differ in size.
        self._level_token_ids = [torch.tensor(ids, dtype=torch.long) for ids in tokenizer.code_token_ids]
        self._max_code_token_id = max(int(ids.max()) for ids in self._level_token_ids)

        # Prefix nodes are numbered depth by depth: node 0 is the root, then the distinct prefixes of length 1, 2,
        # ..., num_levels - 1. `allowed[node, code]` says whether `code` may follow that prefix; `next_node` holds the
        # transitions of nodes of depth <= num_levels - 2 (the deeper ones lead to leaves, which need no id).
        codes = torch.tensor(list(tokenizer.location_codes.values()), dtype=torch.long)  # [num_locations, num_levels]
        num_locations = codes.shape[0]
        node_of_prefix = torch.zeros(num_locations, dtype=torch.long)  # node id of each location's current prefix
        allowed_rows, next_rows = [], []
        num_nodes = 1
        depth_start, depth_count = 0, 1  # node ids of the current depth: [depth_start, depth_start + depth_count)
        for depth in range(self.num_levels):
            local = node_of_prefix - depth_start  # [num_locations], index among this depth's nodes
            allowed = torch.zeros(depth_count, max_size, dtype=torch.bool)
            allowed[local, codes[:, depth]] = True
            allowed_rows.append(allowed)
            if depth < self.num_levels - 1:
                keys = local * max_size + codes[:, depth]
                unique_keys, child_local = torch.unique(keys, return_inverse=True)
                nxt = torch.full((depth_count, max_size), -1, dtype=torch.long)
                child_ids = num_nodes + torch.arange(unique_keys.numel())
                nxt.view(-1)[unique_keys] = child_ids
                next_rows.append(nxt)
                node_of_prefix = num_nodes + child_local
                depth_start, depth_count = num_nodes, unique_keys.numel()
                num_nodes += depth_count
        self._allowed = torch.cat(allowed_rows)  # [num_prefix_nodes, K] bool
        self._next_node = torch.cat(next_rows) if next_rows else torch.empty(0, max_size, dtype=torch.long)
        self._cache: dict[tuple[torch.device, int], dict] = {}
        self._last_shape: tuple[int, int] | None = None
        self._prompt_ref: torch.Tensor | None = None
        self._auto_prompt_length: int | None = None

    @property
    def num_prefix_nodes(self) -> int:
        """Number of code prefixes (internal trie nodes) in the precomputed tables."""
        return self._allowed.shape[0]

    def reset(self) -> None:
        """Forget the detected prompt length (the next call starts a new generation)."""
        self._last_shape = None
        self._prompt_ref = None
        self._auto_prompt_length = None

    def _tables(self, device: torch.device, vocab_size: int) -> dict:
        key = (device, vocab_size)
        tables = self._cache.get(key)
        if tables is None:
            if self._max_code_token_id >= vocab_size:
                raise ValueError(
                    f"the scores have {vocab_size} columns but the code tokens go up to id {self._max_code_token_id}; "
                    "resize the model's token embeddings to `len(tokenizer)`"
                )
            if self.eos_token_id >= vocab_size:
                raise ValueError(f"eos_token_id={self.eos_token_id} is outside the vocabulary of size {vocab_size}")
            token_level = torch.full((vocab_size,), -1, dtype=torch.long)
            token_code = torch.full((vocab_size,), -1, dtype=torch.long)
            for level, ids in enumerate(self._level_token_ids):
                token_level[ids] = level
                token_code[ids] = torch.arange(ids.numel())
            level0 = self._level_token_ids[0][self._allowed[0, : self._level_token_ids[0].numel()]]
            tables = {
                "allowed": self._allowed.to(device),
                "next_node": self._next_node.to(device),
                "level_token_ids": [ids.to(device) for ids in self._level_token_ids],
                "token_level": token_level.to(device),
                "token_code": token_code.to(device),
                "level0_columns": level0.to(device),  # the level-0 codes that some location uses
                "eos_column": torch.tensor([self.eos_token_id], device=device),
            }
            self._cache[key] = tables
        return tables

    def _resolve_prompt_length(self, input_ids: torch.Tensor) -> int:
        if self.prompt_length is not None:
            return self.prompt_length
        rows, length = input_ids.shape
        continues = (
            self._last_shape == (rows, length - 1)
            and self._prompt_ref is not None
            and torch.equal(input_ids[:, : self._auto_prompt_length], self._prompt_ref)
        )
        if not continues:
            self._auto_prompt_length = length
            self._prompt_ref = input_ids.detach().clone()
        self._last_shape = (rows, length)
        return self._auto_prompt_length

    def _candidates(self, input_ids: torch.Tensor, prompt_length: int, tables: dict):
        """Return the candidate token columns `[C]` and which of them each row may take (`[rows, C]` or `[1, C]`)."""
        num_generated = input_ids.shape[1] - prompt_length
        device = input_ids.device
        if num_generated == 0:  # level 0: the same allowed set for every row
            columns = tables["level0_columns"]
            return columns, torch.ones(1, columns.numel(), dtype=torch.bool, device=device)
        if num_generated >= self.num_levels:  # a full code has been generated: only EOS
            return tables["eos_column"], torch.ones(1, 1, dtype=torch.bool, device=device)
        generated = input_ids[:, prompt_length:]  # [rows, num_generated]
        expected = torch.arange(num_generated, device=device)
        on_trie = (tables["token_level"][generated] == expected).all(dim=1)  # [rows]
        code = tables["token_code"][generated].clamp(min=0)  # [rows, num_generated]
        node = torch.zeros(generated.shape[0], dtype=torch.long, device=device)  # [rows], start at the root
        next_node = tables["next_node"]
        for level in range(num_generated):
            node = next_node[node, code[:, level]]
            on_trie = on_trie & (node >= 0)
            node = node.clamp(min=0)
        codes = tables["level_token_ids"][num_generated]  # [K_level]
        allowed = tables["allowed"][node, : codes.numel()] & on_trie[:, None]  # [rows, K_level]
        columns = torch.cat([codes, tables["eos_column"]])  # [K_level + 1]
        allowed = torch.cat([allowed, ~on_trie[:, None]], dim=1)  # rows off the trie can only end
        return columns, allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        prompt_length = self._resolve_prompt_length(input_ids)
        if input_ids.shape[1] < prompt_length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, fewer than prompt_length={prompt_length}; was the "
                "processor built for another prompt?"
            )
        tables = self._tables(scores.device, scores.shape[-1])
        columns, allowed = self._candidates(input_ids, prompt_length, tables)
        kept = scores.index_select(1, columns).masked_fill(~allowed, -math.inf)  # [rows, C]
        # Same rule as transformers' PrefixConstrainedLogitsProcessor: when every allowed token of every beam of a
        # batch item is -inf, the allowed tokens get score 0 so that the constraint still holds.
        dead = kept.amax(dim=-1).isneginf()  # [rows]
        if self.num_beams is not None and dead.shape[0] % self.num_beams == 0:
            dead = dead.view(-1, self.num_beams).all(dim=-1).repeat_interleave(self.num_beams)
        if bool(dead.any()):
            fallback = torch.zeros_like(kept).masked_fill(~allowed, -math.inf)
            kept = torch.where(dead[:, None], fallback, kept)
        processed = torch.full_like(scores, -math.inf)
        return processed.index_copy_(1, columns, kept)


@torch.no_grad()
def _check_rank_args(prompts, num_beams, batch_size) -> None:
    if isinstance(prompts, str):
        raise ValueError("`prompts` must be a list of strings, not a single string")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int, got {num_beams!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")


def _batches(total: int, batch_size: int, progress: bool):
    """Batch start offsets, with a tqdm bar over the prompts when `progress`."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="ranking locations", unit="prompt", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            yield start
            bar.update(min(batch_size, total - start))


def rank_locations(
    model,
    tokenizer: LocationTokenizer,
    prompts: Sequence[str],
    num_beams: int = 20,
    batch_size: int = 16,
    processor: str = "vectorised",
    progress: bool = False,
    **generate_kwargs,
) -> list[list[str]]:
    r"""
    Rank candidate locations for each prompt with deterministic beam search constrained to valid codes.

    Prompts are encoded with left padding in batches of `batch_size`; `model.generate` runs beam search with
    `num_beams` beams, `num_return_sequences=num_beams`, `do_sample=False` and `max_new_tokens=num_levels + 1`. The
    returned beams are parsed back to locations and ordered by sequence score (best first); duplicates and beams
    that are not a location are dropped, so a list may hold fewer than `num_beams` locations.

    Args:
        model ([`PreTrainedModel`]):
            A causal LM whose vocabulary covers `len(tokenizer)` (its embeddings resized after adding the codes).
        tokenizer ([`LocationTokenizer`]):
            The tokenizer with the code table.
        prompts (`list[str]`):
            Prompt texts, each ending where the code of the answer starts.
        num_beams (`int`, *optional*, defaults to 20):
            Beams, and so the largest k for Acc@k / NDCG@k.
        batch_size (`int`, *optional*, defaults to 16):
            Prompts per `generate` call.
        processor (`str`, *optional*, defaults to `"vectorised"`):
            `"vectorised"` ([`LocationCodeLogitsProcessor`]) or `"prefix_fn"` ([`make_prefix_allowed_tokens_fn`]);
            both give the same ranking.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar over the prompts.
        generate_kwargs (*optional*):
            Passed to `model.generate` (e.g. `length_penalty`); sampling is refused.

    Returns:
        `list[list[str]]`: per prompt, distinct location ids ordered by beam score.
    """
    if processor not in _PROCESSORS:
        raise ValueError(f"`processor` must be one of {list(_PROCESSORS)}, got {processor!r}")
    _check_rank_args(prompts, num_beams, batch_size)
    if generate_kwargs.get("do_sample"):
        raise ValueError("rank_locations is deterministic: `do_sample=True` is not allowed")
    for key in ("num_beams", "num_return_sequences", "prefix_allowed_tokens_fn"):
        if key in generate_kwargs:
            raise ValueError(f"`{key}` is set by rank_locations; do not pass it in generate_kwargs")
    eos = _eos_id(tokenizer, generate_kwargs.pop("eos_token_id", None))
    pad = generate_kwargs.pop("pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    extra_processors = list(generate_kwargs.pop("logits_processor", None) or [])
    generate_kwargs.setdefault("max_new_tokens", tokenizer.num_levels + 1)
    prompts = list(prompts)

    was_training = model.training
    model.eval()
    vectorised = LocationCodeLogitsProcessor(tokenizer, eos_token_id=eos, num_beams=num_beams)
    device = model.device
    results: list[list[str]] = []
    try:
        for start in _batches(len(prompts), batch_size, progress):
            chunk = prompts[start : start + batch_size]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            prompt_length = input_ids.shape[1]
            kwargs = dict(generate_kwargs)
            processors = list(extra_processors)
            if processor == "vectorised":
                vectorised.reset()
                processors.append(vectorised)
            else:
                kwargs["prefix_allowed_tokens_fn"] = make_prefix_allowed_tokens_fn(tokenizer, prompt_length, eos)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=num_beams,
                num_return_sequences=num_beams,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList(processors),
                return_dict_in_generate=True,
                output_scores=True,
                **kwargs,
            )
            sequences = out.sequences[:, prompt_length:].view(len(chunk), num_beams, -1).cpu()
            seq_scores = out.sequences_scores.view(len(chunk), num_beams).float().cpu()
            for row in range(len(chunk)):
                order = torch.sort(seq_scores[row], descending=True, stable=True).indices.tolist()
                ranked: list[str] = []
                seen: set[str] = set()
                for beam in order:
                    if not math.isfinite(float(seq_scores[row, beam])):
                        continue
                    found = tokenizer.ids_to_locations(sequences[row, beam])
                    location = found[0] if found else None
                    if location is not None and location not in seen:
                        seen.add(location)
                        ranked.append(location)
                results.append(ranked)
    finally:
        if was_training:
            model.train()
    return results


class _CodePrefixTables:
    """Per level j: the sorted keys of the code prefixes of length j and, per prefix, the mask of valid next codes."""

    def __init__(self, tokenizer: LocationTokenizer, device: torch.device):
        ids = list(tokenizer.location_ids)
        codes = torch.tensor([tokenizer.location_to_codes(loc) for loc in ids], dtype=torch.long)  # [N, L]
        self.sizes = list(tokenizer.codebook_sizes)
        self.num_levels = codes.shape[1]
        self.level_token_ids = [torch.tensor(t, dtype=torch.long, device=device) for t in tokenizer.code_token_ids]
        self.keys, self.allowed = [], []
        key = torch.zeros(len(ids), dtype=torch.long)
        for level in range(self.num_levels):
            uniq, inverse = torch.unique(key, return_inverse=True)  # sorted prefix keys of this level
            mask = torch.zeros(len(uniq), self.sizes[level], dtype=torch.bool)
            mask[inverse, codes[:, level]] = True
            self.keys.append(uniq.to(device))
            self.allowed.append(mask.to(device))
            key = key * self.sizes[level] + codes[:, level]
        self.location_of = dict(zip(key.tolist(), ids))  # full code key -> location id

    def allowed_for(self, level: int, prefix_keys: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.keys[level], prefix_keys).clamp(max=len(self.keys[level]) - 1)
        ok = self.keys[level][pos] == prefix_keys
        return self.allowed[level][pos] & ok[:, None]


@torch.inference_mode()
def _rank_batch_cached(model, tokenizer, tables: _CodePrefixTables, chunk: list[str], num_beams: int, eos: int):
    """Beam search over codes that encodes each prompt once and expands its KV cache per beam (HF generate expands the
    prompt per beam before the prefill); scores are summed log-probabilities of the codes and EOS, the quantity
    beam search ranks fixed-length hypotheses by."""
    device = model.device
    batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache = output_cache(out)
    key = cache_keyword(model)
    logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [B, V]
    b = len(chunk)
    cand = logp[:, tables.level_token_ids[0]]  # [B, K0]
    cand = cand.masked_fill(~tables.allowed_for(0, torch.zeros(b, dtype=torch.long, device=device)), -math.inf)
    beams = min(num_beams, cand.shape[1])
    scores, codes = cand.topk(beams, dim=1)  # [B, beams]
    prefix = codes.reshape(-1)  # code keys of the beams, [B * beams]
    last_code = codes.reshape(-1)
    cache.batch_repeat_interleave(beams)
    attention_mask = attention_mask.repeat_interleave(beams, dim=0)
    next_pos = position_ids[:, -1:].repeat_interleave(beams, dim=0) + 1
    scores = scores.reshape(-1)
    for level in range(1, tables.num_levels + 1):
        tokens = tables.level_token_ids[level - 1][last_code][:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=next_pos, use_cache=True,
                    **{key: cache})
        next_pos = next_pos + 1
        logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        if level == tables.num_levels:  # only EOS may follow a complete code
            scores = scores + logp[:, eos]
            break
        cand = logp[:, tables.level_token_ids[level]]  # [B * beams, K]
        cand = cand.masked_fill(~tables.allowed_for(level, prefix), -math.inf)
        total = (scores[:, None] + cand).view(b, -1)  # [B, beams * K]
        k = cand.shape[1]
        scores, flat = total.topk(beams, dim=1)
        parent = flat // k + torch.arange(b, device=device)[:, None] * beams  # global beam index of the parent
        last_code = (flat % k).reshape(-1)
        parent = parent.reshape(-1)
        prefix = prefix[parent] * tables.sizes[level] + last_code
        cache.reorder_cache(parent)
        scores = scores.reshape(-1)
    scores = scores.view(b, beams).cpu()
    prefix = prefix.view(b, beams).cpu()
    ranked_all = []
    for row in range(b):
        order = torch.sort(scores[row], descending=True, stable=True).indices.tolist()
        ranked = []
        for beam in order:
            if math.isfinite(float(scores[row, beam])):
                ranked.append(tables.location_of[int(prefix[row, beam])])
        ranked_all.append(ranked)
    return ranked_all


def rank_locations_cached(
    model,
    tokenizer: LocationTokenizer,
    prompts: Sequence[str],
    num_beams: int = 20,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[str]]:
    r"""
    Like [`rank_locations`], but with a beam search written for fixed-length location codes: each prompt is encoded
    once and its KV cache is expanded to the beams, instead of `generate` expanding the prompt per beam before the
    prefill (num_beams times the prompt compute). The ranking equals `rank_locations`' up to exact score ties.
    `progress=True` shows a progress bar over the prompts.

    Returns:
        `list[list[str]]`: per prompt, distinct location ids ordered by the summed log-probability of code and EOS.
    """
    _check_rank_args(prompts, num_beams, batch_size)
    eos = _eos_id(tokenizer)
    tables = _CodePrefixTables(tokenizer, model.device)
    was_training = model.training
    model.eval()
    prompts = list(prompts)
    results: list[list[str]] = []
    try:
        for start in _batches(len(prompts), batch_size, progress):
            results.extend(_rank_batch_cached(model, tokenizer, tables, prompts[start : start + batch_size],
                                              num_beams, eos))
    finally:
        if was_training:
            model.train()
    return results
