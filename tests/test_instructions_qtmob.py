"""QT-Mob instruction sets: templates, masks, completion convention, splits, chat rows, publishing, determinism."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset

from dataset_builders.instructions.qtmob import (
    MASK,
    UNKNOWN,
    QTMobInstructionConfig,
    build_qtmob_instructions,
    write_qtmob_instructions,
)
from dataset_builders.preprocess import local_time_features
from dataset_builders.publish import load_prepared
from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer

ALL_TASKS = ("next", "recovery", "alignment", "translation")
LOCATION_TASKS = ("next", "recovery", "alignment_description_to_code")
VISIT = re.compile(r"^At \w{3} \d\d:\d\d, user \S+ visited POI (.*)\.$")


@pytest.fixture(scope="module")
def prepared(small_city_dir):
    return load_prepared(small_city_dir)


@pytest.fixture(scope="module")
def tokenizer(prepared):
    ids = prepared.table("locations").column("location_id").to_pylist()
    codes = {loc: (i // 64 % 8, i // 8 % 8, i % 8, i % 3) for i, loc in enumerate(ids)}
    base = build_bpe_tokenizer(["a user visits a place at noon", "then another place"], vocab_size=300)
    return LocationTokenizer.from_base(base, codes, codebook_size=8)


@pytest.fixture(scope="module")
def built(prepared, tokenizer):
    return build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=ALL_TASKS))


def _rows(built, task, split="train"):
    return built.datasets[task][split].to_pandas()


def test_templates_filled_and_completion_convention(built, tokenizer):
    system = built.config.system_prompt
    for task, dd in built.datasets.items():
        for split, ds in dd.items():
            assert ds.num_rows > 0, (task, split)
            rows = ds.to_pandas()
            for prompt, completion, kind, target in zip(
                rows["prompt"], rows["completion"], rows["task"], rows["target_location_id"]
            ):
                assert "{" not in prompt and "}" not in prompt
                assert prompt.startswith(system + "\n\n")
                assert completion == completion.strip() and completion
                assert "  " not in prompt + completion
                if kind in LOCATION_TASKS:
                    # the prompt ends with the answer prefix; the completion is exactly the codes of the target
                    assert prompt.endswith("POI ")
                    assert completion == tokenizer.location_to_text(target)
                    assert tokenizer.text_to_locations(completion) == [target]


def test_next_one_row_per_prepared_sample_with_template_zero(built, prepared):
    for split in ("validation", "test"):
        samples = prepared.table("samples", split).to_pandas()
        rows = _rows(built, "next", split)
        assert rows["sample_id"].tolist() == samples["sample_id"].tolist()
        assert rows["target_location_id"].tolist() == samples["target_location_id"].tolist()
        assert (rows["template_id"] == 0).all()
        recovery = _rows(built, "recovery", split)
        assert recovery["sample_id"].tolist() == samples["sample_id"].tolist()
        assert recovery["target_location_id"].tolist() == samples["target_location_id"].tolist()
        assert (recovery["template_id"] == 0).all()
    train = _rows(built, "next")
    assert len(train) == prepared.table("samples", "train").num_rows
    assert train["template_id"].nunique() == 4  # seeded choice over all templates


def test_next_history_is_capped_and_in_order(prepared, tokenizer):
    result = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=("next",), max_history=3))
    samples = prepared.table("samples", "test").to_pandas()
    rows = _rows(result, "next", "test")
    day0 = prepared.metadata["day0_weekday"]
    for (_, sample), prompt in zip(samples.iterrows(), rows["prompt"]):
        visits = [m.group(1) for line in prompt.split("\n") if (m := VISIT.match(line))]
        history = list(sample["history_location_ids"])[-3:]
        assert visits == [tokenizer.location_to_text(loc) for loc in history]
        _, _, minute, weekday = local_time_features(np.array([sample["target_timestamp"]]),
                                                    np.array([sample["target_tz_offset_min"]]), day0)
        day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][weekday[0]]
        label = f"{day} {minute[0] // 60:02d}:{minute[0] % 60:02d}"
        assert prompt.endswith(f"At {label}, user {sample['user_id']} will visit POI ")


def _visit_lines(prompt):
    return [m.group(1) for line in prompt.split("\n") if (m := VISIT.match(line))]


def test_recovery_masks_in_range(built, prepared, tokenizer):
    for split in ("train", "validation", "test"):
        rows = _rows(built, "recovery", split)
        samples = prepared.table("samples", split).to_pandas().set_index("sample_id")
        for prompt, completion, sample_id in zip(rows["prompt"], rows["completion"], rows["sample_id"]):
            visits = _visit_lines(prompt)
            hidden = [v in (MASK, UNKNOWN) for v in visits]
            assert visits.count(MASK) == 1
            assert not hidden[0]
            assert 0.2 <= sum(hidden) / len(visits) <= 0.5
            sample = samples.loc[sample_id]
            trajectory = list(sample["history_location_ids"])[-20:] + [sample["target_location_id"]]
            assert len(visits) == len(trajectory)
            if split == "train":
                assert len(visits) >= 3
            else:
                assert visits[-1] == MASK  # the prepared target is queried in evaluation
            query = visits.index(MASK)
            assert tokenizer.text_to_locations(completion) == [trajectory[query]]
            for shown, loc in zip(visits, trajectory):
                if shown not in (MASK, UNKNOWN):
                    assert shown == tokenizer.location_to_text(loc)
    step = built.account.step("recovery train")
    assert step.rows_in - step.rows_kept == step.dropped.get("history_too_short_for_recovery", 0)


def test_alignment_excludes_heldout_locations(built, prepared, tokenizer):
    locations = prepared.table("locations").to_pandas()
    heldout = set(locations.loc[locations["heldout"], "location_id"])
    assert heldout
    rows = _rows(built, "alignment")
    assert set(built.datasets["alignment"]) == {"train"}
    to_code = rows[rows["task"] == "alignment_description_to_code"]
    to_text = rows[rows["task"] == "alignment_code_to_description"]
    kept = set(locations["location_id"]) - heldout
    assert set(to_code["target_location_id"]) == kept and len(to_code) == len(kept)
    described = {loc for p in to_text["prompt"] for loc in tokenizer.text_to_locations(p)}
    assert described == kept and len(to_text) == len(kept)
    assert (to_text["target_location_id"] == "").all()
    assert to_text["completion"].str.contains("Located at").all()
    assert built.account.step("alignment train (locations)").dropped["heldout_location"] == len(heldout)


def test_translation_completion_is_the_code_sequence(built, prepared, tokenizer):
    rows = _rows(built, "translation")
    samples = prepared.table("samples", "train").to_pandas().set_index("sample_id")
    for completion, sample_id in zip(rows["completion"], rows["sample_id"]):
        sample = samples.loc[sample_id]
        trajectory = list(sample["history_location_ids"])[-20:] + [sample["target_location_id"]]
        assert tokenizer.text_to_locations(completion) == trajectory
        assert completion == " ".join(tokenizer.location_to_text(loc) for loc in trajectory)


def test_profile_uses_training_checkins_only(built, prepared, tokenizer):
    train = prepared.table("checkins", "train").to_pandas()
    rows = _rows(built, "next", "test")
    for user, prompt in zip(rows["user_id"], rows["prompt"]):
        profile = next(line for line in prompt.split("\n") if line.startswith("Profile of user"))
        top = tokenizer.text_to_locations(profile)
        counts = train[train["user_id"] == user].groupby("location_id").size().reset_index(name="n")
        counts = counts.sort_values(["n", "location_id"], ascending=[False, True])
        assert top == counts["location_id"].head(3).tolist()


def test_chat_format_rows_are_trl_conversational(prepared, tokenizer, built):
    chat = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=("next", "alignment"),
                                                                                format="chat"))
    system = built.config.system_prompt
    for task in ("next", "alignment"):
        plain = _rows(built, task, "train")
        rows = chat.datasets[task]["train"].to_list()
        assert len(rows) == len(plain)
        for row, (_, ref) in zip(rows, plain.iterrows()):
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert row["prompt"][0]["content"] == system
            assert row["prompt"][1]["content"] == ref["prompt"][len(system) + 2 :].rstrip()
            assert row["completion"] == [{"role": "assistant", "content": ref["completion"]}]


def test_published_folder_loads_with_identical_rows(built, tmp_path):
    out = write_qtmob_instructions(built, tmp_path / "instructions")
    for task, dd in built.datasets.items():
        loaded = load_dataset(str(out), task)
        assert set(loaded) == set(dd)
        for split, ds in dd.items():
            assert loaded[split].to_list() == ds.to_list()
    card = (out / "README.md").read_text()
    assert "Row account" in card and "| recovery train |" in card
    assert "will visit POI" in card and '"max_history": 20' in card


def test_published_folder_holds_its_location_tokenizer(built, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = write_qtmob_instructions(built, tmp_path / "instructions")
    saved = AutoTokenizer.from_pretrained(out / "location_tokenizer", trust_remote_code=True)
    assert dict(saved.location_codes) == dict(tokenizer.location_codes)
    row = load_dataset(str(out), "next", split="test")[0]
    assert saved.text_to_locations(row["completion"]) == [row["target_location_id"]]


def test_id_location_format_writes_one_plain_token_per_location(prepared, tokenizer, built, tmp_path):
    config = QTMobInstructionConfig(tasks=("next", "recovery", "alignment"), location_format="id")
    result = build_qtmob_instructions(prepared, tokenizer, config)
    ids = result.tokenizer
    assert ids.level_prefixes == ["loc"] and ids.num_levels == 1
    assert sorted(ids.location_ids) == sorted(tokenizer.location_ids)
    assert len(ids) == len(tokenizer) - sum(tokenizer.codebook_sizes) + ids.num_locations  # semantic codes removed
    assert config.system_prompt.startswith("You are") and "one ID token" in config.system_prompt
    for task in ("next", "recovery"):
        for split in ("train", "test"):
            rows = result.datasets[task][split].to_pandas()
            sem = built.datasets[task][split].to_pandas()
            assert list(rows["sample_id"]) == list(sem["sample_id"])  # the same samples as the semantic set
            assert rows["completion"].str.fullmatch(r"<loc_\d+>").all()
            assert [ids.text_to_locations(c) for c in rows["completion"]] == [[t] for t in rows["target_location_id"]]
            assert not rows["prompt"].str.contains(r"<a_\d+>").any()
    prompt = result.datasets["next"]["test"][0]["prompt"]
    visits = [m.group(1) for m in map(VISIT.match, prompt.splitlines()) if m]
    assert visits and all(re.fullmatch(r"<loc_\d+>", v) for v in visits)
    assert len(ids.tokenize(visits[0])) == 1
    out = write_qtmob_instructions(result, tmp_path / "instructions_id")
    reloaded = LocationTokenizer.from_pretrained(str(out / "location_tokenizer"))
    assert reloaded.level_prefixes == ["loc"] and dict(reloaded.location_codes) == dict(ids.location_codes)
    assert "plain ID tokens" in (out / "README.md").read_text()


def test_seeded_determinism(prepared, tokenizer, built):
    again = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=ALL_TASKS))
    for task, dd in built.datasets.items():
        for split, ds in dd.items():
            assert again.datasets[task][split].to_list() == ds.to_list()
    other = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=("next", "recovery"), seed=1))
    assert other.datasets["next"]["train"]["template_id"] != built.datasets["next"]["train"]["template_id"]
    assert other.datasets["recovery"]["train"]["prompt"] != built.datasets["recovery"]["train"]["prompt"]
    assert other.datasets["next"]["test"].to_list() == built.datasets["next"]["test"].to_list()
    small = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=("next",), batch_size=7))
    assert small.datasets["next"]["train"].to_list() == built.datasets["next"]["train"].to_list()


def test_locations_without_codes_are_dropped_and_counted(prepared):
    ids = prepared.table("locations").column("location_id").to_pylist()
    codes = {loc: (i // 8 % 8, i % 8) for i, loc in enumerate(ids[:-5])}
    base = build_bpe_tokenizer(["a user visits a place"], vocab_size=300)
    tokenizer = LocationTokenizer.from_base(base, codes, codebook_size=8)
    result = build_qtmob_instructions(prepared, tokenizer, QTMobInstructionConfig(tasks=("next",), profile_top_k=0))
    step = result.account.step("next train")
    samples = prepared.table("samples", "train").to_pandas()
    missing = set(ids[-5:])
    bad = samples["target_location_id"].isin(missing) | samples["history_location_ids"].map(
        lambda h: bool(missing & set(h[-20:])))
    assert step.dropped.get("location_without_code", 0) == int(bad.sum())
    assert result.datasets["next"]["train"].num_rows == int((~bad).sum())
    assert not any(p.startswith("Profile") for p in pd.Series(result.datasets["next"]["train"]["prompt"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ("next", "poi")}, "tasks"),
        ({"format": "messages"}, "format"),
        ({"max_history": 0}, "max_history"),
        ({"recovery_mask_range": (0.0, 0.5)}, "recovery_mask_range"),
        ({"recovery_mask_range": (0.6, 0.5)}, "recovery_mask_range"),
        ({"num_templates": 0}, "num_templates"),
        ({"location_format": "ids"}, "location_format"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QTMobInstructionConfig(**kwargs)
