"""M3ob (modeling_mobility/m3ob): the kNN relational graph, the GCN branches and gated fusion, the contrastive
alignment, the multi-task loss, and save/load (also through `trust_remote_code` in a fresh process)."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_mobility.m3ob import (
    M3obConfig,
    M3obForNextLocation,
    build_knn_graph,
    symmetric_info_nce,
    time_ids_from_timestamps,
)

NUM_LOCATIONS, NUM_USERS, KG_DIM, IMAGE_DIM, NUM_CATEGORIES, NUM_ACTIVITIES = 30, 3, 8, 12, 4, 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> M3obConfig:
    values = dict(
        location_ids=[f"loc{i}" for i in range(NUM_LOCATIONS)],
        user_ids=[f"user{i}" for i in range(NUM_USERS)],
        num_categories=NUM_CATEGORIES,
        num_activities=NUM_ACTIVITIES,
        kg_embedding_dim=KG_DIM,
        image_feature_dim=IMAGE_DIM,
        hidden_size=16,
        num_gcn_layers=2,
        num_neighbors=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    values.update(overrides)
    return M3obConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> M3obForNextLocation:
    torch.manual_seed(seed)
    model = M3obForNextLocation(tiny_config(**overrides))
    g = torch.Generator().manual_seed(7)
    model.set_graph(torch.randn(NUM_LOCATIONS, KG_DIM, generator=g))
    if model.config.use_image:
        model.set_image_features(torch.randn(NUM_LOCATIONS, IMAGE_DIM, generator=g))
    if model.config.num_categories:
        categories = torch.randint(-1, NUM_CATEGORIES, (NUM_LOCATIONS,), generator=g)
        model.set_location_categories(categories, torch.tensor([0, 2, -1, 1]))
    return model.eval()


def random_batch(batch: int = 4, length: int = 6, seed: int = 0, lengths=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths) if lengths is not None else torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    times = torch.stack([torch.randint(0, n, (batch, length), generator=g) for n in (24, 4, 7)], dim=-1)
    return {
        "input_ids": torch.randint(0, NUM_LOCATIONS, (batch, length), generator=g) * mask,
        "attention_mask": mask,
        "time_ids": times * mask[..., None],
        "user_ids": torch.randint(0, NUM_USERS + 1, (batch,), generator=g),
        "target_time_ids": torch.stack([torch.randint(0, n, (batch,), generator=g) for n in (24, 4, 7)], dim=-1),
    }


# the relational graph


def brute_force_knn(embeddings: np.ndarray, k: int) -> dict[tuple[int, int], float]:
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    edges: dict[tuple[int, int], float] = {}
    for i in range(len(x)):
        for j in np.argsort(-similarity[i], kind="stable")[:k]:
            w = max(float(similarity[i, j]), 0.0)
            for edge in ((i, int(j)), (int(j), i)):
                edges[edge] = max(edges.get(edge, -1.0), w)
    return edges


@pytest.mark.parametrize("num_nodes,k", [(37, 5), (6, 10)])
def test_knn_graph_equals_brute_force_and_ignores_chunk_size(num_nodes, k):
    embeddings = np.random.default_rng(3).normal(size=(num_nodes, 7))
    expected = brute_force_knn(embeddings, min(k, num_nodes - 1))
    results = [build_knn_graph(torch.tensor(embeddings, dtype=torch.float32), k, chunk_size=c) for c in (1, 5, None)]
    for edge_index, edge_weight in results:
        assert edge_index.dtype == torch.long and edge_weight.dtype == torch.float32
        assert edge_index.shape == (2, len(expected)) and edge_weight.shape == (len(expected),)
        assert not bool((edge_index[0] == edge_index[1]).any())  # no self loops
        got = {(int(s), int(t)): float(w) for (s, t), w in zip(edge_index.t(), edge_weight)}
        assert got.keys() == expected.keys()  # symmetric union of both directions
        np.testing.assert_allclose([got[e] for e in expected], list(expected.values()), atol=1e-5)
        assert bool((edge_weight >= 0).all())
    for edge_index, edge_weight in results[1:]:  # identical whatever the chunking
        assert torch.equal(edge_index, results[0][0]) and torch.equal(edge_weight, results[0][1])


def test_knn_graph_edge_cases():
    edge_index, edge_weight = build_knn_graph(torch.randn(1, 4), 3)
    assert edge_index.shape == (2, 0) and edge_weight.shape == (0,)
    # opposite vectors: similarity -1 clipped to weight 0
    edge_index, edge_weight = build_knn_graph(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), 1)
    assert edge_index.tolist() == [[0, 1], [1, 0]] and edge_weight.tolist() == [0.0, 0.0]
    for bad in (torch.randn(3), torch.full((3, 2), float("nan"))):
        with pytest.raises(ValueError, match="embeddings"):
            build_knn_graph(bad, 2)
    with pytest.raises(ValueError, match="num_neighbors"):
        build_knn_graph(torch.randn(4, 2), 0)


def test_gcn_layer_is_the_normalised_weighted_propagation():
    model = tiny_model()
    n = NUM_LOCATIONS
    adjacency = torch.zeros(n, n)
    adjacency[model.edge_index[1], model.edge_index[0]] = model.edge_weight  # messages flow source -> target
    adjacency = adjacency + torch.eye(n)  # self-loops of weight 1
    d = adjacency.sum(1).rsqrt()
    conv = model.id_encoder.convs[0]
    x = torch.randn(n, 16)
    expected = d[:, None] * adjacency * d[None, :] @ conv.lin(x) + conv.bias
    torch.testing.assert_close(conv(x, model.edge_index, model.edge_weight), expected, rtol=1e-5, atol=1e-5)


# fusion and alignment


def test_gate_lies_in_the_unit_interval_and_a_saturated_gate_selects_one_branch():
    model = tiny_model()
    with torch.no_grad():
        nodes = model.node_representations()
        assert nodes.gate.shape == (NUM_LOCATIONS, 16)
        assert bool(((nodes.gate > 0) & (nodes.gate < 1)).all())
        torch.testing.assert_close(
            nodes.fused, F.layer_norm(nodes.mixed + nodes.id_embeddings + nodes.image_inputs, (16,),
                                      model.fusion_norm.weight, model.fusion_norm.bias, model.config.layer_norm_eps))
        id_only = model.id_encoder(model.location_embeddings.weight, model.edge_index, model.edge_weight)
        image_only = model.image_encoder(model.image_projection(model.image_features), model.edge_index,
                                         model.edge_weight)
        model.gate_proj.weight.zero_()
        for bias, branch in ((50.0, id_only), (-50.0, image_only)):
            model.gate_proj.bias.fill_(bias)
            nodes = model.node_representations()
            torch.testing.assert_close(nodes.mixed, branch, rtol=0, atol=1e-6)
        out = model(**random_batch())
        assert torch.allclose(out.gate, torch.zeros(NUM_LOCATIONS))  # mean gate, per location (all image now)


def test_symmetric_info_nce_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    scale = math.log(2.0)
    na = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    r = 1 / math.sqrt(2)
    nb = [[1.0, 0.0], [r, r], [0.0, -1.0]]
    logits = [[2.0 * sum(x * y for x, y in zip(u, v)) for v in nb] for u in na]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(z) for z in rows[i])) for i in range(3)) / 3

    columns = [list(col) for col in zip(*logits)]
    expected = 0.5 * (ce(logits) + ce(columns))
    assert symmetric_info_nce(a, b, scale).item() == pytest.approx(expected, rel=1e-6)
    assert symmetric_info_nce(a, b, torch.tensor(scale)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        symmetric_info_nce(a, b[:2], scale)


def test_alignment_uses_the_batch_locations_while_training_only():
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch, labels = random_batch(), torch.tensor([1, 2, 3, -100])
    model.train()
    out = model(**batch, labels=labels)
    with torch.no_grad():
        nodes = model.node_representations()
        locations = torch.unique(torch.cat([batch["input_ids"][batch["attention_mask"].bool()], labels[:3]]))
        image = model.image_alignment_proj(nodes.image_hidden[locations])
        kg = model.kg_alignment_proj(model.kg_embeddings[locations])
        expected = symmetric_info_nce(image, kg, math.log(1 / 0.07))
    torch.testing.assert_close(out.alignment_loss, expected)
    total = (out.location_loss + 0.2 * (out.category_loss + out.activity_loss + out.time_loss)
             + 0.1 * out.alignment_loss)
    torch.testing.assert_close(out.loss, total)
    model.eval()
    assert model(**batch, labels=labels).alignment_loss is None
    # the learnable log-scale is clamped at log(100)
    with torch.no_grad():
        model.alignment_logit_scale.fill_(10.0)
        capped = model.alignment_loss(nodes, locations)
    torch.testing.assert_close(capped, symmetric_info_nce(image, kg, math.log(100.0)))


# outputs and losses


def test_output_shapes_and_derived_labels():
    model = tiny_model()
    batch = random_batch(batch=4, length=6)
    labels = torch.tensor([0, 5, 11, -100])
    mask = torch.ones(NUM_LOCATIONS, dtype=torch.bool)
    mask[5] = False
    model.set_candidate_mask(mask)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (4, NUM_LOCATIONS) and bool(torch.isinf(out.logits[:, 5]).all())
    assert out.category_logits.shape == (4, NUM_CATEGORIES) and out.activity_logits.shape == (4, NUM_ACTIVITIES)
    assert out.time_logits.shape == (4, 24) and out.query.shape == (4, 16) and out.gate.shape == (NUM_LOCATIONS,)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # labels derived from the location: category, its activity, the target hour
    categories = model.location_categories[labels.clamp_min(0)]
    categories[3] = -1
    category_labels = torch.where(categories >= 0, categories, -100)
    activities = torch.where(categories >= 0, model.category_activities[categories.clamp_min(0)], -1)
    activity_labels = torch.where(activities >= 0, activities, -100)
    hour_labels = batch["target_time_ids"][:, 0].clone()
    hour_labels[3] = -100
    location_labels = torch.tensor([0, -100, 11, -100])  # 5 is not a candidate
    for got, logits, target in ((out.location_loss, out.logits, location_labels),
                                (out.category_loss, out.category_logits, category_labels),
                                (out.activity_loss, out.activity_logits, activity_labels),
                                (out.time_loss, out.time_logits, hour_labels)):
        keep = target != -100
        expected = F.cross_entropy(logits[keep], target[keep]) if keep.any() else torch.tensor(0.0)
        torch.testing.assert_close(got, expected)
    assert out.alignment_loss is None  # eval mode
    # weekday x hour time slots
    slots = tiny_model(num_time_slots=168)(**batch, labels=labels)
    assert slots.time_logits.shape == (4, 168)
    target = batch["target_time_ids"][:3, 2] * 24 + batch["target_time_ids"][:3, 0]
    torch.testing.assert_close(slots.time_loss, F.cross_entropy(slots.time_logits[:3], target))
    assert len(model(**batch, return_dict=False)) == 6  # logits (4 heads), gate, query


def test_padding_does_not_change_the_prediction():
    model = tiny_model()
    batch = random_batch(batch=3, length=5, lengths=[5, 5, 5])
    with torch.no_grad():
        reference = model(**batch).logits
        for pad, side in ((3, "right"), (2, "left")):
            padded = {}
            for key in ("input_ids", "time_ids", "attention_mask"):
                value = batch[key]
                filler = torch.full((3, pad, *value.shape[2:]), 0 if key == "attention_mask" else 1, dtype=value.dtype)
                padded[key] = torch.cat([value, filler] if side == "right" else [filler, value], dim=1)
            padded.update(user_ids=batch["user_ids"], target_time_ids=batch["target_time_ids"])
            torch.testing.assert_close(model(**padded).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"image_feature_dim": 0, "modalities": ["id"]}, {"fusion": "sum"}, {"alignment_weight": 0.0},
     {"num_categories": 0, "num_activities": 0, "num_time_slots": 0, "use_target_time": True}],
    ids=["full", "id-only", "sum", "no-alignment", "location-only"],
)
def test_variants_train(overrides):
    model = tiny_model(**overrides).train()
    batch = random_batch()
    out = model(**batch, labels=torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
    assert (out.alignment_loss is not None) == model.config.use_alignment
    assert (out.gate is not None) == (model.config.use_image and model.config.fusion == "gate")
    if not model.config.use_image:
        assert model.image_features is None and model.image_projection is None
        with pytest.raises(ValueError, match="image modality"):
            model.set_image_features(torch.randn(NUM_LOCATIONS, IMAGE_DIM))
    if not model.config.use_alignment:
        assert model.alignment_logit_scale is None and not any("alignment" in k for k in model.state_dict())


def test_loss_falls_on_a_learnable_task():
    """The next location is a function of the last one: (last + 1) mod N."""
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    batch = random_batch(batch=32, length=5, seed=1)
    last = batch["input_ids"].gather(1, (batch["attention_mask"].sum(1, keepdim=True) - 1)).squeeze(1)
    labels = (last + 1) % NUM_LOCATIONS
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.location_loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_fused_location_embeddings_and_prepare_inputs():
    model = tiny_model()
    fused = model.fused_location_embeddings()
    assert fused.shape == (NUM_LOCATIONS, 16) and not fused.requires_grad
    batch = model.prepare_inputs([["loc1", "loc2"], ["loc3"]], [[1333263600, 1333267200], [1333263600]],
                                 [1333270800, 1333270800], users=["user1", "stranger"])
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["user_ids"].tolist() == [2, 0]  # row 0 is the unknown user
    assert batch["time_ids"][0].tolist() == [[7, 0, 6], [8, 0, 6]]  # 2012-04-01 07:00 and 08:00 UTC, a Sunday
    assert time_ids_from_timestamps([1333270800 + 20 * 60], 60).tolist() == [[10, 1, 6]]  # 09:20 UTC + 1 h
    with pytest.raises(ValueError, match="not in the model's location vocabulary"):
        model.prepare_inputs([["nowhere"]], [[0]], [0])


# save and load


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    mask = torch.ones(NUM_LOCATIONS, dtype=torch.bool)
    mask[[2, 9]] = False
    model.set_candidate_mask(mask)
    batch = random_batch()
    with torch.no_grad():
        expected = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = M3obForNextLocation.from_pretrained(tmp_path).eval()
    assert loaded.config.num_edges == model.config.num_edges == model.edge_index.shape[1] > 0
    assert loaded.config.location_ids == model.config.location_ids and loaded.config.user_ids == model.config.user_ids
    for name in ("kg_embeddings", "image_features", "edge_index", "edge_weight", "location_categories",
                 "category_activities", "candidate_mask"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    with torch.no_grad():
        got = loaded(**batch)
    for key in ("logits", "category_logits", "activity_logits", "time_logits", "gate"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_initialisation_also_of_keys_missing_from_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = ["id_encoder.convs.0.lin.weight", "id_encoder.convs.0.bias", "alignment_logit_scale",
               "gate_proj.weight", "user_embeddings.weight"]
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded, info = M3obForNextLocation.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped)
    conv = loaded.id_encoder.convs[0]
    bound = math.sqrt(6 / (16 + 16))  # Glorot-uniform
    assert 0.5 * bound < conv.lin.weight.abs().max() <= bound and conv.bias.eq(0).all()
    assert loaded.alignment_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert 0.01 < float(loaded.gate_proj.weight.detach().std()) < 0.04 and loaded.user_embeddings.weight[0].eq(0).all()
    assert torch.equal(loaded.kg_embeddings, model.kg_embeddings)  # loaded tensors are kept
    assert torch.equal(loaded.id_encoder.convs[1].lin.weight, model.id_encoder.convs[1].lin.weight)


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(**batch)
        ids = model.prepare_inputs([["loc1", "loc2"]], [[1333263600, 1333267200]], [1333270800], users=["user1"])
        helper = model(**ids).logits
    print(json.dumps({
        "module": type(model).__module__,
        "logits": out.logits.tolist(),
        "category_logits": out.category_logits.tolist(),
        "helper": helper.tolist(),
        "num_edges": model.config.num_edges,
    }))
    """
)


def test_trust_remote_code_load_in_fresh_process(tmp_path, run_without_our_packages):
    model = tiny_model()
    model_dir = tmp_path / "saved model"
    model.save_pretrained(model_dir)
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    result = run_without_our_packages(_FRESH_PROCESS, model_dir, tmp_path / "batch.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    assert payload["num_edges"] == model.config.num_edges
    with torch.no_grad():
        out = model(**batch)
        ids = model.prepare_inputs([["loc1", "loc2"]], [[1333263600, 1333267200]], [1333270800], users=["user1"])
        helper = model(**ids).logits
    torch.testing.assert_close(torch.tensor(payload["logits"]), out.logits, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(payload["category_logits"]), out.category_logits, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(payload["helper"]), helper, rtol=0, atol=0)


# configuration and input validation


def test_config_defaults():
    config = M3obConfig(location_ids=["a", "b"])
    assert config.model_type == "hf-mobility-m3ob" and config.num_locations == 2 and config.modalities == ["id"]
    assert (config.hidden_size, config.num_gcn_layers, config.num_neighbors) == (128, 2, 10)
    assert config.kg_embedding_dim == 64
    assert (config.fusion, config.alignment_weight, config.alignment_temperature) == ("gate", 0.1, 0.07)
    assert config.num_time_slots == 24 and not config.use_target_time and not config.use_alignment
    assert M3obConfig(location_ids=["a"], image_feature_dim=4).modalities == ["id", "image"]
    assert M3obConfig().num_locations == 1  # constructible without arguments (transformers needs that)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"fusion": "concat"}, "fusion"),
        ({"modalities": ["image"]}, "modalities"),
        ({"image_feature_dim": 0, "modalities": ["id", "image"]}, "image_feature_dim"),
        ({"num_categories": 0}, "num_activities"),
        ({"num_time_slots": 48}, "num_time_slots"),
        ({"use_target_time": True}, "use_target_time"),
        ({"hidden_size": 15}, "divisible"),
        ({"alignment_weight": -1.0}, "alignment_weight"),
        ({"alignment_temperature": 0.0}, "alignment_temperature"),
        ({"num_gcn_layers": 0}, "num_gcn_layers"),
        ({"num_locations": 5}, "num_locations"),
        ({"location_ids": ["a", "a"]}, "distinct"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_input_validation():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"`features` must have shape \(30, 12\)"):
        model.set_image_features(torch.randn(NUM_LOCATIONS, IMAGE_DIM + 1))
    with pytest.raises(ValueError, match=r"`kg_embeddings` must have shape"):
        model.set_graph(torch.randn(NUM_LOCATIONS - 1, KG_DIM))
    kg = torch.randn(NUM_LOCATIONS, KG_DIM)
    with pytest.raises(ValueError, match=r"`edge_index` must hold location-table rows in \[0, 30\)"):
        model.set_graph(kg, torch.tensor([[0, 30], [30, 0]]))
    with pytest.raises(ValueError, match="edge_index"):
        model.set_graph(kg, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="edge_weight"):
        model.set_graph(kg, torch.tensor([[0, 1], [1, 0]]), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="location_categories"):
        model.set_location_categories(torch.full((NUM_LOCATIONS,), NUM_CATEGORIES), torch.zeros(NUM_CATEGORIES).long())
    with pytest.raises(ValueError, match="category_activities"):
        model.set_location_categories(torch.zeros(NUM_LOCATIONS).long())
    with pytest.raises(ValueError, match="mask"):
        model.set_candidate_mask(torch.zeros(NUM_LOCATIONS, dtype=torch.bool))
    batch = random_batch()
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": batch["input_ids"] + NUM_LOCATIONS})
    with pytest.raises(ValueError, match="time_ids"):
        model(**{**batch, "time_ids": batch["time_ids"][..., :2]})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**random_batch(length=17, lengths=[17, 3, 2, 1]))
    with pytest.raises(ValueError, match="target_time_ids"):
        model(**{**batch, "target_time_ids": None}, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(**batch, labels=torch.full((4,), NUM_LOCATIONS))
    # a graph given explicitly replaces the kNN graph and updates the edge count; weights default to 1
    model.set_graph(kg, torch.tensor([[0, 1], [1, 0]]))
    assert model.config.num_edges == 2 and model.edge_weight.tolist() == [1.0, 1.0]


def test_read_only_arrays_become_tensors_without_a_warning():
    import warnings

    from modeling_mobility.m3ob.modeling_m3ob import _as_tensor

    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    array.setflags(write=False)  # as a NumPy view of an Arrow column is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = _as_tensor(array, torch.float32)
    assert tensor.dtype == torch.float32 and tensor.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert not array.flags.writeable  # the caller's array is left as it was
