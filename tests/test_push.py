"""`train.push`: staging a run folder for the Hub and pushing it through a mocked `HfApi` (the Hub is offline)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pytest
import yaml

from train.push import build_model_card, format_metrics_table, push_run, stage_run, validate_repo_id

__all__: list[str] = []

METRICS = {
    "data": "/somewhere/prepared",
    "split": "test",
    "kind": "checkins",
    "results": {
        "qtmob": {"acc@1": 0.1234, "acc@5": 0.3, "mrr": 0.2, "ndcg@10": 0.25, "num_samples": 1200},
        "markov": {"acc@1": 0.05, "acc@5": 0.2, "mrr": 0.1, "ndcg@10": 0.15, "num_samples": 1200},
        "most_popular": {"acc@1": 0.01, "acc@5": 0.04, "mrr": 0.02, "ndcg@10": 0.03, "num_samples": 1200},
    },
}


def _make_run(root: Path, *, loctok_points_to_tokenizer: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataset_builders.publish import write_dataset
    from modeling_mobility.rqvae import RQVAEConfig, RQVAEModel
    from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer

    run, loctok, instructions = root / "run", root / "loctok", root / "instructions"
    tokenizer = LocationTokenizer.from_base(build_bpe_tokenizer(["some text"] * 50, vocab_size=300),
                                            {"loc1": (0, 1), "loc2": (1, 0)})
    tokenizer.save_pretrained(loctok / "tokenizer")
    tokenizer.save_pretrained(run / "tokenizer")
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(run / "model")
    RQVAEModel(RQVAEConfig(input_dim=8, hidden_sizes=[8], code_dim=4, num_quantizers=2,
                           codebook_size=2)).save_pretrained(loctok / "rqvae")
    table = pa.table({"prompt": ["Where next after loc1?", "Where next after loc2?"],
                      "completion": ["<a_0><b_1>", "<a_1><b_0>"]})
    write_dataset(instructions, {"next": {"train": table}})
    info = {
        "method": "qtmob-sft",
        "tasks": ["next"],
        "instructions": str(instructions),
        "location_tokenizer": str(loctok / "tokenizer" if loctok_points_to_tokenizer else loctok),
        "base_model": "tiny-llama",
        "peft": None,
        "train_rows": 2,
        "global_step": 5,
    }
    (run / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps(METRICS), encoding="utf-8")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"base_model": "tiny-llama", "max_steps": 5}), encoding="utf-8")
    (run / "training_curve.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    for junk in ("checkpoint-5", "adapter", "base_model"):
        (run / junk).mkdir()
        (run / junk / "model.safetensors").write_bytes(b"junk")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("push"))


@pytest.fixture(scope="module")
def staged(run_dir, tmp_path_factory) -> dict[str, Path]:
    return stage_run(run_dir, tmp_path_factory.mktemp("stage") / "staged", repo_id="alice/qtmob-demo")


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_staged_model_folder_loads_model_tokenizer_and_rqvae(staged):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = staged["model"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(tokenizer).__name__ == "LocationTokenizer"
    assert model.config.vocab_size == len(tokenizer)
    assert "<a_0>" in tokenizer.get_vocab()
    rqvae = AutoModel.from_pretrained(folder, subfolder="rqvae", trust_remote_code=True)
    assert rqvae.config.num_quantizers == 2 and rqvae.config.codebook_size == 2


def test_staged_model_folder_contents(staged):
    files = _files(staged["model"])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "location_codes.json", "tokenization_location.py", "rqvae/config.json",
                 "training_curve.png", "recipe.yaml", "metrics.json", "README.md"):
        assert name in files, name
    assert "run_info.json" not in files
    assert not any(f.startswith(("checkpoint-", "adapter", "base_model")) or "/checkpoint-" in f for f in files)
    assert not any("__pycache__" in f for f in files)
    assert set(staged) == {"model", "instructions"}


def test_staged_instructions_load_with_load_dataset(staged):
    from datasets import load_dataset

    ds = load_dataset(str(staged["instructions"]), "next")
    assert ds["train"]["completion"] == ["<a_0><b_1>", "<a_1><b_0>"]


def test_model_card_metadata_and_metrics_table(staged):
    card = (staged["model"] / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers"
    assert set(meta["tags"]) >= {"hf-mobility", "mobility", "qt-mob"}
    assert meta["datasets"] == ["alice/qtmob-demo-instructions"]
    assert "base_model" not in meta  # tiny-llama is built in code, not a Hub model
    assert "| **qtmob** (this model) | 12.34 | 30.00 | 20.00 | 25.00 | 1,200 |" in card
    assert "| markov | 5.00 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/qtmob-demo")' in card
    assert 'AutoTokenizer.from_pretrained("alice/qtmob-demo", trust_remote_code=True)' in card
    assert 'subfolder="rqvae", trust_remote_code=True' in card
    assert "2506.11109" in card and "max_steps: 5" in card


def test_model_card_without_metrics_and_with_hub_base_model():
    card = build_model_card({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "peft": "lora"})
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "datasets" not in meta
    assert "No evaluation was run" in card


def test_format_metrics_table_rejects_empty():
    with pytest.raises(ValueError, match="results"):
        format_metrics_table({"results": {}})


def test_stage_finds_rqvae_beside_output_folder_and_skips_missing_instructions(tmp_path):
    run = _make_run(tmp_path / "a", loctok_points_to_tokenizer=False)
    info = json.loads((run / "run_info.json").read_text())
    info["instructions"] = str(tmp_path / "missing")
    (run / "run_info.json").write_text(json.dumps(info))
    (run / "metrics.json").unlink()
    staged = stage_run(run, tmp_path / "staged")
    assert set(staged) == {"model"}
    assert (staged["model"] / "rqvae" / "config.json").is_file()
    card = (staged["model"] / "README.md").read_text()
    assert "No evaluation was run" in card and "datasets" not in yaml.safe_load(card.split("---")[1])


def test_stage_refuses_non_empty_staging_dir_and_overwrites_staged(run_dir, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="staging_dir"):
        stage_run(run_dir, tmp_path / "other")
    with pytest.raises(ValueError, match="staging_dir"):
        stage_run(run_dir, tmp_path / "other", overwrite=True)
    stage_run(run_dir, tmp_path / "s")
    with pytest.raises(ValueError, match="overwrite"):
        stage_run(run_dir, tmp_path / "s")
    assert set(stage_run(run_dir, tmp_path / "s", overwrite=True)) == {"model", "instructions"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_bad_run_folders(tmp_path):
    with pytest.raises(ValueError, match="run_dir"):
        stage_run(tmp_path / "nope", tmp_path / "s")
    with pytest.raises(ValueError, match="not a training run"):
        stage_run(tmp_path, tmp_path / "s")
    (tmp_path / "run_info.json").write_text("{}")
    with pytest.raises(ValueError, match="model/"):
        push_run(tmp_path, "alice/x", api=mock.MagicMock())


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "/name", "user/", "us er/name", "a/--b", 3, None])
def test_bad_repo_ids_raise(run_dir, repo_id):
    with pytest.raises(ValueError, match="repo_id"):
        push_run(run_dir, repo_id, api=mock.MagicMock())
    with pytest.raises(ValueError, match="repo_id"):
        validate_repo_id(repo_id)


def test_bad_dataset_repo_id_raises(run_dir):
    api = mock.MagicMock()
    with pytest.raises(ValueError, match="dataset_repo_id"):
        push_run(run_dir, "alice/ok", dataset_repo_id="bad id", api=api)
    api.create_repo.assert_not_called()


def _mock_api():
    from huggingface_hub import HfApi

    api = mock.MagicMock(spec=HfApi)
    seen: list[dict] = []

    def upload_folder(*, folder_path, repo_id, repo_type, commit_message, **kwargs):
        folder = Path(folder_path)
        seen.append({"repo_id": repo_id, "repo_type": repo_type, "files": _files(folder),
                     "card": (folder / "README.md").read_text(encoding="utf-8"), "message": commit_message})
        if repo_type == "model":  # the folder really is loadable at upload time
            from transformers import AutoTokenizer

            assert type(AutoTokenizer.from_pretrained(folder, trust_remote_code=True)).__name__ == "LocationTokenizer"
        return mock.MagicMock(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    api.upload_folder.side_effect = upload_folder
    return api, seen


def test_push_builds_the_right_operations(run_dir):
    api, seen = _mock_api()
    summary = push_run(run_dir, "alice/qtmob-demo", private=True, api=api, commit_message="first push")
    assert api.create_repo.call_args_list == [
        mock.call("alice/qtmob-demo", repo_type="model", private=True, exist_ok=True),
        mock.call("alice/qtmob-demo-instructions", repo_type="dataset", private=True, exist_ok=True),
    ]
    assert [(s["repo_id"], s["repo_type"], s["message"]) for s in seen] == [
        ("alice/qtmob-demo", "model", "first push"), ("alice/qtmob-demo-instructions", "dataset", "first push")]
    model_files, data_files = seen[0]["files"], seen[1]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "rqvae/config.json", "README.md"} <= model_files
    assert not any(f.startswith(("checkpoint-", "adapter/", "base_model/")) for f in model_files)
    assert "hf_mobility.json" in data_files and any(f.startswith("data/") and f.endswith(".parquet")
                                                    for f in data_files)
    assert "alice/qtmob-demo-instructions" in seen[0]["card"]
    assert summary["model"]["repo_id"] == "alice/qtmob-demo"
    assert set(summary["model"]["files"]) == model_files
    assert summary["model"]["commit_url"].startswith("https://huggingface.co/alice/qtmob-demo/")
    assert summary["instructions"]["repo_type"] == "dataset"
    assert set(summary["instructions"]["files"]) == data_files


def test_push_with_explicit_dataset_repo_id(run_dir):
    api, seen = _mock_api()
    summary = push_run(run_dir, "alice/m", dataset_repo_id="bob/nyc-instructions", api=api)
    assert api.create_repo.call_args_list[1] == mock.call("bob/nyc-instructions", repo_type="dataset",
                                                          private=False, exist_ok=True)
    assert summary["instructions"]["repo_id"] == "bob/nyc-instructions"
    assert "bob/nyc-instructions" in seen[0]["card"]


def test_push_connection_error_becomes_value_error(run_dir):
    import httpx2

    api, _ = _mock_api()
    api.create_repo.side_effect = httpx2.ConnectError("[Errno 111] Connection refused")
    with pytest.raises(ValueError, match="Hub could not be reached.*HF_HUB_OFFLINE"):
        push_run(run_dir, "alice/m", api=api)
    api.upload_folder.assert_not_called()


def test_push_with_real_api_offline_gives_clear_error(run_dir, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # a closed loopback port as endpoint: even if offline mode were ignored, nothing leaves this machine
    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_dummy")
    with pytest.raises(ValueError, match="Hub could not be reached") as info:
        push_run(run_dir, "alice/qtmob-demo", api=api)
    assert isinstance(info.value.__cause__, OfflineModeIsEnabled)
    assert "HF_HUB_OFFLINE" in str(info.value)
