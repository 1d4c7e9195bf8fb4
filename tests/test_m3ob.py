"""M3ob training and evaluation (train/m3ob.py) on the small synthetic city: the whole pipeline through the CLI, the
ablations, a prepared knowledge graph reused, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--hidden-size", "16", "--intermediate-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "2",
        "--max-epochs", "2", "--batch-size", "64", "--transe-epochs", "5", "--embedding-dim", "16",
        "--max-history", "16", "--progress", "false", "--num-threads", "1"]


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A tiny DINOv2 folder (random weights) with the real processor: the image encoder of these tests."""
    from transformers import Dinov2Config, Dinov2Model

    from train.convert_dinov2 import dinov2_small_image_processor

    folder = tmp_path_factory.mktemp("tiny_dinov2")
    config = Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                          patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(folder)
    dinov2_small_image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(small_city_dir, tiny_dinov2, tmp_path_factory):
    """`mobility train m3ob` with both modalities; the images are context rasters of the POI table (no folder)."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_MOBILITY_HOME", str(home))
    run = tmp_path_factory.mktemp("m3ob") / "run"
    try:
        assert main(["-q", "train", "m3ob", "--data", str(small_city_dir), "--output-dir", str(run),
                     "--image-encoder", str(tiny_dinov2), "--image-size", "32", *TINY]) == 0
    finally:
        mp.undo()
    return run


def test_full_run_writes_a_self_contained_folder(full_run, small_city_dir):
    info = json.loads((full_run / "run_info.json").read_text())
    assert info["method"] == "m3ob" and info["name"] == "m3ob"
    assert info["modalities"] == ["id", "image"] and info["fusion"] == "gate" and info["alignment_weight"] > 0
    assert info["images"]["image_source"].startswith("context") and info["images"]["locations_with_image"] > 0
    # the knowledge graph and TransE of the train check-ins, inside the run
    assert (full_run / "kg" / "README.md").is_file() and (full_run / "kg" / "transe").is_dir()
    assert info["knowledge_graph"]["summary"]["num_triples"] > 0
    transe = info["knowledge_graph"]["transe_metrics"]
    assert set(transe) >= {"transe", "random"}
    # metrics beside the baselines, on the same samples, with the long-tail slice
    report = json.loads((full_run / "metrics.json").read_text())
    results = report["results"]
    assert list(results)[0] == "m3ob" and {"markov", "most-frequent", "nearest"} <= set(results)
    assert len({r["num_samples"] for r in results.values()}) == 1
    assert "long_tail" in results["m3ob"]["slices"]
    card = (full_run / "README.md").read_text()
    assert "does **not** claim to reproduce" in card and "hf-mobility choices" in card and "| m3ob |" in card
    assert "context rasters rendered from the POI table" in card


def test_saved_model_reloads_with_identical_scores(full_run, small_city_dir):
    from transformers import AutoModel

    from dataset_builders.publish import load_prepared
    from train.mhsa import build_mhsa_samples

    model = AutoModel.from_pretrained(full_run / "model", trust_remote_code=True).eval()
    assert type(model).__name__ == "M3obForNextLocation"
    assert model.edge_index.shape[1] == model.config.num_edges > 0  # the relational graph travels with the weights
    data = load_prepared(small_city_dir)
    samples = build_mhsa_samples(data, "test", model.config.location_ids, model.config.user_ids,
                                 max_history=model.config.max_position_embeddings)
    batch = samples.batch(np.arange(min(8, len(samples))))
    batch.pop("labels")
    with torch.no_grad():
        first = model(**batch).logits
        again = AutoModel.from_pretrained(full_run / "model", trust_remote_code=True).eval()(**batch).logits
    assert torch.equal(first, again) and torch.isfinite(first[:, model.candidate_mask]).all()


def test_evaluate_cli_scores_the_run_with_slices(full_run, small_city_dir, capsys):
    out = full_run / "eval.json"
    assert main(["-q", "evaluate", str(full_run), "--data", str(small_city_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| m3ob |" in text and "Long-tail targets" in text
    report = json.loads(out.read_text())
    assert report["results"]["m3ob"]["num_samples"] == report["results"]["markov"]["num_samples"]


def test_id_only_ablation_reuses_a_prepared_knowledge_graph(full_run, small_city_dir, tmp_path, capsys):
    """`--modalities id --kg RUN/kg`: no image features are computed, the graph is not rebuilt, the name says so."""
    run = tmp_path / "id-only"
    assert main(["-q", "train", "m3ob", "--data", str(small_city_dir), "--output-dir", str(run),
                 "--modalities", "id", "--kg", str(full_run / "kg"), *TINY]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["name"] == "m3ob-id-only" and info["modalities"] == ["id"]
    assert info["knowledge_graph"]["built"] is False and not (run / "kg").exists()
    assert "ID-only" in (run / "README.md").read_text()
    capsys.readouterr()


def test_no_alignment_and_sum_fusion_switches(small_city_dir, tiny_dinov2, tmp_path, monkeypatch):
    from train.m3ob import parse_recipe

    recipe = parse_recipe(["--data", "d", "--output-dir", "o", "--no-alignment", "--fusion", "sum",
                           "--kg-neighbors", "3"])
    assert recipe.alignment_weight == 0.0 and recipe.fusion == "sum" and recipe.kg_neighbors == 3
    monkeypatch.setenv("HF_MOBILITY_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    assert main(["-q", "train", "m3ob", "--data", str(small_city_dir), "--output-dir", str(run),
                 "--image-encoder", str(tiny_dinov2), "--image-size", "32", "--no-alignment", "--fusion", "sum",
                 "--kg-neighbors", "4", "--evaluate", "false", *TINY]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["name"] == "m3ob-no-alignment-sum-fusion-k4"
    assert info["alignment_weight"] == 0.0 and info["fusion"] == "sum"


def test_bad_recipes_and_data_are_refused(tmp_path, capsys):
    from train.m3ob import load_recipe

    with pytest.raises(ValueError, match="modalities"):
        load_recipe(modalities="image")
    with pytest.raises(ValueError, match="fusion"):
        load_recipe(fusion="concat")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe(num_experts=3)
    assert main(["-q", "data", "synth", "--kind", "grid", "--users", "12", "--days", "10",
                 "--out", str(tmp_path / "raw")]) == 0
    assert main(["-q", "data", "prepare", "--format", "yjmob", "--input", str(tmp_path / "raw" / "grid.csv"),
                 "--out", str(tmp_path / "grid")]) == 0
    capsys.readouterr()
    assert main(["-q", "train", "m3ob", "--data", str(tmp_path / "grid"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "check-in dataset" in capsys.readouterr().err
