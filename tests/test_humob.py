"""Llama-3-8B-Mob prediction (train/humob.py): tolerant answer parsing, slot filling, batched generation, a whole split
end to end with a tiny random Llama, and GEO-BLEU / DTW scoring against a tiny prepared grid city."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from train import humob
from train.evaluate import format_results_table, grid_targets
from train.humob import (
    answer_token_budget,
    evaluate_grid_predictions,
    fill_predictions,
    generate_answers,
    parse_asked_slots,
    parse_prediction,
    predict_grid,
)

torch.set_num_threads(1)

SYSTEM = (
    "You predict where a user will be. The city is a 200 x 200 grid; a day has 48 half-hour slots. Each record is "
    "'d t x y' (day, slot, cell). Rows to predict are written with x = y = 999, like this:\n0 0 999 999\n"
    'Answer with JSON {"prediction": [[d, t, x, y], ...]}.'
)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny prepared grid city, its prompts, a tiny chat tokenizer and a tiny random Llama


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """12 synthetic users x 10 days, days 8-9 to predict, users split 6/3/3."""
    from dataset_builders.preprocess import GridPreprocessConfig, prepare_grid
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import LoadedGrid
    from dataset_builders.schema import RowAccount
    from dataset_builders.synthetic import synthesize_grid

    grid = synthesize_grid(num_users=12, num_days=10, seed=0)
    loaded = LoadedGrid(grid, RowAccount(), {"format": "yjmob", "grid_size": 200, "coordinate_base": 1})
    prepared = prepare_grid(loaded, GridPreprocessConfig(predict_days=(8, 9), user_fractions=(0.5, 0.25, 0.25)))
    return write_prepared(prepared, tmp_path_factory.mktemp("humob") / "grid")


def _prompt(row, max_input_rows=None) -> list[dict]:
    inputs = list(zip(row["input_d"], row["input_t"], row["input_x"], row["input_y"]))
    if max_input_rows is not None:
        inputs = inputs[-max_input_rows:]
    lines = [f"{d} {t} {x} {y}" for d, t, x, y in inputs]
    lines += [f"{d} {t} 999 999" for d, t in zip(row["target_d"], row["target_t"])]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"User {row['uid']}. Records:\n" + "\n".join(lines)}]


def _answer(row) -> str:
    rows = [[int(d), int(t), int(x), int(y)]
            for d, t, x, y in zip(row["target_d"], row["target_t"], row["target_x"], row["target_y"])]
    return json.dumps({"prediction": rows}, separators=(",", ":"))


def _samples(grid_dir, split):
    from dataset_builders.publish import load_prepared

    return load_prepared(grid_dir).table("samples", split).to_pylist()


@pytest.fixture(scope="module")
def prompts(grid_dir):
    return {split: {row["uid"]: _prompt(row) for row in _samples(grid_dir, split)}
            for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def tokenizer(grid_dir):
    from tokenization_mobility import build_bpe_tokenizer
    from train.sft import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE

    rows = _samples(grid_dir, "train")
    corpus = [m["content"] for row in rows for m in _prompt(row)] + [_answer(row) for row in rows]
    tok = build_bpe_tokenizer(corpus, vocab_size=400, special_tokens=CHAT_SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(tokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# parse_prediction

TWO = [[60, 1, 3, 4], [60, 2, 5, 6]]


@pytest.mark.parametrize(
    "text, method, repairs",
    [
        ('{"prediction":[[60,1,3,4],[60,2,5,6]]}', "json", []),
        ('Here you go: {"prediction": [[60, 1, 3, 4], [60, 2, 5, 6]]} Hope it helps [1].', "json", []),
        ('Sure!\n```json\n{"prediction": [[60,1,3,4],[60,2,5,6]]}\n```\nAnything else?', "json", []),
        ('{"prediction":[["60","1","3","4"],[60,2," 5 ",6]]}', "json", []),
        ('{"reason":"the user\'s home, then work","prediction":[[60,1,3,4],[60,2,5,6]]}', "json", []),
        ('{"reason":"first"}\n{"prediction":[[60,1,3,4],[60,2,5,6]]}\n{"prediction":[[1,1,1,1]]}', "json", []),
        ('\n\n  {\n "prediction" :\n [ [ 60 , 1 ,\n 3 , 4 ] ,\n\t[60,2,5,6] ]\n }\n\n', "json", []),
        ("[[60,1,3,4],[60,2,5,6]]", "json", []),
        ('{"prediction": [[60,1,3,4],[60,2,5,6],],}', "repaired", ["trailing_commas"]),
        ("{'prediction': [[60,1,'3',4],[60,2,5,6]], 'reason': 'home'}", "repaired", ["single_quotes"]),
        ('{"prediction":[[60,1,3,4],[60,2,5,6],[60,3,7', "repaired", ["truncated"]),
        ('{"prediction":[[60,1,3,4],[60,2,5,6]],"reason":"she usually st', "repaired", ["truncated"]),
        ('```json\n{"prediction":[[60,1,3,4],\n[60,2,5,6],\n[60,', "repaired", ["truncated"]),
        ('{"reason":"x"} {"prediction":[[60,1,3,4],[60,2,5,6],[6', "repaired", ["truncated"]),
        ("{'prediction': [[60,1,3,4],[60,2,5,6],\n[60,3", "repaired", ["single_quotes", "truncated"]),
        ("prediction: [60,1,3,4] then [60, 2, '5', 6] and so on", "regex", []),
    ],
)
def test_parse_prediction_recovers_rows(text, method, repairs):
    rows, info = parse_prediction(text)
    assert rows.dtype == np.int64 and rows.shape == (2, 4)
    assert rows.tolist() == TWO
    assert info == {"method": method, "rows": 2, "invalid": 0, "unparsable": False, "repairs": repairs}


@pytest.mark.parametrize("text", ["", "   \n", "I cannot predict that.", 'lorem {"a": [1, 2]} ]] {{ [[', "{'x': 1}"])
def test_parse_prediction_garbage_is_unparsable(text):
    rows, info = parse_prediction(text)
    assert rows.shape == (0, 4) and rows.dtype == np.int64
    assert info["method"] == "none" and info["unparsable"] is True and info["rows"] == 0


def test_parse_prediction_counts_invalid_quadruples():
    text = ('{"prediction":[[60,1,3,4],[60,48,5,6],[60,1.5,2,3],[60,-1,2,3],[1,2,3],["a",1,2,3],true,'
            '[60,2.0,5,6],[60,3,99999999999,1],[60,4,999,999]]}')
    rows, info = parse_prediction(text)
    # out-of-grid cells (999) are kept here: fill_predictions judges cells against the grid
    assert rows.tolist() == [[60, 1, 3, 4], [60, 2, 5, 6], [60, 4, 999, 999]]
    assert info["method"] == "json" and info["invalid"] == 7 and info["rows"] == 3
    rows, info = parse_prediction('{"prediction":[[60,40,3,4]]}', num_slots=24)
    assert rows.shape == (0, 4) and info["invalid"] == 1 and not info["unparsable"]
    # an empty prediction list is a parsed (not unparsable) answer
    rows, info = parse_prediction('{"prediction": []}')
    assert rows.shape == (0, 4) and info["method"] == "json" and not info["unparsable"]
    with pytest.raises(ValueError, match="text must be"):
        parse_prediction(None)


def test_parse_asked_slots_reads_the_last_user_message():
    messages = [{"role": "system", "content": "example:\n0 0 999 999"},
                {"role": "user", "content": "old question\n5 5 999 999"},
                {"role": "assistant", "content": "{}"},
                {"role": "user", "content": "1 2 30 40\n8 10 999 999\n8, 11, 999, 999\n  [9 3 999 999]\n9 4 12 999"}]
    assert parse_asked_slots(messages).tolist() == [[8, 10], [8, 11], [9, 3]]
    assert parse_asked_slots("7 1 2 3\n7 2 999 999").tolist() == [[7, 2]]
    assert parse_asked_slots("nothing asked").shape == (0, 2)
    with pytest.raises(ValueError, match="no user message"):
        parse_asked_slots([{"role": "system", "content": "0 0 999 999"}])


# ----------------------------------------------------------------------------------------------------------------------
# fill_predictions


def test_fill_predictions_answers_each_asked_slot_once_and_counts_every_repair():
    asked = np.array([[8, 10], [8, 12], [8, 14], [9, 10], [9, 30]])
    predicted = np.array([
        [8, 12, 5, 6],  # answers (8, 12)
        [8, 12, 7, 7],  # duplicate
        [7, 1, 1, 1],  # not asked
        [8, 14, 0, 5],  # out of grid
        [8, 14, 201, 5],  # out of grid
        [8, 14, 9, 9],  # answers (8, 14): the first in-grid row of the slot
        [9, 30, 999, 999],  # out of grid -> (9, 30) is filled
        [9, 10, 200, 1],  # answers (9, 10), on the grid's edge
        [7, 1, 300, 300],  # not asked (checked before the grid)
    ])
    fallback = np.array([[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]])
    rows, counts = fill_predictions(asked, predicted, fallback, grid_size=200)
    assert rows.dtype == np.int64
    assert rows.tolist() == [[8, 10, 1, 1], [8, 12, 5, 6], [8, 14, 9, 9], [9, 10, 200, 1], [9, 30, 5, 5]]
    assert counts == {"asked": 5, "predicted": 9, "answered": 3, "filled": 2, "not_asked": 2, "duplicate": 1,
                      "out_of_grid": 3}
    assert counts["answered"] + counts["duplicate"] + counts["not_asked"] + counts["out_of_grid"] == len(predicted)

    # the asked order is kept whatever the prediction order; a smaller grid turns cells out of grid
    rows, counts = fill_predictions(asked[::-1], predicted, fallback[::-1], grid_size=8)
    assert rows[:, :2].tolist() == asked[::-1].tolist()
    assert rows.tolist()[3] == [8, 12, 5, 6] and rows[[0, 1, 2, 4], 2:].tolist() == [[5, 5], [4, 4], [3, 3], [1, 1]]
    assert counts == {"asked": 5, "predicted": 9, "answered": 1, "filled": 4, "not_asked": 2, "duplicate": 1,
                      "out_of_grid": 5}

    rows, counts = fill_predictions(asked, np.zeros((0, 4)), fallback)
    assert rows[:, 2:].tolist() == fallback.tolist() and counts["filled"] == 5 and counts["predicted"] == 0

    # a 0-based grid (cells 0..199): cell 0 is on it, cell 200 is not
    rows, counts = fill_predictions(asked[:1], np.array([[8, 10, 0, 199]]), fallback[:1], coordinate_base=0)
    assert rows.tolist() == [[8, 10, 0, 199]] and counts["out_of_grid"] == 0
    rows, counts = fill_predictions(asked[:1], np.array([[8, 10, 200, 5]]), fallback[:1], coordinate_base=0)
    assert rows.tolist() == [[8, 10, 1, 1]] and counts["out_of_grid"] == 1


def test_fill_predictions_rejects_bad_input():
    asked = np.array([[8, 10], [8, 11]])
    with pytest.raises(ValueError, match=r"\(d=8, t=10\) is asked more than once"):
        fill_predictions(np.array([[8, 10], [8, 10]]), np.zeros((0, 4)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="one fallback cell per asked slot"):
        fill_predictions(asked, np.zeros((0, 4)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"predicted must be an array of shape \(n, 4\)"):
        fill_predictions(asked, np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="grid_size"):
        fill_predictions(asked, np.zeros((0, 4)), np.ones((2, 2)), grid_size=0)
    with pytest.raises(ValueError, match="coordinate_base"):
        fill_predictions(asked, np.zeros((0, 4)), np.ones((2, 2)), coordinate_base=-1)


# ----------------------------------------------------------------------------------------------------------------------
# generation


def test_answer_token_budget_fits_a_real_answer(grid_dir, tokenizer):
    row = _samples(grid_dir, "test")[0]
    n = len(row["target_d"])
    needed = len(tokenizer(_answer(row), add_special_tokens=False)["input_ids"]) + 1  # + eos
    budget = answer_token_budget(tokenizer, n)
    assert needed <= budget <= 3 * needed
    assert answer_token_budget(tokenizer, 2 * n) > budget > answer_token_budget(tokenizer, 0)
    with pytest.raises(ValueError, match="num_asked"):
        answer_token_budget(tokenizer, -1)


def test_batched_and_unbatched_greedy_answers_agree(grid_dir, tokenizer, model):
    rows = _samples(grid_dir, "train")[:5]
    prompts = [_prompt(row, max_input_rows=k) for row, k in zip(rows, (3, 12, 6, 20, 1))]  # different lengths
    side = tokenizer.padding_side
    single = generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=12, progress=False)
    batched = generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=12, progress=False)
    assert batched == single
    assert len(set(single)) > 1  # distinct answers, so a mixed-up order would show
    assert tokenizer.padding_side == side and not model.training
    # each prompt keeps its own budget inside a batch
    budgets = [2, 12, 5, 12, 7]
    per_prompt = generate_answers(model, tokenizer, prompts, batch_size=5, max_new_tokens=budgets, progress=False)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=b, progress=False)[0]
             for p, b in zip(prompts, budgets)]
    assert per_prompt == alone
    with pytest.raises(ValueError, match="one per prompt"):
        generate_answers(model, tokenizer, prompts, max_new_tokens=[3, 4], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, tokenizer, prompts, batch_size=0, progress=False)


def _eos_only_model(tokenizer):
    """A tiny Llama whose every next token is eos (a head with a bias on the eos logit)."""
    model = _tiny_llama(tokenizer, seed=1)
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.0
    model.lm_head = head
    return model


def test_generation_stops_at_eos(tokenizer, prompts):
    model = _eos_only_model(tokenizer)
    answers, stats = humob._generate(model, tokenizer, list(prompts["test"].values()), batch_size=2,
                                     max_new_tokens=50, progress=False)
    assert answers == ["", "", ""]
    assert stats["tokens"] == 3 and stats["stopped_at_limit"] == 0


def test_constrained_answers_hold_exactly_the_asked_slots(grid_dir, tokenizer, model, prompts):
    from train.humob_grammar import AnswerGrammar

    rows = _samples(grid_dir, "train")[:4]
    user_prompts = [_prompt(row, max_input_rows=k) for row, k in zip(rows, (3, 12, 6, 20))]
    asked = [parse_asked_slots(p) for p in user_prompts]
    asked[1] = asked[1][:3]  # rows of one batch with different answer lengths
    budgets = [answer_token_budget(tokenizer, len(a)) for a in asked]
    answers, stats = humob._generate(model, tokenizer, user_prompts, batch_size=4, max_new_tokens=budgets,
                                     progress=False, asked=asked, cell_range=(1, 200))
    for answer, a in zip(answers, asked):
        parsed = json.loads(answer)["prediction"]  # strict JSON, no repair needed
        assert [r[:2] for r in parsed] == a.tolist()
        cells = np.array([r[2:] for r in parsed])
        assert cells.min() >= 1 and cells.max() <= 200
        assert answer == AnswerGrammar(a, 1, 200).text_of(cells)
    assert stats["stopped_at_limit"] == 0
    assert stats["overrides"].shape == (4,) and (stats["overrides"] > 0).all()  # a random model leaves the format
    # the model still chooses the cells: batched and unbatched agree, and the public function gives the same
    alone = humob._generate(model, tokenizer, user_prompts, batch_size=1, max_new_tokens=budgets, progress=False,
                            asked=asked, cell_range=(1, 200))[0]
    assert alone == answers
    assert generate_answers(model, tokenizer, user_prompts, max_new_tokens=budgets, asked=asked,
                            progress=False) == answers
    with pytest.raises(ValueError, match="asked has 2 entries for 4 prompts"):
        humob._generate(model, tokenizer, user_prompts, batch_size=2, max_new_tokens=50, progress=False,
                        asked=asked[:2], cell_range=(1, 200))


def test_static_batches_for_attention_without_a_custom_mask(grid_dir, tokenizer, model, monkeypatch):
    """Continuous batching needs an attention that takes a 4D mask (SDPA, eager); other attention implementations
    decode in static batches, with the same answers and grammar overrides."""
    import train.greedy_decode

    rows = _samples(grid_dir, "train")[:5]
    user_prompts = [_prompt(row, max_input_rows=k) for row, k in zip(rows, (3, 12, 6, 20, 1))]
    asked = [parse_asked_slots(p) for p in user_prompts]
    budgets = [answer_token_budget(tokenizer, len(a)) for a in asked]
    calls = {"continuous": 0, "static": 0}
    for name in calls:
        original = getattr(train.greedy_decode, f"{'continuous_' if name == 'continuous' else ''}greedy_decode")

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(train.greedy_decode, original.__name__, counted)
    continuous = humob._generate(model, tokenizer, user_prompts, batch_size=2, max_new_tokens=budgets,
                                 progress=False, asked=asked, cell_range=(1, 200))
    assert calls == {"continuous": 1, "static": 0}
    monkeypatch.setattr(train.greedy_decode, "CONTINUOUS_ATTENTION", ())
    static = humob._generate(model, tokenizer, user_prompts, batch_size=2, max_new_tokens=budgets,
                             progress=False, asked=asked, cell_range=(1, 200))
    assert calls == {"continuous": 1, "static": 3}  # 5 prompts in batches of 2
    assert static[0] == continuous[0] and len(set(static[0])) > 1
    assert np.array_equal(static[1]["overrides"], continuous[1]["overrides"])
    assert static[1]["tokens"] == continuous[1]["tokens"]


def test_constrained_decoding_follows_the_model_where_it_can(grid_dir, tokenizer, prompts):
    """A model that always wants eos: the grammar replaces eos until the answer is complete, then lets it through."""
    model = _eos_only_model(tokenizer)
    user_prompts = list(prompts["test"].values())
    asked = [parse_asked_slots(p) for p in user_prompts]
    answers, stats = humob._generate(model, tokenizer, user_prompts, batch_size=2, max_new_tokens=400,
                                     progress=False, asked=asked, cell_range=(1, 200))
    for answer, a in zip(answers, asked):
        assert [r[:2] for r in json.loads(answer)["prediction"]] == a.tolist()
    # every token but the final eos was an override; the final eos was the model's own choice
    assert stats["tokens"] == sum(stats["overrides"]) + len(answers)
    assert stats["stopped_at_limit"] == 0


def test_constrained_decoding_with_a_tiny_budget_is_cut_and_filled(grid_dir, tokenizer, model, prompts):
    frame, report = predict_grid(model, tokenizer, grid_dir, "test", prompts["test"], max_new_tokens=12,
                                 progress=False)
    assert report["decoding"] == "constrained" and report["stopped_at_limit"] == report["users"]
    assert report["answered"] + report["filled"] == report["asked_slots"] and report["filled"] > 0
    assert report["not_asked"] == report["duplicate"] == report["out_of_grid"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# predict_grid and evaluate_grid_predictions


def _write_instructions(path, prompts, answer="{}", metadata=None):
    import pyarrow as pa

    from dataset_builders.publish import write_dataset

    splits = {}
    for split, by_uid in prompts.items():
        completion = [{"role": "assistant", "content": answer}] if answer is not None else []
        splits[split] = pa.Table.from_pylist([{"uid": int(u), "prompt": p, "completion": completion}
                                              for u, p in by_uid.items()])
    return write_dataset(path, {"humob-qa": splits}, pretty_name="test humob-qa", metadata=metadata)


def test_predict_grid_writes_answers_in_the_style_of_the_instructions(grid_dir, tokenizer, model, prompts, tmp_path,
                                                                      monkeypatch):
    seen = []
    generate = humob._generate

    def spy(*args, **kwargs):
        answers, stats = generate(*args, **kwargs)
        seen.append(answers)
        return answers, stats

    monkeypatch.setattr(humob, "_generate", spy)
    test = {"test": prompts["test"]}
    # the style of the set's answers
    spaced = _write_instructions(tmp_path / "spaced", test, answer='{"prediction": [[8, 1, 2, 3]]}')
    _, report = predict_grid(model, tokenizer, grid_dir, "test", instructions_dir=spaced, progress=False)
    assert report["answer_style"] == "spaced" and report["answered"] == report["asked_slots"]
    assert all(a.startswith('{"prediction": [[') and ", " in a and "," not in a.replace(", ", "") for a in seen[-1])
    # no answers (a hidden split): the style the builder recorded
    recorded = _write_instructions(tmp_path / "recorded", test, answer=None,
                                   metadata={"config": {"answer_style": "spaced"}})
    _, report = predict_grid(model, tokenizer, grid_dir, "test", instructions_dir=recorded, progress=False)
    assert report["answer_style"] == "spaced"
    # the caller's style wins; plain prompts and sets that say nothing are compact
    _, report = predict_grid(model, tokenizer, grid_dir, "test", instructions_dir=spaced, answer_style="compact",
                             progress=False)
    assert report["answer_style"] == "compact" and all(" " not in a for a in seen[-1])
    unknown = _write_instructions(tmp_path / "unknown", test, answer=None)
    assert predict_grid(model, tokenizer, grid_dir, "test", instructions_dir=unknown,
                        progress=False)[1]["answer_style"] == "compact"
    assert predict_grid(model, tokenizer, grid_dir, "test", prompts["test"],
                        progress=False)[1]["answer_style"] == "compact"
    # free decoding budgets the longer spaced answer
    spaced_budget = answer_token_budget(tokenizer, 20, answer_style="spaced")
    assert spaced_budget > answer_token_budget(tokenizer, 20)
    with pytest.raises(ValueError, match="answer_style must be one of"):
        predict_grid(model, tokenizer, grid_dir, "test", prompts["test"], answer_style="pretty", progress=False)


def test_predict_grid_with_a_random_model_answers_every_asked_slot(grid_dir, tokenizer, model, prompts, tmp_path):
    instructions = _write_instructions(tmp_path / "qa", prompts)
    out_csv = tmp_path / "pred" / "test.csv"
    frame, report = predict_grid(model, tokenizer, grid_dir, "test", instructions_dir=instructions, batch_size=2,
                                 constrained=False, progress=False, out_csv=out_csv)
    reference = grid_targets(humob._load_grid(grid_dir), "test")
    assert list(frame.columns) == ["uid", "d", "t", "x", "y"] and (frame.dtypes == np.int64).all()
    # exactly one row per asked slot, in the split's user order and the asked order
    assert frame[["uid", "d", "t"]].to_numpy().tolist() == reference[["uid", "d", "t"]].to_numpy().tolist()
    assert frame[["x", "y"]].to_numpy().min() >= 1 and frame[["x", "y"]].to_numpy().max() <= 200
    assert report["users"] == 3 and report["asked_slots"] == len(frame) == len(reference)
    assert report["answered"] + report["filled"] == report["asked_slots"]
    assert (report["answered"] + report["duplicate"] + report["not_asked"] + report["out_of_grid"]
            == report["predicted_rows"])
    assert sum(report["parse_methods"].values()) == report["users"]
    assert report["parse_methods"]["none"] == report["unparsable"]
    assert report["filled"] >= report["asked_slots"] // 2  # a random model: mostly the slot-mode fallback
    assert report["tokens_generated"] > 0 and report["generation_seconds"] > 0 and report["tokens_per_second"] > 0
    assert report["asked_differs_from_targets"] == 0 and report["unused_prompts"] == 0
    assert pd.read_csv(out_csv).equals(frame)
    # the dict-of-prompts path gives the same greedy answers
    same, _ = predict_grid(model, tokenizer, grid_dir, "test", prompts["test"], batch_size=1, constrained=False,
                           progress=False)
    assert same.equals(frame)
    assert report["decoding"] == "free" and report["grammar_overrides"] is None


def test_predict_grid_constrained_answers_every_slot_from_the_model(grid_dir, tokenizer, model, prompts):
    frame, report = predict_grid(model, tokenizer, grid_dir, "test", prompts["test"], batch_size=2, progress=False)
    reference = grid_targets(humob._load_grid(grid_dir), "test")
    assert frame[["uid", "d", "t"]].to_numpy().tolist() == reference[["uid", "d", "t"]].to_numpy().tolist()
    assert report["decoding"] == "constrained" and report["grammar_overrides"] > 0
    assert report["answered"] == report["asked_slots"] == len(frame) and report["filled"] == 0
    assert report["parse_methods"]["json"] == report["users"] and report["unparsable"] == 0
    assert report["not_asked"] == report["duplicate"] == report["out_of_grid"] == report["invalid"] == 0
    assert report["stopped_at_limit"] == 0


def test_predict_grid_history_cells_answers_only_with_the_prompt_cells(grid_dir, tokenizer, model, prompts):
    from train.humob import history_cells

    test = prompts["test"]
    short = {u: _prompt(row, max_input_rows=5) for u, row in zip(test, _samples(grid_dir, "test"))}
    empty = next(iter(short))
    system, user = _prompt(_samples(grid_dir, "test")[0])
    asked_only = [line for line in user["content"].split("\n") if not line[0].isdigit() or line.endswith("999 999")]
    short[empty] = [system, {"role": "user", "content": "\n".join(asked_only)}]  # no records: keeps the grid
    frame, report = predict_grid(model, tokenizer, grid_dir, "test", short, batch_size=2, cells="history",
                                 progress=False)
    assert report["cells"] == "history" and report["prompts_without_records"] == 1
    assert report["answered"] == report["asked_slots"] == len(frame) and report["filled"] == 0
    for uid, rows in frame.groupby("uid"):
        allowed = history_cells(short[uid], (1, 200))
        if uid == empty:
            assert len(allowed) == 0
            continue
        assert 1 <= len(allowed) <= 5
        assert set(map(tuple, rows[["x", "y"]].to_numpy().tolist())) <= set(map(tuple, allowed.tolist()))
    # the grid default answers with other cells (the random model rarely picks a record's cell by itself)
    free, grid_report = predict_grid(model, tokenizer, grid_dir, "test", short, batch_size=2, progress=False)
    assert grid_report["cells"] == "grid" and grid_report["prompts_without_records"] is None
    assert not free[["x", "y"]].equals(frame[["x", "y"]])
    # history_cells reads the records of the last user message: distinct, sorted, on the grid
    prompt = [{"role": "user", "content": "1 2 3 4"},
              {"role": "user", "content": "Days 5-6 observed\n5 1 9 9\n5 2 3 4\n6 1 9 9\n6 2 300 4\n7 1 999 999"}]
    assert history_cells(prompt, (1, 200)).tolist() == [[3, 4], [9, 9]]
    with pytest.raises(ValueError, match="cells must be one of"):
        predict_grid(model, tokenizer, grid_dir, "test", short, cells="seen", progress=False)
    with pytest.raises(ValueError, match="free decoding writes any text"):
        predict_grid(model, tokenizer, grid_dir, "test", short, cells="history", constrained=False, progress=False)
    with pytest.raises(ValueError, match="pass asked"):
        humob._generate(model, tokenizer, list(short.values()), batch_size=2, max_new_tokens=5, progress=False,
                        cells=[None] * len(short))


def test_valid_ids_cache_keeps_cells_and_the_slot_x_apart(tokenizer):
    from train.humob_grammar import AnswerGrammar, TokenTexts

    texts = TokenTexts(tokenizer)
    asked = [[8, 10], [8, 11]]

    def valid(g, state):
        ids = texts.valid_ids(g, state).tolist()
        assert ids == [i for i in texts.alphabet().tolist() if g.advance(state, texts.text(i)) is not None] and ids
        return ids

    head = '{"prediction":[[8,10,'
    a = AnswerGrammar(asked, 1, 200, cells=[[12, 34], [56, 78]])
    b = AnswerGrammar(asked, 1, 200, cells=[[90, 11]])
    assert valid(a, a.advance(a.start, head)) != valid(b, b.advance(b.start, head))  # other cells, other tokens
    assert valid(a, a.advance(a.start, head + "12,")) != valid(a, a.advance(a.start, head + "56,"))  # Y after its X
    # on the whole grid the Y field allows the same tokens after any X: one cache entry serves both
    g = AnswerGrammar(asked, 1, 200)
    first = valid(g, g.advance(g.start, head + "12,"))
    size = len(texts._valid)
    assert valid(g, g.advance(g.start, head + "56,")) == first and len(texts._valid) == size


def test_predict_grid_fills_from_slot_mode_when_the_model_says_nothing(grid_dir, tokenizer, prompts):
    from dataset_builders.publish import load_prepared
    from train.baselines import slot_mode_predictions

    frame, report = predict_grid(_eos_only_model(tokenizer), tokenizer, grid_dir, "test", prompts["test"],
                                 constrained=False, progress=False)
    slot_mode = slot_mode_predictions(load_prepared(grid_dir).table("samples", "test"), day0_weekday=0)
    assert frame.to_numpy().tolist() == slot_mode.astype(np.int64).to_numpy().tolist()
    assert report["unparsable"] == report["users"] == 3 == report["parse_methods"]["none"]
    assert report["filled"] == report["asked_slots"] and report["answered"] == 0
    assert report["tokens_generated"] == 3 and report["stopped_at_limit"] == 0
    assert len(report["unparsable_examples"]) == 3


def test_predict_grid_users_without_prompt_can_fall_back(grid_dir, tokenizer, prompts):
    from dataset_builders.publish import load_prepared
    from train.baselines import slot_mode_predictions

    partial = dict(prompts["test"])
    dropped = list(partial)[1]
    del partial[dropped]
    partial[12345] = prompts["train"][next(iter(prompts["train"]))]  # a prompt of no user of the split: unused
    frame, report = predict_grid(_eos_only_model(tokenizer), tokenizer, grid_dir, "test", partial,
                                 on_missing_prompt="fallback", constrained=False, progress=False)
    slot_mode = slot_mode_predictions(load_prepared(grid_dir).table("samples", "test"), day0_weekday=0)
    assert frame.to_numpy().tolist() == slot_mode.astype(np.int64).to_numpy().tolist()
    assert report["users"] == 3 and report["users_without_prompt"] == 1 and report["unused_prompts"] == 1
    assert report["filled"] == report["asked_slots"] == len(frame)
    assert report["unparsable"] == 2 and sum(report["parse_methods"].values()) == 2 and report["tokens_generated"] == 2


def test_predict_grid_parses_repairs_and_fills_model_answers(grid_dir, tokenizer, model, prompts, monkeypatch):
    from dataset_builders.publish import load_prepared
    from train.baselines import slot_mode_predictions

    rows = {row["uid"]: row for row in _samples(grid_dir, "test")}
    uids = list(rows)

    def fake_generate(model, tokenizer, user_prompts, **kwargs):
        assert [parse_asked_slots(p).tolist() for p in user_prompts] == [
            [[d, t] for d, t in zip(rows[u]["target_d"], rows[u]["target_t"])] for u in uids]
        answers = []
        for uid in uids:
            answer = json.loads(_answer(rows[uid]))["prediction"]
            if uid == uids[0]:  # a duplicate, a slot not asked and an off-grid duplicate, in a code fence
                answer = answer + [answer[0][:2] + [1, 1], [0, 0, 5, 5], answer[1][:2] + [0, 999]]
                answers.append("```json\n" + json.dumps({"prediction": answer}) + "\n```")
            elif uid == uids[1]:  # cut off inside the last row: that slot gets the fallback
                answers.append(json.dumps({"prediction": answer})[:-6])
            else:
                answers.append(json.dumps({"prediction": answer}))
        return answers, {"seconds": 0.5, "tokens": 100, "stopped_at_limit": 1, "prompt_tokens": 1000}

    monkeypatch.setattr(humob, "_generate", fake_generate)
    frame, report = predict_grid(model, tokenizer, grid_dir, "test", prompts["test"], constrained=False,
                                 progress=False)
    reference = grid_targets(humob._load_grid(grid_dir), "test").astype(np.int64)
    slot_mode = slot_mode_predictions(load_prepared(grid_dir).table("samples", "test"), day0_weekday=0)
    lost = int(np.flatnonzero(reference["uid"].to_numpy() == uids[1])[-1])
    expected = reference.copy()
    expected.loc[lost, ["x", "y"]] = slot_mode.loc[lost, ["x", "y"]].astype(np.int64).to_numpy()
    assert frame.equals(expected)
    n = sum(len(r["target_d"]) for r in rows.values())
    assert report["asked_slots"] == n == len(frame)
    assert report["parse_methods"] == {"json": 2, "repaired": 1, "regex": 0, "none": 0}
    assert report["filled"] == 1 and report["answered"] == n - 1 and report["unparsable"] == 0
    assert report["duplicate"] == 1 and report["not_asked"] == 1 and report["out_of_grid"] == 1
    assert report["predicted_rows"] == n + 3 - 1
    assert report["tokens_per_second"] == 200.0 and report["users_per_second"] == 6.0
    assert report["stopped_at_limit"] == 1


def test_evaluate_grid_predictions_of_the_reference(grid_dir, tmp_path):
    reference = grid_targets(humob._load_grid(grid_dir), "test")
    report = evaluate_grid_predictions(reference.sample(frac=1.0, random_state=0), grid_dir, "test", name="oracle")
    assert report["kind"] == "grid" and report["split"] == "test" and report["data"] == str(grid_dir)
    assert list(report["results"]) == ["oracle", "slot-mode"]
    oracle = report["results"]["oracle"]
    assert oracle["geobleu@5"] == pytest.approx(1.0) and oracle["geobleu@3"] == pytest.approx(1.0)
    assert oracle["dtw"] == pytest.approx(0.0)
    assert oracle["num_users"] == 3 and oracle["num_points"] == len(reference)
    assert report["results"]["slot-mode"]["geobleu@5"] < 1.0
    table = format_results_table(report)
    assert "| oracle | 1.0000 | 1.0000 | 0.00 | 3 |" in table and "| slot-mode |" in table

    # from a CSV, with a user outside the split: dropped and counted
    extra = pd.DataFrame({"uid": [999, 999], "d": [8, 8], "t": [1, 2], "x": [1, 1], "y": [2, 2]})
    path = tmp_path / "pred.csv"
    pd.concat([reference, extra]).to_csv(path, index=False)
    report = evaluate_grid_predictions(path, grid_dir, "test")
    assert report["results"]["model"]["geobleu@5"] == pytest.approx(1.0)
    assert report["predictions"] == {"rows": len(reference) + 2, "extra_users_dropped": 1, "extra_rows_dropped": 2}


def test_evaluate_grid_predictions_adds_slot_mode_on_the_model_window(grid_dir):
    from train.baselines import slot_mode_predictions
    from train.evaluate import grid_metrics

    data = humob._load_grid(grid_dir)
    reference = grid_targets(data, "test")
    samples = data.table("samples", "test")
    days = np.concatenate(samples.column("input_d").to_pylist())
    last = int(days.max())
    report = evaluate_grid_predictions(reference, grid_dir, "test", name="oracle", input_days=(last - 2, last))
    window = f"slot-mode (days {last - 2}-{last})"
    assert list(report["results"]) == ["oracle", "slot-mode", window]
    want = grid_metrics(slot_mode_predictions(samples, input_days=(last - 2, last)), reference, samples.num_rows)
    assert report["results"][window] == want
    assert report["results"][window] != report["results"]["slot-mode"]
    assert f"| {window} |" in format_results_table(report)
    # a window holding every input day adds nothing
    whole = evaluate_grid_predictions(reference, grid_dir, "test", input_days=(int(days.min()), last))
    assert list(whole["results"]) == ["model", "slot-mode"]


def test_evaluate_grid_predictions_errors(grid_dir):
    reference = grid_targets(humob._load_grid(grid_dir), "test")
    uids = sorted(reference["uid"].unique())
    with pytest.raises(ValueError, match=rf"miss 1 of the 3 users of split 'test' \(uids {uids[1]}\)"):
        evaluate_grid_predictions(reference[reference["uid"] != uids[1]], grid_dir, "test")
    first = reference.iloc[0]
    with pytest.raises(ValueError, match=rf"miss 1 of its {len(reference)} target slots and hold 0 slots that are not "
                       rf"targets \(first: uid={first.uid}, d={first.d}, t={first.t}\)"):
        evaluate_grid_predictions(reference.iloc[1:], grid_dir, "test")
    shifted = reference.assign(d=reference["d"] + (reference.index == 0))
    with pytest.raises(ValueError, match="miss 1 of its .* and hold 1 slots that are not targets"):
        evaluate_grid_predictions(shifted, grid_dir, "test")
    with pytest.raises(ValueError, match="duplicate steps"):
        evaluate_grid_predictions(pd.concat([reference, reference.iloc[:1]]), grid_dir, "test")
    with pytest.raises(ValueError, match="hidden split has no reference"):
        evaluate_grid_predictions(reference, grid_dir, "hidden")
    with pytest.raises(ValueError, match="no split 'dev'"):
        evaluate_grid_predictions(reference, grid_dir, "dev")
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['x'\]"):
        evaluate_grid_predictions(reference.drop(columns="x"), grid_dir, "test")


def test_predict_grid_errors(grid_dir, tokenizer, model, prompts):
    partial = dict(prompts["test"])
    dropped = next(iter(partial))
    del partial[dropped]
    with pytest.raises(ValueError, match=rf"1 of the 3 users of split 'test' have no prompt \(uids {dropped}\)"):
        predict_grid(model, tokenizer, grid_dir, "test", partial, progress=False)
    with pytest.raises(ValueError, match="on_missing_prompt"):
        predict_grid(model, tokenizer, grid_dir, "test", partial, on_missing_prompt="skip", progress=False)
    with pytest.raises(ValueError, match="pass `prompts`"):
        predict_grid(model, tokenizer, grid_dir, "test", progress=False)
    no_slot = {u: [{"role": "user", "content": "1 2 3 4"}] for u in prompts["test"]}
    with pytest.raises(ValueError, match="asks no slot"):
        predict_grid(model, tokenizer, grid_dir, "test", no_slot, progress=False)
