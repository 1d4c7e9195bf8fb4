"""`evaluate_run`: the model's ranking scored on the same samples as the baselines, with a known answer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import train.evaluate as ev
from dataset_builders.publish import load_prepared, write_dataset
from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer
from train.cli import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    assert main(["-q", "data", "synth", "--out", str(root / "raw"), "--users", "20"]) == 0
    assert main(["-q", "data", "prepare", "--format", "foursquare", "--input", str(root / "raw" / "checkins.txt"),
                 "--out", str(root / "data")]) == 0
    return root


def _run_folder(root, data):
    locations = data.table("locations").column("location_id").to_pylist()
    codes = {loc: (i // 16, i % 16) for i, loc in enumerate(locations)}
    tok = LocationTokenizer.from_base(build_bpe_tokenizer(["user visited a place"] * 20, vocab_size=300), codes)
    run = root / "run"
    tok.save_pretrained(run / "tokenizer")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(run / "model")
    test = data.table("samples", "test").slice(0, 12)
    rows = pa.table({
        "prompt": [f"user visited a place {i}" for i in range(test.num_rows)],
        "completion": [tok.location_to_text(t) for t in test.column("target_location_id").to_pylist()],
        "sample_id": test.column("sample_id"),
        "target_location_id": test.column("target_location_id"),
    })
    write_dataset(root / "ins", {"next": {"test": rows}})
    (run / "run_info.json").write_text(json.dumps({"instructions": str(root / "ins"), "name": "toy"}))
    return run, test.column("target_location_id").to_pylist(), locations


def test_known_answer_metrics_and_same_samples(prepared, monkeypatch):
    data = load_prepared(prepared / "data")
    run, targets, locations = _run_folder(prepared, data)
    others = [loc for loc in locations if loc not in targets][:5]

    # a ranking with the target at rank 1 for rows 0-3, rank 3 for rows 4-7, and missing for rows 8-11
    def fake_rank_locations(model, tokenizer, prompts, num_beams=20, **kwargs):
        assert len(prompts) == len(targets) and num_beams == 5
        out = []
        for i, target in enumerate(targets):
            if i < 4:
                out.append([target, *others[:4]])
            elif i < 8:
                out.append([others[0], others[1], target, others[2]])
            else:
                out.append(others[:5])
        return out

    import tokenization_mobility

    monkeypatch.setattr(tokenization_mobility, "rank_locations_cached", fake_rank_locations)
    report = ev.evaluate_run(run, prepared / "data", num_beams=5)
    res = report["results"]["toy"]
    assert res["num_samples"] == 12
    assert res["acc@1"] == pytest.approx(4 / 12) and res["acc@5"] == pytest.approx(8 / 12)
    assert res["mrr"] == pytest.approx((4 * 1 + 4 / 3) / 12)
    assert res["ndcg@5"] == pytest.approx((4 * 1 + 4 / np.log2(4)) / 12)
    # the baselines are scored on exactly these 12 samples
    for name in ("popularity", "most-frequent", "history-frequency", "markov"):
        assert report["results"][name]["num_samples"] == 12
    assert json.loads((run / "metrics.json").read_text())["results"]["toy"]["acc@1"] == pytest.approx(4 / 12)


def test_real_constrained_decoding_yields_valid_locations(prepared):
    data = load_prepared(prepared / "data")
    run, targets, locations = _run_folder(prepared, data)
    report = ev.evaluate_run(run, prepared / "data", num_beams=4, batch_size=4, max_samples=6)
    res = report["results"]["toy"]
    assert res["num_samples"] == 6 and 0.0 <= res["acc@1"] <= res["acc@5"] <= 1.0
    # the generate-based decoder ranks alike
    slow = ev.evaluate_run(run, prepared / "data", num_beams=4, batch_size=4, max_samples=6, decoder="vectorised")
    assert slow["results"]["toy"] == res
    with pytest.raises(ValueError, match="decoder"):
        ev.evaluate_run(run, prepared / "data", decoder="sampling")


def test_unknown_run_folder_is_a_clear_error(tmp_path, prepared, capsys):
    code = main(["-q", "evaluate", str(tmp_path), "--data", str(prepared / "data")])
    assert code == 2 and "not a training run" in capsys.readouterr().err
