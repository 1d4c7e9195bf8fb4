"""Llama-3-8B-Mob Q&A rows (humob-qa): prompt/answer round trip, day ranges, token budget, user ranges, windows,
publishing and configuration errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset

from dataset_builders.instructions.humob_qa import (
    HIDDEN_MARK,
    HUMOB_QA_CONFIG,
    SYSTEM_PROMPT,
    HumobQAConfig,
    answer_json,
    build_humob_qa,
    format_records,
    parse_records,
    system_prompt,
    user_message,
)
from dataset_builders.preprocess import GridPreprocessConfig, prepare_grid
from dataset_builders.publish import load_prepared, write_prepared
from dataset_builders.readers import LoadedGrid
from dataset_builders.schema import HIDDEN_CELL, RowAccount
from tokenization_mobility import build_bpe_tokenizer

NUM_USERS, NUM_DAYS, HIDDEN_USER = 10, 20, 9
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _slots(u: int, d: int) -> list[int]:
    """Rows per day vary with the day (so days differ in length) and, on target days, with the user."""
    slots = [8, 12, 18] + ([20 + d % 3] if d % 2 == 0 else []) + ([2, 40, 41] if (u + d) % 4 == 0 else [])
    if d >= 15:
        slots += list(range(30, 30 + u))
    if u == 3 and d == 4:  # user 3 is not seen on day 5 at all (below) and has one extra early record
        slots += [1]
    return sorted(set(slots))


def _records() -> pd.DataFrame:
    rows = []
    for u in range(NUM_USERS):
        for d in range(NUM_DAYS):
            if u == 3 and d == 5:
                continue
            for t in _slots(u, d):
                x, y = 10 + u + t % 5, 20 + d % 7
                if u == HIDDEN_USER and d >= 15:
                    x = y = HIDDEN_CELL
                rows.append((u, d, t, x, y))
    return pd.DataFrame(rows, columns=["uid", "d", "t", "x", "y"]).astype(
        {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"})


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return _records()


@pytest.fixture(scope="module")
def grid(records):
    """Prepared in memory: days 0-14 input, 15-19 target; 7 train, 1 validation, 1 test users and 1 hidden user."""
    loaded = LoadedGrid(records.copy(), RowAccount(), {"format": "yjmob", "grid_size": 50, "coordinate_base": 1,
                                                       "slots_per_day": 48})
    return prepare_grid(loaded, GridPreprocessConfig(predict_days=(15, 19)))


@pytest.fixture(scope="module")
def built(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("humob_qa") / "qa"
    summary = build_humob_qa(grid, out, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def tokenizer(built):
    out, _ = built
    ds = load_dataset(str(out), HUMOB_QA_CONFIG)
    texts = [m["content"] for split in ds for row in ds[split]["messages"] for m in row]
    tok = build_bpe_tokenizer(texts, vocab_size=320, special_tokens=("<pad>", "<s>", "<|im_end|>", "<unk>",
                                                                      "<|im_start|>"))
    tok.chat_template = CHATML
    return tok


def _user_records(records: pd.DataFrame, uid: int, lo: int, hi: int) -> np.ndarray:
    sel = records[(records.uid == uid) & (records.d >= lo) & (records.d <= hi)]
    return sel[["d", "t", "x", "y"]].to_numpy(np.int64)


def _content(row: dict, role: str) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == role)


def _prompt_tokens(tokenizer, row: dict) -> int:
    text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _rows(out, split: str) -> list[dict]:
    return load_dataset(str(out), HUMOB_QA_CONFIG)[split].to_list()


# ----------------------------------------------------------------------------------------------------------------------
# format helpers


def test_format_parse_answer_round_trip():
    rng = np.random.default_rng(0)
    recs = np.stack([np.sort(rng.integers(0, 75, 30)), rng.integers(0, 48, 30), rng.integers(1, 201, 30),
                     rng.integers(1, 201, 30)], axis=1)
    asked = np.array([[60, 0], [60, 17], [74, 47]])
    text = user_message(recs, asked, (0, 59), (60, 74))
    lines = text.split("\n")
    assert lines[0] == "Days 0-59 observed; predict days 60-74."
    assert lines[1] == " ".join(map(str, recs[0])) and lines[-1] == f"74 47 {HIDDEN_MARK}"
    assert all(not part.startswith("0") or part == "0" for line in lines[1:] for part in line.split(" "))
    back, back_asked = parse_records(text)
    np.testing.assert_array_equal(back, recs)
    np.testing.assert_array_equal(back_asked, asked)
    assert format_records(*recs[:2].T) == "\n".join(" ".join(map(str, r)) for r in recs[:2])
    answer = answer_json(*recs[:3].T)
    assert " " not in answer and answer.startswith('{"prediction":[[')
    assert json.loads(answer)["prediction"] == recs[:3].tolist()
    spaced = answer_json(*recs[:3].T, style="spaced")
    assert spaced == json.dumps({"prediction": recs[:3].tolist()})  # json.dumps' default separators
    assert spaced.startswith('{"prediction": [[') and json.loads(spaced) == json.loads(answer)
    with pytest.raises(ValueError, match="answer_style must be one of"):
        answer_json(*recs[:3].T, style="pretty")
    assert user_message(np.zeros((0, 4)), [[3, 4]], (5, 4), (3, 3)) == f"No days observed; predict day 3.\n3 4 {HIDDEN_MARK}"
    with pytest.raises(ValueError, match="same length"):
        format_records([1, 2], [3], [4], [5])


def test_system_prompt_follows_the_grid():
    assert "200 x 200" in SYSTEM_PROMPT and "from 1 to 200" in SYSTEM_PROMPT and "Monday" in SYSTEM_PROMPT
    assert "t=0 is 00:00-00:30" in SYSTEM_PROMPT and "t=47 is 23:30-24:00" in SYSTEM_PROMPT
    small = system_prompt(grid_size=50, coordinate_base=0, slots_per_day=24, day0_weekday=2)
    assert "50 x 50" in small and "from 0 to 49" in small and "t=23 is 23:00-24:00" in small and "Wednesday" in small
    assert HIDDEN_MARK in SYSTEM_PROMPT and '{"prediction"' in SYSTEM_PROMPT


# ----------------------------------------------------------------------------------------------------------------------
# the default build


def test_rows_round_trip_to_the_prepared_samples(grid, built, records):
    out, summary = built
    ds = load_dataset(str(out), HUMOB_QA_CONFIG)
    assert set(ds) == {"train", "validation", "test", "hidden"}
    assert {s: ds[s].num_rows for s in ds} == {"train": 7, "validation": 1, "test": 1, "hidden": 1} == summary["rows"]
    assert ds["train"].column_names == ["uid", "window", "copy", "shift_x", "shift_y", "messages", "prompt",
                                        "completion", "num_input_rows", "num_asked", "input_days_dropped"]
    system = system_prompt(50, 1, 48, 0)
    for split in ("train", "validation", "test"):
        samples = grid.samples[split].to_pandas().set_index("uid")
        for row in ds[split]:
            sample = samples.loc[row["uid"]]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert row["prompt"] == row["messages"][:2] and row["completion"] == row["messages"][2:]
            assert row["messages"][0]["content"] == system
            user = _content(row, "user")
            recs, asked = parse_records(user)
            expected_in = np.stack([sample[f"input_{c}"] for c in "dtxy"], axis=1)
            expected_tg = np.stack([sample[f"target_{c}"] for c in "dtxy"], axis=1)
            np.testing.assert_array_equal(recs, expected_in)
            np.testing.assert_array_equal(asked, expected_tg[:, :2])
            assert json.loads(_content(row, "assistant"))["prediction"] == expected_tg.tolist()
            assert user == user_message(expected_in, expected_tg[:, :2], (0, 14), (15, 19))
            assert user.split("\n")[0] == "Days 0-14 observed; predict days 15-19."
            assert (row["num_input_rows"], row["num_asked"], row["input_days_dropped"], row["window"]) == (
                len(expected_in), len(expected_tg), 0, 0)
    # the user without day 5 shows no record of it
    row3 = next((r for s in ds for r in ds[s] if r["uid"] == 3), None)
    assert row3 is not None and 5 not in parse_records(_content(row3, "user"))[0][:, 0]


def test_hidden_split_has_no_assistant_message(built, records):
    out, _ = built
    (row,) = _rows(out, "hidden")
    assert row["uid"] == HIDDEN_USER
    assert [m["role"] for m in row["messages"]] == ["system", "user"] and row["completion"] == []
    recs, asked = parse_records(_content(row, "user"))
    hidden = records[(records.uid == HIDDEN_USER) & (records.d >= 15)]
    np.testing.assert_array_equal(asked, hidden[["d", "t"]].to_numpy())
    np.testing.assert_array_equal(recs, _user_records(records, HIDDEN_USER, 0, 14))
    assert row["num_asked"] == len(hidden)


def test_card_and_metadata(built):
    out, summary = built
    card = (out / "README.md").read_text()
    assert "config_name: humob-qa" in card and "## Example" in card and "## Row account" in card
    assert "| hidden | 1 |" in card and "Days 0-14 observed; predict days 15-19." in card
    meta = json.loads((out / "hf_mobility.json").read_text())
    assert meta["kind"] == "humob_qa" and meta["rows"] == summary["rows"] and meta["grid_size"] == 50


def test_spaced_answer_style_changes_only_the_answers_and_is_recorded(grid, built, tmp_path):
    out, _ = built
    summary = build_humob_qa(grid, tmp_path / "spaced", HumobQAConfig(answer_style="spaced"), progress=False)
    assert summary["rows"] == {"train": 7, "validation": 1, "test": 1, "hidden": 1}
    for split in ("train", "validation", "test", "hidden"):
        compact, spaced = _rows(out, split), _rows(tmp_path / "spaced", split)
        for a, b in zip(compact, spaced):
            assert a["prompt"] == b["prompt"]  # the prompts are the same
            if split == "hidden":
                assert b["completion"] == []
                continue
            cells = json.loads(_content(a, "assistant"))["prediction"]
            assert _content(b, "assistant") == answer_json(*np.asarray(cells).T, style="spaced")
    meta = json.loads((tmp_path / "spaced" / "hf_mobility.json").read_text())
    assert meta["config"]["answer_style"] == "spaced"
    assert json.loads((out / "hf_mobility.json").read_text())["config"]["answer_style"] == "compact"
    assert '`{"prediction": [[d, t, x, y], ...]}`' in (tmp_path / "spaced" / "README.md").read_text()
    assert '`{"prediction":[[d,t,x,y],...]}`' in (out / "README.md").read_text()


def test_builds_from_a_prepared_folder(grid, tmp_path):
    folder = write_prepared(grid, tmp_path / "grid")
    summary = build_humob_qa(folder, tmp_path / "qa", progress=False)
    assert summary["rows"] == {"train": 7, "validation": 1, "test": 1, "hidden": 1}
    summary2 = build_humob_qa(load_prepared(folder), tmp_path / "qa2", progress=False)
    assert summary2["rows"] == summary["rows"]
    assert _rows(tmp_path / "qa", "train") == _rows(tmp_path / "qa2", "train")


# ----------------------------------------------------------------------------------------------------------------------
# day ranges, user ranges, windows


def test_input_and_predict_day_ranges(grid, records, tmp_path):
    config = HumobQAConfig(input_days=(5, 12), predict_days="16-18")
    summary = build_humob_qa(grid, tmp_path / "qa", config, progress=False)
    assert summary["input_days"] == [5, 12] and summary["predict_days"] == [16, 18]
    for row in _rows(tmp_path / "qa", "train"):
        user = _content(row, "user")
        assert user.startswith("Days 5-12 observed; predict days 16-18.\n")
        recs, asked = parse_records(user)
        np.testing.assert_array_equal(recs, _user_records(records, row["uid"], 5, 12))
        target = _user_records(records, row["uid"], 16, 18)
        np.testing.assert_array_equal(asked, target[:, :2])
        assert json.loads(_content(row, "assistant"))["prediction"] == target.tolist()


def test_day_ranges_must_fit_the_data(grid, tmp_path):
    with pytest.raises(ValueError, match="outside the target days 15-19"):
        build_humob_qa(grid, tmp_path / "a", HumobQAConfig(predict_days=(14, 16)), progress=False)
    with pytest.raises(ValueError, match="must end before the first predicted day 15"):
        build_humob_qa(grid, tmp_path / "b", HumobQAConfig(input_days=(0, 16)), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_user_ranges_resplit_and_count_dropped_users(grid, tmp_path):
    config = HumobQAConfig(user_ranges="train=0-4, validation=100-200, test=6-7")
    assert config.user_ranges == {"train": (0, 4), "validation": (100, 200), "test": (6, 7)}
    summary = build_humob_qa(grid, tmp_path / "qa", config, progress=False)
    ds = load_dataset(str(tmp_path / "qa"), HUMOB_QA_CONFIG)
    assert set(ds) == {"train", "test", "hidden"}  # no user in the validation range: an empty split is left out
    assert summary["empty_splits"] == ["validation"] and summary["rows"]["validation"] == 0
    assert sorted(ds["train"]["uid"]) == [0, 1, 2, 3, 4] and sorted(ds["test"]["uid"]) == [6, 7]
    assert ds["hidden"]["uid"] == [HIDDEN_USER]
    assert summary["dropped"] == {"uid_outside_user_ranges": 2}  # users 5 and 8
    step = next(s for s in summary["row_account"] if s["step"].startswith("user ranges"))
    assert step["rows_in"] == 9 and step["rows_kept"] == 7


def test_windows_multiply_train_only_and_never_show_asked_days(grid, records, tmp_path):
    config = HumobQAConfig(input_days=(10, 14), predict_days=(15, 16), windows_per_user=4)
    summary = build_humob_qa(grid, tmp_path / "qa", config, progress=False)
    ds = load_dataset(str(tmp_path / "qa"), HUMOB_QA_CONFIG)
    # width 2: windows ask 15-16, 13-14, 11-12, 9-10; all feasible
    assert ds["validation"].num_rows == 1 and ds["test"].num_rows == 1 and ds["hidden"].num_rows == 1
    assert set(ds["validation"]["window"]) == {0}
    train = ds["train"].to_list()
    assert len(train) == 7 * 4 == summary["rows"]["train"]
    assert summary["windows"]["train"] == {"requested_per_user": 4, "extra_rows": 21}
    by_user: dict[int, list[set]] = {}
    for row in train:
        w = row["window"]
        ask_lo, ask_hi = 15 - 2 * w, 16 - 2 * w
        in_lo, in_hi = max(10 - 2 * w, 0), 14 - 2 * w
        user = _content(row, "user")
        assert user.split("\n")[0] == f"Days {in_lo}-{in_hi} observed; predict days {ask_lo}-{ask_hi}."
        recs, asked = parse_records(user)
        np.testing.assert_array_equal(recs, _user_records(records, row["uid"], in_lo, in_hi))
        target = _user_records(records, row["uid"], ask_lo, ask_hi)
        np.testing.assert_array_equal(asked, target[:, :2])
        assert json.loads(_content(row, "assistant"))["prediction"] == target.tolist()
        assert not set(recs[:, 0]) & set(asked[:, 0])  # asked days never among the input records
        assert recs[:, 0].max() < asked[:, 0].min()
        by_user.setdefault(row["uid"], []).append(set(map(tuple, asked.tolist())))
    for windows in by_user.values():  # asked slots of different windows never overlap
        assert sum(len(w) for w in windows) == len(set().union(*windows))


def test_windows_stop_at_the_first_day_and_skip_empty_windows(grid, tmp_path):
    # width 5: windows ask 15-19, 10-14, 5-9, 0-4; the last has no input day before it, so it does not exist
    summary = build_humob_qa(grid, tmp_path / "qa", HumobQAConfig(windows_per_user=6), progress=False)
    rows = _rows(tmp_path / "qa", "train")
    assert sorted({r["window"] for r in rows}) == [0, 1, 2]
    headers = {r["window"]: _content(r, "user").split("\n")[0] for r in rows}
    assert headers == {0: "Days 0-14 observed; predict days 15-19.", 1: "Days 0-9 observed; predict days 10-14.",
                       2: "Days 0-4 observed; predict days 5-9."}
    step = next(s for s in summary["row_account"] if "extra windows" in s["step"])
    assert step["rows_in"] == 7 * 2 and step["rows_kept"] == 7 * 2 and step["notes"]["windows_possible_per_user"] == 2
    # one-day windows over all regular users: user 3 has no record on day 5, so the window asking day 5 and the one
    # whose only input day is day 5 are skipped and counted
    config = HumobQAConfig(predict_days=(15, 15), input_days=(14, 14), windows_per_user=11, user_ranges="train=0-8")
    summary = build_humob_qa(grid, tmp_path / "qa1", config, progress=False)
    rows = _rows(tmp_path / "qa1", "train")
    assert len(rows) == 9 * 11 - 2
    assert {r["window"] for r in rows if r["uid"] == 3} == set(range(11)) - {9, 10}
    assert summary["dropped"] == {"window_without_asked_rows": 1, "window_without_input_rows": 1}


def test_shifted_copies_move_every_cell_of_a_train_row_by_one_offset_on_the_grid(grid, records, tmp_path):
    config = HumobQAConfig(input_days=(10, 14), predict_days=(15, 16), windows_per_user=2, shifted_copies=3, seed=5)
    summary = build_humob_qa(grid, tmp_path / "qa", config, progress=False)
    ds = load_dataset(str(tmp_path / "qa"), HUMOB_QA_CONFIG)
    train = ds["train"].to_list()
    assert len(train) == 7 * 2 * 4 == summary["rows"]["train"]
    assert summary["shifted_copies"] == {"train": {"per_row": 3, "rows": 7 * 2 * 3}}
    for split in ("validation", "test", "hidden"):  # only the train split is augmented
        assert set(ds[split]["copy"]) == {0} and set(ds[split]["shift_x"]) == set(ds[split]["shift_y"]) == {0}
    originals = {(r["uid"], r["window"]): r for r in train if r["copy"] == 0}
    assert all(r["shift_x"] == r["shift_y"] == 0 for r in originals.values())
    shifts = []
    for row in train:
        if row["copy"] == 0:
            continue
        base = originals[row["uid"], row["window"]]
        dx, dy = row["shift_x"], row["shift_y"]
        shifts.append((dx, dy))
        recs, asked = parse_records(_content(row, "user"))
        recs0, asked0 = parse_records(_content(base, "user"))
        np.testing.assert_array_equal(recs, recs0 + np.array([0, 0, dx, dy]))  # d and t unchanged
        np.testing.assert_array_equal(asked, asked0)
        answer = np.array(json.loads(_content(row, "assistant"))["prediction"])
        answer0 = np.array(json.loads(_content(base, "assistant"))["prediction"])
        np.testing.assert_array_equal(answer, answer0 + np.array([0, 0, dx, dy]))
        cells = np.concatenate([recs[:, 2:], answer[:, 2:]])
        assert cells.min() >= 1 and cells.max() <= 50  # the 50 x 50 grid of the fixture
        assert _content(row, "user").split("\n")[0] == _content(base, "user").split("\n")[0]
        assert row["messages"][0] == base["messages"][0]
    assert len(set(shifts)) > len(shifts) // 2  # the offsets are drawn, not one fixed move
    assert any(dx < 0 for dx, _ in shifts) and any(dx > 0 for dx, _ in shifts)
    step = next(s for s in summary["row_account"] if "shifted copies" in s["step"])
    assert step["rows_in"] == step["rows_kept"] == 7 * 2 * 3
    card = (tmp_path / "qa" / "README.md").read_text()
    assert "3 shifted copies of every row" in card and "seed 5" in card
    # the seed fixes the draw
    build_humob_qa(grid, tmp_path / "again", config, progress=False)
    assert _rows(tmp_path / "again", "train") == _rows(tmp_path / "qa", "train")
    other = HumobQAConfig(input_days=(10, 14), predict_days=(15, 16), windows_per_user=2, shifted_copies=3, seed=6)
    build_humob_qa(grid, tmp_path / "other", other, progress=False)
    assert _rows(tmp_path / "other", "train") != _rows(tmp_path / "qa", "train")


def test_shifted_copies_keep_a_row_that_spans_the_grid_in_place(tmp_path):
    rows = [(u, d, 10, x, y) for u in range(3) for d in range(6) for x, y in ((1, 2), (5, 5))]
    rows += [(0, d, 11, 5, 1) for d in range(6)]  # user 0 spans x 1..5 and y 1..5: the whole 5 x 5 grid
    frame = pd.DataFrame(rows, columns=["uid", "d", "t", "x", "y"]).astype(
        {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"})
    loaded = LoadedGrid(frame, RowAccount(), {"format": "yjmob", "grid_size": 5, "coordinate_base": 1,
                                              "slots_per_day": 48})
    prepared = prepare_grid(loaded, GridPreprocessConfig(predict_days=(4, 5), user_fractions=(1.0, 0.0, 0.0)))
    build_humob_qa(prepared, tmp_path / "qa", HumobQAConfig(shifted_copies=4), progress=False)
    train = _rows(tmp_path / "qa", "train")
    assert {(r["shift_x"], r["shift_y"]) for r in train if r["uid"] == 0} == {(0, 0)}
    others = [r for r in train if r["uid"] != 0 and r["copy"] > 0]
    assert len(others) == 2 * 4
    # x spans 1..5: no room to move; y spans 2..5: up by one or not at all
    assert {r["shift_x"] for r in others} == {0} and {r["shift_y"] for r in others} == {-1, 0}


# ----------------------------------------------------------------------------------------------------------------------
# token budget


def test_token_budget_drops_oldest_days_first(grid, built, tokenizer, tmp_path):
    out, _ = built
    full = {r["uid"]: r for s in ("train", "validation", "test", "hidden") for r in _rows(out, s)}
    counts = {uid: _prompt_tokens(tokenizer, r) for uid, r in full.items()}
    budget = int(np.median(list(counts.values())))
    summary = build_humob_qa(grid, tmp_path / "qa", HumobQAConfig(max_input_tokens=budget, tokenizer=tokenizer),
                             progress=False)
    assert summary["prompt_tokens_counted_with"] == "chat template"
    truncated = dropped_days = dropped_rows = 0
    for split in ("train", "validation", "test", "hidden"):
        for row in _rows(tmp_path / "qa", split):
            before = full[row["uid"]]
            assert _prompt_tokens(tokenizer, row) <= budget
            old_recs, asked = parse_records(_content(before, "user"))
            recs, new_asked = parse_records(_content(row, "user"))
            np.testing.assert_array_equal(new_asked, asked)
            k = row["input_days_dropped"]
            old_days = np.unique(old_recs[:, 0])
            kept = old_recs[old_recs[:, 0] > old_days[k - 1]] if k else old_recs
            np.testing.assert_array_equal(recs, kept)  # exactly the k oldest days are gone
            assert row["num_input_rows"] == len(recs)
            if k:
                truncated += 1
                dropped_days += k
                dropped_rows += len(old_recs) - len(recs)
                assert _content(row, "user").split("\n")[0].startswith(f"Days {old_days[k - 1] + 1}-14 observed")
                # one day fewer would not have fitted
                fewer = old_recs[old_recs[:, 0] > old_days[k - 2]] if k > 1 else old_recs
                lo = old_days[k - 2] + 1 if k > 1 else 0
                text = user_message(fewer, asked, (lo, 14), (15, 19))
                prompt = [row["prompt"][0], {"role": "user", "content": text}]
                assert _prompt_tokens(tokenizer, {"prompt": prompt}) > budget
            else:
                assert counts[row["uid"]] <= budget
    assert truncated >= 3 and dropped_days > truncated
    totals = {key: sum(v[key] for v in summary["truncation"].values())
              for key in ("samples_truncated", "input_days_dropped", "input_rows_dropped")}
    assert totals == {"samples_truncated": truncated, "input_days_dropped": dropped_days,
                      "input_rows_dropped": dropped_rows}
    assert summary["dropped"] == {}
    assert summary["tokens"]["train"]["prompt"]["max"] <= budget


def test_token_budget_drops_samples_that_cannot_fit(grid, built, tokenizer, tmp_path):
    out, _ = built
    rows = [r for s in ("train", "validation", "test") for r in _rows(out, s)]
    bare = {}
    for row in rows:  # the prompt with no input day at all
        _, asked = parse_records(_content(row, "user"))
        text = user_message(np.zeros((0, 4)), asked, (15, 14), (15, 19))
        bare[row["uid"]] = _prompt_tokens(tokenizer, {"prompt": [row["prompt"][0], {"role": "user", "content": text}]})
    budget = int(np.median(list(bare.values())))
    too_long = {uid for uid, n in bare.items() if n > budget}
    assert 0 < len(too_long) < len(bare)
    summary = build_humob_qa(grid, tmp_path / "qa", HumobQAConfig(max_input_tokens=budget, tokenizer=tokenizer),
                             progress=False)
    kept = {r["uid"] for s in ("train", "validation", "test") if s in summary["rows"] and summary["rows"][s]
            for r in _rows(tmp_path / "qa", s)}
    assert kept == set(bare) - too_long
    over = sum(v["samples_dropped_over_budget"] for s, v in summary["truncation"].items() if s != "hidden")
    assert over == len(too_long)
    assert summary["dropped"]["prompt_over_token_budget"] == len(too_long) + summary["truncation"]["hidden"][
        "samples_dropped_over_budget"]
    for s in summary["rows"]:
        if summary["rows"][s]:
            for row in _rows(tmp_path / "qa", s):
                assert _prompt_tokens(tokenizer, row) <= budget
                if row["num_input_rows"] == 0:
                    assert _content(row, "user").startswith("No days observed; predict days 15-19.\n")


def test_token_budget_without_chat_template_and_from_a_folder(grid, built, tokenizer, tmp_path):
    plain = build_bpe_tokenizer(["0 1 2 3\n45 46 999 999"], vocab_size=270)
    plain.save_pretrained(tmp_path / "tok")
    out, _ = built
    row = _rows(out, "train")[0]
    budget = len(plain(_content(row, "system"), add_special_tokens=False)["input_ids"]) + len(
        plain(_content(row, "user"), add_special_tokens=False)["input_ids"]) - 50
    summary = build_humob_qa(grid, tmp_path / "qa", HumobQAConfig(max_input_tokens=budget,
                                                                  tokenizer=str(tmp_path / "tok")), progress=False)
    assert summary["prompt_tokens_counted_with"] == "system + user messages"
    new = next(r for r in _rows(tmp_path / "qa", "train") if r["uid"] == row["uid"])
    assert new["input_days_dropped"] >= 1
    n = sum(len(plain(m["content"], add_special_tokens=False)["input_ids"]) for m in new["prompt"])
    assert n <= budget


# ----------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs, message", [
    ({"input_days": (5, 3)}, "first day is after the last"),
    ({"predict_days": "a-b"}, "expected 'FIRST-LAST'"),
    ({"predict_days": (1, 2, 3)}, "pair of days"),
    ({"input_days": (0, 20), "predict_days": (15, 19)}, "must end before the first predicted day"),
    ({"windows_per_user": 0}, "windows_per_user=0"),
    ({"max_input_tokens": 0, "tokenizer": None}, "max_input_tokens=0"),
    ({"max_input_tokens": 100}, "needs a tokenizer"),
    ({"tokenizer": "/nonexistent/tokenizer"}, "not a folder"),
    ({"tokenizer": object()}, "encode"),
    ({"user_ranges": {"dev": (0, 1)}}, "allowed"),
    ({"user_ranges": {"train": (0, 10), "test": (5, 20)}}, "overlap"),
    ({"user_ranges": "train:0-5"}, "split=FIRST-LAST"),
    ({"seed": -1}, "seed=-1"),
    ({"shifted_copies": -1}, "shifted_copies=-1"),
    ({"shifted_copies": 1.5}, "shifted_copies=1.5"),
    ({"answer_style": "pretty"}, "answer_style must be one of"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HumobQAConfig(**kwargs)


def test_refuses_a_checkin_dataset(tmp_path):
    (tmp_path / "hf_mobility.json").write_text(json.dumps({"kind": "checkins"}))
    with pytest.raises(ValueError, match="needs a grid dataset"):
        build_humob_qa(tmp_path, tmp_path / "qa", progress=False)


def test_planning_in_user_chunks_gives_the_same_rows(grid, tmp_path, monkeypatch):
    import dataset_builders.instructions.humob_qa as module

    config = HumobQAConfig(windows_per_user=3, input_days=(8, 14), predict_days=(15, 16), batch_size=2)
    build_humob_qa(grid, tmp_path / "one", config, progress=False)
    monkeypatch.setattr(module, "_PLAN_USERS", 3)
    build_humob_qa(grid, tmp_path / "chunks", config, progress=False)
    for split in ("train", "validation", "test", "hidden"):
        assert _rows(tmp_path / "one", split) == _rows(tmp_path / "chunks", split)
