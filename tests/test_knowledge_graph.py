"""The M3ob spatial-temporal knowledge graph (dataset_builders/knowledge_graph.py): activity mappers, exact triple
extraction on a hand-made dataset, writing and loading, TransE and the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from dataset_builders.knowledge_graph import (
    ACTIVITY_TYPES,
    KnowledgeGraph,
    activities_from_encoder,
    activities_from_llm,
    activities_from_table,
    build_knowledge_graph,
    compare_activity_mappings,
    format_summary,
    load_knowledge_graph,
    load_transe,
    location_embeddings,
    main,
    parse_activity,
    save_transe,
    train_transe,
    write_knowledge_graph,
)
from dataset_builders.publish import write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H = 3600
DAY = 86400  # day 0 (1970-01-01) is a Thursday: days 2 and 3 are Saturday and Sunday


def _checkins(rows) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r[0] for r in rows], pa.string()),
        "location_id": pa.array([r[1] for r in rows], pa.string()),
        "timestamp": pa.array([r[2] for r in rows], pa.int64()),
        "tz_offset_min": pa.array([r[3] if len(r) > 3 else 0 for r in rows], pa.int16()),
        "latitude": pa.array([40.0] * len(rows)),
        "longitude": pa.array([-73.0] * len(rows)),
    })


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Five locations (L4 without a category, L5 held out and never visited in train), two train users."""
    locations = pa.table({
        "location_id": ["L1", "L2", "L3", "L4", "L5"],
        "latitude": [40.0] * 5,
        "longitude": [-73.0] * 5,
        "category": ["Cafe", "Office", "Park", None, "Cafe"],
        "heldout": [False, False, False, False, True],
    })
    train = _checkins([  # deliberately not in time order
        ("u1", "L3", 20 * H),  # weekday evening; 10.5 h after L2 -> transition L2 -> L3
        ("u1", "L1", 8 * H),  # weekday morning
        ("u2", "L4", 3 * H, 360),  # local 09:00 (UTC night): weekday morning
        ("u1", "L2", 9 * H),  # weekday morning; L1 -> L2
        ("u1", "L2", int(9.5 * H)),  # same slot again (one visit triple); L2 -> L2 dropped
        ("u1", "L1", 2 * DAY + 14 * H),  # Saturday afternoon; 42 h after L3: no transition
        ("u2", "L1", 5 * H, 360),  # local 11:00: weekday morning; L4 -> L1 (2 h)
        ("u2", "L1", 3 * DAY + 23 * H),  # Sunday evening; gap > 24 h
    ])
    validation = _checkins([("u3", "L3", 4 * DAY + 8 * H), ("u1", "L5", 4 * DAY + 9 * H)])
    test = _checkins([("u1", "L3", 5 * DAY + 2 * H), ("u2", "L5", 5 * DAY + 3 * H)])
    out = tmp_path_factory.mktemp("toy") / "data"
    write_dataset(out, {"checkins": {"train": train, "validation": validation, "test": test},
                        "locations": {"train": locations}}, metadata={"kind": "checkins", "day0_weekday": 3})
    return out


TOY_ACTIVITIES = {"Cafe": "dining", "Office": "working", "Park": "exercising"}


@pytest.fixture(scope="module")
def toy_kg(toy_dir):
    return build_knowledge_graph(toy_dir, TOY_ACTIVITIES)


def _fake_encoder(texts):
    """Deterministic bag-of-letters vectors: no model needed."""
    out = np.zeros((len(texts), 26), dtype=np.float32)
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out + 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# triples


def test_exact_triples(toy_kg):
    got = set(zip(*(toy_kg.triples.column(c).to_pylist() for c in ("head_name", "relation_name", "tail_name"))))
    expected = {
        ("location:L1", "has_category", "category:Cafe"),
        ("location:L2", "has_category", "category:Office"),
        ("location:L3", "has_category", "category:Park"),
        ("location:L5", "has_category", "category:Cafe"),  # held out, never visited: still has its category
        ("category:Cafe", "functionality", "activity:dining"),
        ("category:Office", "functionality", "activity:working"),
        ("category:Park", "functionality", "activity:exercising"),
        ("user:u1", "visit@weekday_morning", "location:L1"),
        ("user:u1", "visit@weekday_morning", "location:L2"),
        ("user:u2", "visit@weekday_morning", "location:L4"),
        ("user:u2", "visit@weekday_morning", "location:L1"),
        ("user:u1", "visit@weekday_evening", "location:L3"),
        ("user:u1", "visit@weekend_afternoon", "location:L1"),
        ("user:u2", "visit@weekend_evening", "location:L1"),
        ("location:L1", "transition", "location:L2"),
        ("location:L2", "transition", "location:L3"),
        ("location:L4", "transition", "location:L1"),
    }
    assert got == expected
    assert toy_kg.triples.num_rows == len(expected)  # no duplicates
    assert "user:u3" not in toy_kg.entity_names  # a user seen only in validation is no entity


def test_validation_and_test_checkins_add_nothing(toy_dir, toy_kg, tmp_path):
    from dataset_builders.publish import load_prepared

    data = load_prepared(toy_dir)
    empty = data.table("checkins", "validation").slice(0, 0)
    bare = write_dataset(tmp_path / "bare", {
        "checkins": {"train": data.table("checkins", "train"), "validation": empty, "test": empty},
        "locations": {"train": data.table("locations")},
    }, metadata=data.metadata)
    kg = build_knowledge_graph(bare, TOY_ACTIVITIES)
    assert kg.triples.equals(toy_kg.triples) and kg.entities.equals(toy_kg.entities)


def test_entities_relations_and_summary(toy_kg):
    ents = toy_kg.entities.to_pandas()
    assert ents["entity_id"].tolist() == list(range(len(ents)))
    assert ents["name"].tolist()[:7] == ["location:L1", "location:L2", "location:L3", "location:L4", "location:L5",
                                         "user:u1", "user:u2"]
    assert ents.loc[ents["type"] == "activity", "name"].tolist() == [f"activity:{a}" for a in ACTIVITY_TYPES]
    triples = toy_kg.triples.to_pandas()
    assert (ents["name"].to_numpy()[triples["head"]] == triples["head_name"]).all()
    assert (ents["name"].to_numpy()[triples["tail"]] == triples["tail_name"]).all()
    rel = toy_kg.relations.to_pandas()
    assert rel["name"].tolist() == ["has_category", "functionality",
                                    *[f"visit@{d}_{p}" for d in ("weekday", "weekend")
                                      for p in ("night", "morning", "afternoon", "evening")], "transition"]
    summary = toy_kg.summary()
    assert summary["entities"] == {"location": 5, "user": 2, "category": 3, "activity": 12}
    assert summary["triples"]["transition"] == 3 and summary["triples"]["visit@weekday_night"] == 0
    counts = summary["counts"]
    assert counts["locations_without_category"] == 1
    assert counts["transition_pairs_same_location"] == 1
    assert counts["transition_pairs_over_max_gap"] == 2


def test_build_options_and_errors(toy_dir, tmp_path):
    kg = build_knowledge_graph(toy_dir, TOY_ACTIVITIES, split_weekend=False, max_transition_gap_hours=None,
                               time_slots=[("day", 0)])
    rels = kg.summary()["triples"]
    assert list(rels) == ["has_category", "functionality", "visit@day", "transition"]
    assert rels["visit@day"] == 5 and rels["transition"] == 4  # + L3 -> L1 (42 h); L1 -> L1 still dropped
    with pytest.raises(ValueError, match="does not map 1 of the 3 categories"):
        build_knowledge_graph(toy_dir, {"Cafe": "dining", "Office": "working"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_knowledge_graph(toy_dir, {**TOY_ACTIVITIES, "Park": "picnicking"})
    with pytest.raises(ValueError, match="start at hour 0"):
        build_knowledge_graph(toy_dir, TOY_ACTIVITIES, time_slots=[("am", 6), ("pm", 12)])
    grid = tmp_path / "grid"
    write_dataset(grid, {"grid": {"train": pa.table({"uid": [1]})}}, metadata={"kind": "grid"})
    with pytest.raises(ValueError, match="grid"):
        build_knowledge_graph(grid, TOY_ACTIVITIES)


def test_write_load_round_trip(toy_kg, tmp_path):
    out = write_knowledge_graph(toy_kg, tmp_path / "kg")
    back = load_knowledge_graph(out)
    for name in ("entities", "relations", "triples", "activities"):
        assert getattr(back, name).equals(getattr(toy_kg, name)), name
    assert back.metadata == toy_kg.metadata
    card = (out / "README.md").read_text()
    assert "hf-mobility choice" in card and "| user | 2 |" in card

    import datasets

    triples = datasets.load_dataset(str(out), "triples", split="train")
    assert triples.num_rows == toy_kg.triples.num_rows
    assert set(triples.column_names) >= {"head", "relation", "tail", "head_name", "relation_name", "tail_name"}


# ---------------------------------------------------------------------------------------------------------------------
# activity mappers


def test_table_mapper(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("category,activity\nCafe,Dining\nOffice,working\nUnused,home\n")
    got = activities_from_table(["Office", "Cafe", None, "Cafe"], good)
    assert got.to_dict("list") == {"category": ["Cafe", "Office"], "activity": ["dining", "working"],
                                   "source": ["table", "table"]}
    bad = tmp_path / "bad.csv"
    bad.write_text("category,activity\nCafe,dining\nOffice,napping\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: unknown activity 'napping'"):
        activities_from_table(["Cafe"], bad)
    with pytest.raises(ValueError, match=r"does not map 2 of 3 categories, e.g. \['Museum', 'Zoo'\]"):
        activities_from_table(["Cafe", "Zoo", "Museum"], good)


def test_encoder_mapper_and_comparison():
    cats = ["Coffee Shop", "Office", "Park", "Subway", None, ""]
    fake = activities_from_encoder(cats, _fake_encoder)
    assert fake["category"].tolist() == ["Coffee Shop", "Office", "Park", "Subway"]
    assert set(fake["activity"]) <= set(ACTIVITY_TYPES) and set(fake["source"]) == {"encoder"}
    real = activities_from_encoder(cats, embedding_cache=False)  # all-MiniLM-L6-v2, shipped offline
    assert dict(zip(real["category"], real["activity"])) == {
        "Coffee Shop": "dining", "Office": "working", "Park": "exercising", "Subway": "transit",
    }
    cmp = compare_activity_mappings(real, {**dict(zip(real["category"], real["activity"])), "Park": "home",
                                           "Zoo": "exercising"})
    assert cmp["categories"] == 4 and cmp["agreeing"] == 3 and cmp["agreement"] == 0.75
    assert cmp["disagreements"] == [{"category": "Park", "a": "exercising", "b": "home"}]
    assert cmp["confusion"] == [{"a": "exercising", "b": "home", "count": 1}]
    assert cmp["only_in_b"] == ["Zoo"] and cmp["only_in_a"] == []


def test_parse_activity():
    assert parse_activity(" Dining.") == "dining"
    assert parse_activity("shopping or maybe dining") == "shopping"  # the first named in the answer
    assert parse_activity("WORKING") == "working"
    assert parse_activity("homework") is None and parse_activity("") is None
    assert parse_activity("staying at home", {"staying_home": "x", "home": "y"}) == "home"
    assert parse_activity("staying home", {"staying_home": "x", "home": "y"}) == "staying_home"


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenization_mobility import build_bpe_tokenizer
    from train.sft import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE

    corpus = [f"{n}: {d}" for n, d in ACTIVITY_TYPES.items()] * 3 + ["Coffee Shop Office Park Museum Cafe"] * 3
    tok = build_bpe_tokenizer(corpus, vocab_size=300, special_tokens=CHAT_SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval(), tok


class CountingAnswers:
    """Stands in for `train.humob.generate_answers` (which the mapper imports when it runs): counts the batches it is
    asked for, answers 'Dining.' (a valid answer) for prompts about a category whose name holds 'Cafe', and the real
    greedy answer of the model otherwise."""

    def __init__(self):
        import train.humob

        self.real, self.calls = train.humob.generate_answers, 0

    def __call__(self, model, tokenizer, prompts, *, batch_size=16, **kwargs):
        answers = []
        for lo in range(0, len(prompts), batch_size):
            chunk = list(prompts[lo:lo + batch_size])
            self.calls += 1
            real = self.real(model, tokenizer, chunk, batch_size=batch_size, **kwargs)
            texts = [p if isinstance(p, str) else " ".join(m["content"] for m in p) for p in chunk]
            answers += ["Dining." if 'category: "Cafe' in t else a for t, a in zip(texts, real)]
        return answers


def test_llm_mapper_counts_and_cache(tiny_lm, tmp_path, monkeypatch):
    import train.humob

    model, tok = tiny_lm
    counting = CountingAnswers()
    monkeypatch.setattr(train.humob, "generate_answers", counting)
    cats = ["Cafe", "Cafe Bar", "Office", "Park", "Office"]
    cache = tmp_path / "answers.json"
    fallback = {"Office": "working", "Park": "exercising", "Cafe": "shopping", "Cafe Bar": "nightlife"}
    first, stats = activities_from_llm(cats, (model, tok), cache_path=cache, fallback=fallback, batch_size=2,
                                       progress=False, return_stats=True, model_key="tiny")
    assert set(first["activity"]) <= set(ACTIVITY_TYPES)
    got = dict(zip(first["category"], zip(first["activity"], first["source"])))
    assert got["Cafe"] == ("dining", "llm") and got["Cafe Bar"] == ("dining", "llm")
    assert stats["categories"] == 4 and stats["asked"] == 4 and stats["cached"] == 0
    assert stats["valid"] + stats["invalid"] == 4 and stats["valid"] >= 2 and stats["invalid"] >= 1
    for category in stats["invalid_answers"]:  # invalid answers fall back and are counted
        assert got[category] == (fallback[category], "fallback")
    assert counting.calls == 2
    content = json.loads(cache.read_text())
    (key,) = content["answers"]
    assert key.startswith("tiny|prompt:") and set(content["answers"][key]) == {"Cafe", "Cafe Bar", "Office", "Park"}

    again, stats2 = activities_from_llm(cats, (model, tok), cache_path=cache, fallback=fallback, progress=False,
                                        return_stats=True, model_key="tiny")
    assert counting.calls == 2  # nothing asked the second time
    assert stats2["asked"] == 0 and stats2["cached"] == 4 and stats2["invalid"] == stats["invalid"]
    pd.testing.assert_frame_equal(first, again)

    # a new category asks only for that one; the default fallback is the encoder mapping
    _, stats3 = activities_from_llm([*cats, "Museum"], (model, tok), cache_path=cache, progress=False,
                                    return_stats=True, model_key="tiny", encoder=_fake_encoder)
    assert counting.calls == 3 and stats3["asked"] == 1 and stats3["cached"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# TransE


def _cluster_graph(clusters: int = 4, size: int = 8) -> KnowledgeGraph:
    """Entities in clusters; relation 0 links every ordered pair within a cluster, relation 1 is unused."""
    n = clusters * size
    heads, tails = [], []
    for c in range(clusters):
        members = range(c * size, (c + 1) * size)
        heads += [h for h in members for t in members if h != t]
        tails += [t for h in members for t in members if h != t]
    names = [f"location:p{i}" for i in range(n)]
    return KnowledgeGraph(
        entities=pa.table({"entity_id": pa.array(range(n), pa.int64()), "name": names, "type": ["location"] * n}),
        relations=pa.table({"relation_id": pa.array([0, 1], pa.int64()), "name": ["near", "unused"]}),
        triples=pa.table({"head": pa.array(heads, pa.int64()), "relation": pa.array([0] * len(heads), pa.int64()),
                          "tail": pa.array(tails, pa.int64()), "head_name": [names[h] for h in heads],
                          "relation_name": ["near"] * len(heads), "tail_name": [names[t] for t in tails]}),
        activities=pa.table({"category": pa.array([], pa.string()), "activity": pa.array([], pa.string()),
                             "source": pa.array([], pa.string())}),
    )


@pytest.fixture(scope="module")
def cluster_transe():
    kg = _cluster_graph()
    return kg, train_transe(kg, embedding_dim=16, epochs=60, batch_size=64, test_fraction=0.2, seed=0,
                            progress=False)


def test_transe_learns_structure(cluster_transe):
    kg, result = cluster_transe
    assert result.history[-1] < 0.5 * result.history[0]
    m = result.metrics
    assert m["test_triples"] == round(0.2 * kg.triples.num_rows)
    # a symmetric relation collapses each cluster (r ~ 0), so the true tail ranks at random among its cluster's 8
    # entities: Hits@10 near 1 and MRR near 1/8 * (1 + 1/2 + ... + 1/8) ~ 0.34 at best
    assert m["transe"]["hits@10"] > 0.9 > 0.5 > m["random"]["hits@10"]
    assert m["transe"]["mrr"] > 1.5 * m["random"]["mrr"]
    assert m["transe"]["mean_rank"] < m["random"]["mean_rank"]
    assert result.entity_embeddings.shape == (32, 16) and result.entity_embeddings.dtype == np.float32
    assert result.relation_embeddings.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(result.entity_embeddings, axis=1), 1.0, rtol=1e-5)  # as scored
    again = train_transe(kg, embedding_dim=16, epochs=2, batch_size=64, test_fraction=0.0, progress=False)
    assert again.metrics == {} and len(again.history) == 2


def test_transe_save_load_and_location_embeddings(cluster_transe, tmp_path):
    kg, result = cluster_transe
    folder = save_transe(result, tmp_path / "transe")
    save_transe(result, folder)  # replaces its own folder
    back = load_transe(folder)
    np.testing.assert_array_equal(back.entity_embeddings, result.entity_embeddings)
    np.testing.assert_array_equal(back.relation_embeddings, result.relation_embeddings)
    assert back.entity_names == result.entity_names and back.metrics == result.metrics
    assert back.history == result.history
    vectors = location_embeddings(kg, back, ["p5", "p0", "p5"])
    np.testing.assert_array_equal(vectors, result.entity_embeddings[[5, 0, 5]])
    with pytest.raises(ValueError, match=r"2 location ids .* \['nowhere', 'p99'\]"):
        location_embeddings(kg, back, ["p1", "nowhere", "p99"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_transe(result, tmp_path / "other")


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_main_on_small_city(small_city_dir, tmp_path, capsys):
    from dataset_builders.publish import load_prepared

    categories = load_prepared(small_city_dir).table("locations").column("category").to_pylist()
    table = tmp_path / "acts.csv"
    pd.DataFrame({"category": sorted({c for c in categories if c}), "activity": "errands"}).to_csv(table, index=False)
    out = tmp_path / "kg"
    from train.cli import main as cli_main

    summary = main(["--data", str(small_city_dir), "--out", str(out), "--activities", str(table),
                    "--transe-epochs", "3", "--embedding-dim", "8"])
    printed = format_summary(summary)
    assert "entities" in printed and "TransE" in printed
    kg = load_knowledge_graph(out)
    assert summary["knowledge_graph"] == kg.summary()
    assert set(kg.activities.column("activity").to_pylist()) == {"errands"}
    locations = load_prepared(small_city_dir).table("locations").to_pandas()
    vectors = location_embeddings(kg, load_transe(out / "transe"), locations["location_id"])
    assert vectors.shape == (len(locations), 8)
    # inductive hold-out: held-out locations are entities with a category, but nobody visits them in the graph
    held = {f"location:{v}" for v in locations.loc[locations["heldout"], "location_id"]}
    triples = kg.triples.to_pandas()
    assert held and held <= set(triples.loc[triples["relation_name"] == "has_category", "head_name"])
    assert not held & set(triples.loc[triples["relation_name"] != "has_category", ["head_name", "tail_name"]]
                          .to_numpy().ravel())
    assert summary["transe"]["metrics"]["transe"]["mrr"] > 0
    # the public command prints the same summary
    capsys.readouterr()
    assert cli_main(["-q", "data", "kg", "--data", str(small_city_dir), "--out", str(tmp_path / "kg2"), "--activities",
                     str(table), "--transe-epochs", "2", "--embedding-dim", "8"]) == 0
    assert "triples per relation" in capsys.readouterr().out and (tmp_path / "kg2" / "transe").is_dir()
