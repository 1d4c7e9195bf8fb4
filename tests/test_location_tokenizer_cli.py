"""`mobility train location-tokenizer` on the synthetic city: unique codes, semantics kept, reloadable artefacts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from train.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loctok")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_MOBILITY_HOME", str(root / "home"))  # a private embedding cache
    assert main(["-q", "data", "synth", "--out", str(root / "raw"), "--users", "60"]) == 0
    assert main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(root / "raw" / "checkins.txt"),
                 "--locations", str(root / "raw" / "pois.csv"), "--out", str(root / "data")]) == 0
    assert main(["-q", "train", "location-tokenizer", "--data", str(root / "data"), "--output-dir",
                 str(root / "out"), "--max-epochs", "60", "--num-quantizers", "3", "--codebook-size", "32"]) == 0
    yield root
    mp.undo()


@pytest.mark.slow
def test_outputs_and_unique_codes(run):
    out = run / "out"
    for name in ("codebook_usage.png", "first_code_map.png", "training.png", "report.json", "codes.parquet",
                 "descriptions.parquet"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no checkpoints left behind
    report = json.loads((out / "report.json").read_text())
    assert report["codes"]["collision_rate_final"] == 0.0 and report["codes"]["final_num_unique"] == report[
        "num_locations"]
    codes = pd.read_parquet(out / "codes.parquet")
    assert not codes[["code_a", "code_b", "code_c"]].duplicated().any()
    locations = pd.read_parquet(next((run / "data" / "data" / "locations").glob("*.parquet")))
    assert set(codes["location_id"]) == set(locations["location_id"])


def test_same_category_first_code_rate_hand_computed_and_without_categories():
    from train.location_tokenizer import same_category_first_code_rate

    # bar: codes 1, 1, 2 -> 1 of 3 pairs shared; cafe: 3, 3 -> 1 of 1; museum alone and the blank make no pair
    observed, random_rate = same_category_first_code_rate(["bar", "bar", "bar", "cafe", "cafe", "museum", None],
                                                          [1, 1, 2, 3, 3, 1, 2])
    assert observed == pytest.approx(2 / 4) and 0.0 <= random_rate <= 1.0
    assert same_category_first_code_rate([None, None, ""], [0, 0, 1]) == (None, None)  # Gowalla: no categories
    assert same_category_first_code_rate(["a", "b"], [0, 0]) == (None, None)  # no two places share one


@pytest.mark.slow
def test_same_category_shares_first_code_far_more_than_chance(run):
    report = json.loads((run / "out" / "report.json").read_text())
    assert report["same_category_first_code_rate"] >= 2 * report["same_category_first_code_rate_random"]


@pytest.mark.slow
def test_tokenizer_and_rqvae_reload_with_auto_classes(run):
    out = run / "out"
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", trust_remote_code=True)
    codes = pd.read_parquet(out / "codes.parquet")
    for loc, text in zip(codes["location_id"], codes["tokens"]):
        assert tok.location_to_text(loc) == text
        assert tok.text_to_locations(text) == [loc]
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 3
    model = AutoModel.from_pretrained(out / "rqvae", trust_remote_code=True).eval()
    from train.text_encoder import encode_texts

    desc = pd.read_parquet(out / "descriptions.parquet")
    emb = torch.from_numpy(encode_texts(desc["description"].tolist(), progress=False))
    unique, _ = model.get_unique_codes(emb)
    np.testing.assert_array_equal(unique.numpy(), codes[["code_a", "code_b", "code_c"]].to_numpy())
