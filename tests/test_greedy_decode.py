"""train/greedy_decode.py: the decode loop equals greedy `generate` (left padding, per-row budgets, eos, finished rows
dropped), the reserved cache writes in place, and a grammar chooser plugs in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from tokenization_mobility.constrained import cache_keyword, output_cache
from train.greedy_decode import ReservedCache, SlotCache, continuous_greedy_decode, greedy_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=256, eos_token_id=7,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def reference(model, prompt: list[int], budget: int, eos: list[int]) -> list[int]:
    """`generate`, one prompt at a time, greedy, cut at the first eos."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                         num_beams=1, eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    for k, token in enumerate(new):
        if token in eos:
            return new[: k + 1]
    return new


def test_equals_greedy_generate_per_prompt():
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (5, 12, 1, 9)]
    budgets = [6, 20, 3, 15]
    # an eos that the untrained model emits for some rows: the most frequent greedy token of the references
    first = [reference(model, p, b, [999]) for p, b in zip(prompts, budgets)]
    eos = [int(np.bincount(np.concatenate(first)).argmax())]
    ids, mask = left_padded(prompts)
    with torch.inference_mode():
        got = greedy_decode(model, ids, mask, max_new_tokens=budgets, eos_token_ids=eos)
        want = [reference(model, p, b, eos) for p, b in zip(prompts, budgets)]
    assert got == want
    assert any(w and w[-1] in eos for w in want) and any(len(w) == b for w, b in zip(want, budgets))


def row_zero_ends_at_step_two(seen: list):
    """A chooser that records the rows it is asked for (in `seen`) and writes token 5, except eos 7 for row 0 at the
    second step."""

    def choose(rows, scores):
        seen.append(rows.tolist())
        assert scores.shape == (len(rows), 50)
        return np.array([7 if (r == 0 and len(seen) == 2) else 5 for r in rows])

    return choose


def test_chooser_receives_the_live_rows_only():
    """A custom chooser sees the original indices of the rows still decoding; a row ends at its eos and the others go
    on (here: row 0 must stop after 2 tokens, row 1 writes token 5 until its budget)."""
    model = tiny_lm()
    ids, mask = left_padded([[3, 4, 5], [6, 7]])
    seen = []
    choose = row_zero_ends_at_step_two(seen)

    with torch.inference_mode():
        out = greedy_decode(model, ids, mask, max_new_tokens=[10, 4], eos_token_ids=[7], choose=choose)
    assert out == [[5, 7], [5, 5, 5, 5]]
    assert seen == [[0, 1], [0, 1], [1], [1]]


def test_reserved_cache_writes_in_place_and_refuses_overflow():
    cache = ReservedCache(4)
    k = torch.randn(2, 1, 3, 8)
    keys, _ = cache.update(k, k, 0)
    assert torch.equal(keys, k) and cache.get_seq_length() == 3
    buffer = cache.layers[0]._keys
    step = torch.randn(2, 1, 1, 8)
    keys, _ = cache.update(step, step, 0)
    assert cache.layers[0]._keys is buffer and keys.data_ptr() == buffer.data_ptr()  # a view, no copy
    assert torch.equal(keys[:, :, 3:], step) and cache.get_seq_length() == 4
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, torch.cat([k, step], dim=2)[1:])
    with pytest.raises(RuntimeError, match="4 positions"):
        cache.update(step[:1], step[:1], 0)
    with pytest.raises(ValueError, match="budget"):
        greedy_decode(tiny_lm(), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2), max_new_tokens=[0],
                      eos_token_ids=[7])


# ----------------------------------------------------------------------------------------------------------------------
# continuous batching
# ----------------------------------------------------------------------------------------------------------------------

def _prompts_and_eos(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (5, 12, 1, 9, 7, 3, 20, 2)]
    budgets = [6, 20, 3, 15, 9, 1, 12, 30]
    first = [reference(model, p, b, [999]) for p, b in zip(prompts, budgets)]
    eos = [int(np.bincount(np.concatenate(first)).argmax())]
    return prompts, budgets, eos


@pytest.mark.parametrize("max_batch", [1, 3, 8, 20])
def test_continuous_equals_greedy_generate_per_prompt(max_batch):
    """More prompts than slots (refills), a one-token prompt, a budget of 1, answers ending at eos and at the budget."""
    model = tiny_lm()
    prompts, budgets, eos = _prompts_and_eos(model)
    finished = []
    with torch.inference_mode():
        want = [reference(model, p, b, eos) for p, b in zip(prompts, budgets)]
        got = continuous_greedy_decode(model, prompts, max_new_tokens=budgets, eos_token_ids=eos,
                                       max_batch=max_batch, on_finish=finished.append)
    assert got == want
    assert any(w[-1] in eos for w in want) and any(len(w) == b and w[-1] not in eos for w, b in zip(want, budgets))
    assert sorted(finished) == list(range(len(prompts)))


def test_continuous_eager_attention_takes_an_additive_mask():
    model = tiny_lm()
    model.config._attn_implementation = "eager"
    prompts, budgets, eos = _prompts_and_eos(model)
    with torch.inference_mode():
        want = [reference(model, p, b, eos) for p, b in zip(prompts, budgets)]
        got = continuous_greedy_decode(model, prompts, max_new_tokens=budgets, eos_token_ids=eos, max_batch=3)
    assert got == want


def test_continuous_refills_a_finished_slot_with_the_next_prompt():
    """Two slots, three prompts: prompt 0 ends after 2 tokens, prompt 2 takes its slot at the next step, prompt 1
    decodes on; the chooser sees the prompt indices whose token is due."""
    model = tiny_lm()
    seen = []
    choose = row_zero_ends_at_step_two(seen)

    with torch.inference_mode():
        out = continuous_greedy_decode(model, [[3, 4, 5], [6, 7], [8, 9, 10, 11]], max_new_tokens=[10, 4, 2],
                                       eos_token_ids=[7], choose=choose, max_batch=2)
    assert out == [[5, 7], [5, 5, 5, 5], [5, 5]]
    assert seen == [[0, 1], [0, 1], [2, 1], [2, 1]]


def test_continuous_last_live_slot_moves_down_when_nothing_is_left_to_admit():
    """Slot 0's prompt ends first with no prompt waiting: the prompt of slot 1 moves to slot 0 (its cache with it) and
    decodes on exactly as it would alone."""
    model = tiny_lm()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    with torch.inference_mode():
        alone = continuous_greedy_decode(model, prompts[1:], max_new_tokens=[12], eos_token_ids=[999])
        both = continuous_greedy_decode(model, prompts, max_new_tokens=[2, 12], eos_token_ids=[999], max_batch=2)
    assert both[1] == alone[0] and len(both[0]) == 2


def test_slot_cache_place_step_and_move():
    cache = SlotCache(2, 6)
    one = DynamicCache()
    k = torch.randn(1, 1, 3, 4)
    one.update(k, k + 1, 0)
    cache.place(1, one)
    buffer = cache.layers[0]._keys
    assert torch.equal(buffer[1, :, :3], k[0]) and not buffer[0].any()
    # a step: slot 0 writes its first position at column 0, slot 1 its fourth at column 3
    cache.begin_step(2, torch.tensor([0, 3]))
    step = torch.randn(2, 1, 1, 4)
    keys, values = cache.update(step, step, 0)
    assert keys.shape == (2, 1, 4, 4) and keys.data_ptr() == buffer.data_ptr()  # views of the buffer, no copy
    assert torch.equal(keys[0, :, 0], step[0, :, 0]) and torch.equal(keys[1, :, 3], step[1, :, 0])
    assert torch.equal(keys[1, :, :3], k[0]) and cache.get_seq_length() == 4
    cache.move(1, 0, 4)
    assert torch.equal(buffer[0, :, :4], buffer[1, :, :4])
    with pytest.raises(RuntimeError, match="6 positions"):
        cache.begin_step(1, torch.tensor([6]))
    cache.begin_step(1, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="one new position"):
        cache.update(step, step, 0)


def test_continuous_refuses_bad_input():
    model = tiny_lm()
    with pytest.raises(ValueError, match="budget"):
        continuous_greedy_decode(model, [[1, 2]], max_new_tokens=[0], eos_token_ids=[7])
    with pytest.raises(ValueError, match="max_batch"):
        continuous_greedy_decode(model, [[1, 2]], max_new_tokens=[3], eos_token_ids=[7], max_batch=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] has no tokens"):
        continuous_greedy_decode(model, [[1, 2], []], max_new_tokens=[3, 3], eos_token_ids=[7])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention mask"):
        continuous_greedy_decode(model, [[1, 2]], max_new_tokens=[3], eos_token_ids=[7])
    assert continuous_greedy_decode(model, [], max_new_tokens=[], eos_token_ids=[7]) == []


def test_cache_keyword_follows_the_forward_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return input_ids

    class Wrapper(torch.nn.Module):  # a PEFT model forwards **kwargs to the model it wraps
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, *args, **kwargs):
            return self.base(*args, **kwargs)

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    assert cache_keyword(Wrapper(Old())) == "past_key_values"
    assert cache_keyword(Wrapper(New())) == "cache"
    llama = tiny_lm()
    out = llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert isinstance(output_cache(out), DynamicCache) and output_cache(out).get_seq_length() == 3
    assert output_cache({"logits": out.logits}) is None


def test_decoding_passes_the_cache_under_the_installed_name_without_a_deprecation_warning():
    import warnings

    model = tiny_lm()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    ids, mask = left_padded(prompts)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)  # transformers warns on the old keyword before removing it
        static = greedy_decode(model, ids, mask, max_new_tokens=[4, 4], eos_token_ids=[999])
        continuous = continuous_greedy_decode(model, prompts, max_new_tokens=[4, 4], eos_token_ids=[999], max_batch=2)
    with torch.inference_mode():
        want = [reference(model, p, 4, [999]) for p in prompts]
    assert static == continuous == want
