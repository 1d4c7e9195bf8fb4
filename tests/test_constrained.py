"""Constrained decoding over location codes: trie prefix function vs vectorised LogitsProcessor, and rank_locations."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from tokenization_mobility import (
    LocationCodeLogitsProcessor,
    LocationTokenizer,
    build_bpe_tokenizer,
    make_prefix_allowed_tokens_fn,
    rank_locations,
)
from train.sft import tiny_llama

NUM_LEVELS = 4
CODEBOOK = 16
NUM_BEAMS = 10

CORPUS = [
    f"user {i} visited the {place} at {i % 24} then will visit the park near station {i % 7}"
    for i, place in zip(range(600), ["cafe", "museum", "bakery", "gym", "office", "school"] * 100)
]

PROMPTS = [
    "user 1 will visit",
    "user 22 visited the cafe at 3 then will visit the park near station 4 and then",
    "the",
    "user 7 visited <a_1><b_2><c_3><d_4> then will visit",
]


def random_table(n=300, levels=NUM_LEVELS, size=CODEBOOK, seed=0):
    rng = random.Random(seed)
    codes = set()
    while len(codes) < n:
        codes.add(tuple(rng.randrange(size) for _ in range(levels)))
    return {f"poi-{i:03d}": c for i, c in enumerate(sorted(codes))}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    base = build_bpe_tokenizer(CORPUS, vocab_size=400)
    return LocationTokenizer.from_base(base, random_table(), codebook_size=CODEBOOK)


def small_llama(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128).eval()


@pytest.fixture(scope="module")
def model(tok):
    return small_llama(tok)


def _generate(model, tok, batch, **kwargs):
    return model.generate(
        **batch,
        num_beams=NUM_BEAMS,
        num_return_sequences=NUM_BEAMS,
        do_sample=False,
        max_new_tokens=tok.num_levels + 1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )


def _allowed_sets(processed):
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in processed]


def test_processor_and_prefix_fn_give_identical_beams(model, tok):
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths, left-padded
    prompt_length = batch["input_ids"].shape[1]
    with_fn = _generate(model, tok, batch, prefix_allowed_tokens_fn=make_prefix_allowed_tokens_fn(tok, prompt_length))
    processor = LocationCodeLogitsProcessor(tok, num_beams=NUM_BEAMS)
    with_processor = _generate(model, tok, batch, logits_processor=LogitsProcessorList([processor]))
    assert torch.equal(with_fn.sequences, with_processor.sequences)
    assert torch.equal(with_fn.sequences_scores, with_processor.sequences_scores)
    assert torch.isfinite(with_processor.sequences_scores).all()

    generated = with_processor.sequences[:, prompt_length:]
    assert generated.shape == (len(PROMPTS) * NUM_BEAMS, tok.num_levels + 1)
    assert (generated[:, tok.num_levels] == tok.eos_token_id).all()  # EOS right after the last level
    for row in generated:
        for level in range(tok.num_levels):
            assert int(row[level]) in tok.code_token_ids[level]
        locations = tok.text_to_locations(tok.decode(row, skip_special_tokens=True))
        assert len(locations) == 1 and locations[0] is not None
        assert tok.ids_to_locations(row) == locations
    # beams of one prompt are distinct locations
    for item in range(len(PROMPTS)):
        rows = generated[item * NUM_BEAMS : (item + 1) * NUM_BEAMS, : tok.num_levels]
        assert len({tuple(r.tolist()) for r in rows}) == NUM_BEAMS

    # an unconstrained search on a random model does not produce codes: the constraint did the work
    free = _generate(model, tok, batch)
    assert not torch.equal(free.sequences, with_processor.sequences)


def test_processor_reused_across_prompt_lengths(model, tok):
    """One processor instance follows generations with different prompt lengths (its prompt length is detected)."""
    processor = LocationCodeLogitsProcessor(tok, num_beams=NUM_BEAMS)
    for prompts in (PROMPTS[:1], PROMPTS[1:3], [PROMPTS[1] + " and again"], PROMPTS):
        batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        reused = _generate(model, tok, batch, logits_processor=LogitsProcessorList([processor]))
        fresh_fn = make_prefix_allowed_tokens_fn(tok, batch["input_ids"].shape[1])
        reference = _generate(model, tok, batch, prefix_allowed_tokens_fn=fresh_fn)
        assert torch.equal(reused.sequences, reference.sequences)
        assert torch.equal(reused.sequences_scores, reference.sequences_scores)


def _random_states(tok, rows, prompt_length, num_generated, seed):
    """Rows of prompt + generated tokens: valid code prefixes, random codes, garbage and EOS."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (rows, prompt_length + num_generated), generator=gen)
    codes = list(tok.location_codes.values())
    for row in range(rows):
        kind = row % 4
        for level in range(num_generated):
            if kind == 0:  # a valid prefix
                code = codes[(row * 7 + seed) % len(codes)][min(level, tok.num_levels - 1)]
            else:  # a random code of the right level (often off the trie)
                code = int(torch.randint(0, CODEBOOK, (1,), generator=gen))
            if level < tok.num_levels:
                ids[row, prompt_length + level] = tok.code_token_ids[level][code]
        if kind == 2 and num_generated:  # garbage token
            ids[row, prompt_length + num_generated - 1] = 5
        if kind == 3 and num_generated:  # EOS
            ids[row, prompt_length + num_generated - 1] = tok.eos_token_id
    return ids


@pytest.mark.parametrize("num_generated", [0, 1, 2, 3, 4, 5])
def test_masks_match_prefix_constrained_processor(tok, num_generated):
    rows, prompt_length, vocab = 2 * NUM_BEAMS, 7, len(tok) + 5  # the model vocabulary may be padded
    ids = _random_states(tok, rows, prompt_length, num_generated, seed=num_generated)
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    reference = PrefixConstrainedLogitsProcessor(make_prefix_allowed_tokens_fn(tok, prompt_length), NUM_BEAMS)
    processor = LocationCodeLogitsProcessor(tok, num_beams=NUM_BEAMS, prompt_length=prompt_length)
    expected = reference(ids, scores.clone())
    got = processor(ids, scores.clone())
    assert torch.equal(got, expected)
    allowed = _allowed_sets(got)
    assert all(allowed)  # never an empty set
    trie = tok.build_trie()
    for row, row_allowed in zip(ids, allowed):
        node = trie
        for token_id in row[prompt_length:].tolist():
            node = node.get(token_id) if node is not None else None
        if num_generated >= tok.num_levels or node is None or not node:
            assert row_allowed == {tok.eos_token_id}
        else:
            assert row_allowed == set(node) and row_allowed <= set(tok.code_token_ids[num_generated])


def test_unsatisfiable_rows_follow_transformers_rule(tok):
    rows, prompt_length = NUM_BEAMS, 3
    ids = _random_states(tok, rows, prompt_length, 1, seed=3)
    scores = torch.full((rows, len(tok)), -float("inf"))
    scores[:, 20:30] = 0.0  # plain text tokens only: every allowed token (codes, EOS) is -inf in every beam
    reference = PrefixConstrainedLogitsProcessor(make_prefix_allowed_tokens_fn(tok, prompt_length), NUM_BEAMS)
    processor = LocationCodeLogitsProcessor(tok, num_beams=NUM_BEAMS, prompt_length=prompt_length)
    expected = reference(ids, scores.clone())
    got = processor(ids, scores.clone())
    assert torch.equal(got, expected)
    assert all(_allowed_sets(got))


def test_ragged_codebook_sizes(tok):
    base = build_bpe_tokenizer(CORPUS, vocab_size=400)
    table = {"x": (0, 4, 1), "y": (2, 0, 1), "z": (2, 0, 0), "w": (1, 3, 1)}
    ragged = LocationTokenizer.from_base(base, table, codebook_size=[3, 6, 2])
    processor = LocationCodeLogitsProcessor(ragged, num_beams=2, prompt_length=2)
    assert processor.num_prefix_nodes == 1 + 3 + 3  # root, 3 distinct first codes, 3 distinct 2-prefixes
    fn = make_prefix_allowed_tokens_fn(ragged, 2)
    reference = PrefixConstrainedLogitsProcessor(fn, 2)
    ids = torch.tensor([[5, 6], [7, 8]])
    steps = [ragged.location_to_ids("y"), ragged.location_to_ids("x")]
    for step in range(4):
        scores = torch.randn(2, len(ragged))
        assert torch.equal(processor(ids, scores.clone()), reference(ids, scores.clone()))
        if step < 3:
            ids = torch.cat([ids, torch.tensor([[steps[0][step]], [steps[1][step]]])], dim=1)
    scores = torch.zeros(2, len(ragged))
    first = LocationCodeLogitsProcessor(ragged, prompt_length=0)(torch.zeros(2, 0, dtype=torch.long), scores)
    assert _allowed_sets(first)[0] == {ragged.code_token_ids[0][c] for c in (0, 1, 2)}


def test_prefix_fn_never_empty(tok):
    fn = make_prefix_allowed_tokens_fn(tok, 2)
    eos = tok.eos_token_id
    assert set(fn(0, torch.tensor([9, 9]))) == set(tok.build_trie())
    full = torch.tensor([9, 9] + tok.location_to_ids("poi-000"))
    assert fn(0, full) == [eos]
    assert fn(0, torch.tensor([9, 9, eos])) == [eos]
    assert fn(0, torch.tensor([9, 9, 5])) == [eos]
    with pytest.raises(ValueError, match="prompt_length"):
        make_prefix_allowed_tokens_fn(tok, -1)


def test_processor_errors(tok):
    with pytest.raises(ValueError, match="num_beams"):
        LocationCodeLogitsProcessor(tok, num_beams=0)
    processor = LocationCodeLogitsProcessor(tok, prompt_length=2)
    with pytest.raises(ValueError, match="resize"):
        processor(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 100))
    with pytest.raises(ValueError, match="prompt_length"):
        processor(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, len(tok)))


def test_rank_locations(model, tok):
    ranked = rank_locations(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=3)
    assert len(ranked) == len(PROMPTS)
    for locations in ranked:
        assert len(locations) == NUM_BEAMS == len(set(locations))
        assert all(location in tok.location_codes for location in locations)
    again = rank_locations(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=3)
    assert again == ranked  # deterministic
    with_fn = rank_locations(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=3, processor="prefix_fn")
    assert with_fn == ranked

    # the ranking follows the beam scores of a plain constrained generate call
    batch = tok(PROMPTS[:3], return_tensors="pt", padding=True, padding_side="left")  # rank_locations' first batch
    out = _generate(model, tok, batch, logits_processor=LogitsProcessorList([LocationCodeLogitsProcessor(tok)]))
    order = torch.argsort(out.sequences_scores[:NUM_BEAMS], descending=True, stable=True)
    expected = [tok.ids_to_locations(out.sequences[i, batch["input_ids"].shape[1] :])[0] for i in order.tolist()]
    assert ranked[0] == list(dict.fromkeys(expected))

    with pytest.raises(ValueError, match="processor"):
        rank_locations(model, tok, PROMPTS, processor="beam")
    with pytest.raises(ValueError, match="do_sample"):
        rank_locations(model, tok, PROMPTS, do_sample=True)
    with pytest.raises(ValueError, match="batch_size"):
        rank_locations(model, tok, PROMPTS, batch_size=0)


def test_rank_locations_cached_equals_generate(model, tok):
    """Encoding each prompt once and expanding its cache per beam ranks exactly like HF's constrained beam search,
    on a left-padded batch of prompts of different lengths."""
    from tokenization_mobility.constrained import rank_locations_cached

    expected = rank_locations(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=3)
    cached = rank_locations_cached(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=3)
    assert cached == expected
    assert rank_locations_cached(model, tok, PROMPTS, num_beams=NUM_BEAMS, batch_size=len(PROMPTS)) == expected
    with pytest.raises(ValueError, match="num_beams"):
        rank_locations_cached(model, tok, PROMPTS, num_beams=0)
