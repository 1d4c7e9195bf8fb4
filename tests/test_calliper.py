"""CaLLiPer location encoder: grid encoding, loss, logit-scale clamp, inductive embeddings, save/load (also in a fresh
process without our packages) and the training script on a small synthetic city with held-out locations."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from modeling_mobility.calliper import (
    CaLLiPerConfig,
    CaLLiPerModel,
    contrastive_loss,
    grid_frequencies,
    space2vec_grid_encoding,
)
from train.calliper import (
    CaLLiPerTrainingCallback,
    _trainer_class,
    build_poi_texts,
    load_recipe,
    main,
    poi_text,
    retrieval_metrics,
    visit_profile_texts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> CaLLiPerConfig:
    values = dict(frequency_num=8, hidden_size=32, num_residual_blocks=2, embedding_dim=16, text_embedding_dim=24)
    values.update(overrides)
    return CaLLiPerConfig(**values)


# grid encoding


def test_grid_encoding_matches_hand_computation():
    # 3 scales from 0.01 to 1 degree: lambda = 0.01, 0.1, 1 (geometric), frequencies 1/lambda = 100, 10, 1
    lon, lat = -73.99, 40.75
    expected = []
    for x in (lon, lat):  # dimension-major, then scale, then (sin, cos)
        for omega in (100.0, 10.0, 1.0):
            expected += [math.sin(x * omega), math.cos(x * omega)]
    got = space2vec_grid_encoding(torch.tensor([[lon, lat]], dtype=torch.float64), 3, 0.01, 1.0)
    assert got.dtype == torch.float64 and got.shape == (1, 12)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=1e-12)
    # spot values written out: sin(-7399) and cos(40.75)
    assert got[0, 0].item() == pytest.approx(math.sin(-7399.0), abs=1e-9)
    assert got[0, 11].item() == pytest.approx(math.cos(40.75), abs=1e-12)


def test_grid_frequencies_geometric_and_model_uses_them():
    freq = grid_frequencies(32, 0.01, 10.0)
    lambdas = [0.01 * 1000 ** (s / 31) for s in range(32)]
    np.testing.assert_allclose(freq.numpy(), [1 / lam for lam in lambdas], rtol=1e-12)
    assert grid_frequencies(1, 0.5, 2.0).tolist() == [2.0]  # one scale: min_lambda
    model = CaLLiPerModel(CaLLiPerConfig())
    coords = torch.tensor([[-73.9, 40.7], [139.7, 35.7]], dtype=torch.float64)
    features = model.location_encoder.position_encoding(coords)
    assert features.shape == (2, 128) and model.config.positional_encoding_dim == 128
    torch.testing.assert_close(features, space2vec_grid_encoding(coords, 32, 0.01, 10.0), rtol=0, atol=0)


# loss and logit scale


def test_infonce_equals_hand_computation_2x2():
    a, b, c, d = 2.0, 0.5, 1.0, 3.0
    logits = torch.tensor([[a, b], [c, d]])
    rows = -math.log(math.exp(a) / (math.exp(a) + math.exp(b))) - math.log(math.exp(d) / (math.exp(c) + math.exp(d)))
    cols = -math.log(math.exp(a) / (math.exp(a) + math.exp(c))) - math.log(math.exp(d) / (math.exp(b) + math.exp(d)))
    assert contrastive_loss(logits).item() == pytest.approx((rows / 2 + cols / 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


def test_forward_logits_are_scaled_cosines_and_loss_is_infonce():
    torch.manual_seed(0)
    model = CaLLiPerModel(tiny_config(dropout=0.0)).eval()
    coords = torch.tensor([[-73.99, 40.75], [-73.95, 40.70], [-74.01, 40.80]], dtype=torch.float64)
    texts = torch.randn(3, 24)
    out = model(coords, text_embeddings=texts)
    projected = model.text_projection(torch.nn.functional.normalize(texts, dim=-1))
    torch.testing.assert_close(out.text_embeddings, projected)
    torch.testing.assert_close(out.location_embeddings.norm(dim=1), torch.ones(3))
    expected = math.exp(model.config.logit_scale_init_value) * out.location_embeddings @ projected.t()
    torch.testing.assert_close(out.logits_per_location, expected)
    torch.testing.assert_close(out.logits_per_text, expected.t())
    torch.testing.assert_close(out.loss, contrastive_loss(expected))
    assert model(coords).loss is None  # no texts: embeddings only
    with pytest.raises(ValueError, match="text_embeddings"):
        model(coords, text_embeddings=torch.randn(2, 24))
    with pytest.raises(ValueError, match="coordinates"):
        model(coords[:, :1])


def test_logit_scale_stays_within_its_clamp_after_a_pushing_step():
    model = CaLLiPerModel(tiny_config())
    cap = model.config.logit_scale_max
    assert cap == pytest.approx(math.log(100.0))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    optimizer = torch.optim.SGD([model.logit_scale], lr=10.0)
    model.logit_scale.grad = torch.tensor(-1.0)  # a gradient that pushes the scale up by 10
    optimizer.step()
    assert model.logit_scale.item() > cap
    # forward uses the clamped value even before the parameter is clamped
    coords = torch.tensor([[-73.99, 40.75], [-73.95, 40.70]], dtype=torch.float64)
    out = model.eval()(coords, text_embeddings=torch.randn(2, 24))
    cosines = out.location_embeddings @ out.text_embeddings.t()
    torch.testing.assert_close(out.logits_per_location, 100.0 * cosines)
    assert model.temperature_scale == pytest.approx(100.0)
    # the training callback clamps the parameter after every optimiser step
    CaLLiPerTrainingCallback().on_optimizer_step(None, None, None, model=model)
    assert model.logit_scale.item() == pytest.approx(cap)
    model.logit_scale.data.fill_(-5.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0
    # no weight decay on the logit scale, biases or 1-d parameters
    decayed = _trainer_class().get_decay_parameter_names(None, model)
    assert "logit_scale" not in decayed and not any(name.endswith("bias") for name in decayed)
    assert "text_projection.weight" in decayed and "location_encoder.output_layer.weight" in decayed


def test_tiny_contrastive_run_aligns_locations_with_texts():
    # 6 kinds of place, each in its own part of a city; held-out points of each part must retrieve their kind's text
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centres = torch.tensor(
        [[-74.00, 40.70], [-73.95, 40.70], [-73.90, 40.70], [-74.00, 40.78], [-73.95, 40.78], [-73.90, 40.78]],
        dtype=torch.float64,
    )
    kinds = torch.arange(6).repeat(40)
    coords = centres[kinds] + 0.006 * torch.randn(240, 2, generator=generator, dtype=torch.float64)
    kind_texts = torch.randn(6, 24, generator=generator)
    texts = kind_texts[kinds] + 0.05 * torch.randn(240, 24, generator=generator)
    model = CaLLiPerModel(tiny_config(frequency_num=16, min_lambda=0.005, max_lambda=1.0, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        rows = torch.randperm(240, generator=generator)[:48]
        loss = model(coords[rows], text_embeddings=texts[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clamp_logit_scale_()
    test_kinds = torch.arange(6).repeat(10)
    test_coords = centres[test_kinds] + 0.006 * torch.randn(60, 2, generator=generator, dtype=torch.float64)
    locations = model.get_location_embeddings(test_coords)
    retrieved = (locations @ model.get_text_embeddings(kind_texts).t()).argmax(1)
    accuracy = (retrieved == test_kinds).float().mean().item()
    assert accuracy >= 0.8, accuracy  # chance: 1/6
    metrics = retrieval_metrics(
        locations, model.get_text_embeddings(texts[:60]), [str(k) for k in test_kinds.tolist()]
    )
    assert metrics["top1_chance"] == pytest.approx(1 / 6)


# inductive embeddings and input checks


def test_get_location_embeddings_for_unseen_coordinates():
    torch.manual_seed(0)
    model = CaLLiPerModel(tiny_config()).train()
    rng = np.random.default_rng(0)
    coords = np.column_stack([rng.uniform(-180, 180, 1000), rng.uniform(-90, 90, 1000)])
    emb = model.get_location_embeddings(coords)
    assert emb.shape == (1000, 16) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1000))
    assert model.training  # the mode is restored
    torch.testing.assert_close(model.get_location_embeddings(coords, batch_size=7), emb)  # chunking changes nothing
    # float32 coordinates work too, but lose precision (the finest scale multiplies degrees by 100): pass float64
    torch.testing.assert_close(model.get_location_embeddings(torch.from_numpy(coords).float()), emb, atol=2e-3, rtol=0)
    torch.testing.assert_close(model.get_location_embeddings(coords[:2].tolist()), emb[:2])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(torch.from_numpy(coords[:5])).location_embeddings, emb[:5])
    assert model.get_location_embeddings(np.zeros((0, 2))).shape == (0, 16)


def test_bfloat16_compute_dtype_is_close_to_float32_and_returns_float32():
    torch.manual_seed(0)
    model = CaLLiPerModel(tiny_config(hidden_size=64)).eval()
    rng = np.random.default_rng(1)
    coords = np.column_stack([rng.uniform(-74.06, -73.86, 500), rng.uniform(40.68, 40.88, 500)])
    exact = model.get_location_embeddings(coords)
    fast = model.get_location_embeddings(coords, compute_dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # it really ran in bfloat16
    assert F.cosine_similarity(fast, exact).min() > 0.999
    torch.testing.assert_close(fast.norm(dim=1), torch.ones(500))
    # the model's own dtype is the exact path
    torch.testing.assert_close(model.get_location_embeddings(coords, compute_dtype=torch.float32), exact)
    for bad in ("bfloat16", torch.int8):
        with pytest.raises(ValueError, match="compute_dtype"):
            model.get_location_embeddings(coords, compute_dtype=bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 3)), r"shape \(N, 2\)"),
        (np.zeros(2), r"shape \(N, 2\)"),
        (np.array([[-73.9, np.nan], [1.0, 2.0]]), "NaN or infinite"),
        (np.array([[np.inf, 40.0]]), "NaN or infinite"),
        (np.array([[-73.9, 40.7], [40.7, -100.0]]), r"\[-180, 180\] x \[-90, 90\]"),
        (np.array([["a", "b"]]), "numbers"),
        ([[1.0, 2.0], [3.0]], "numbers"),
    ],
)
def test_get_location_embeddings_rejects_bad_input(bad, match):
    model = CaLLiPerModel(tiny_config())
    with pytest.raises(ValueError, match=match):
        model.get_location_embeddings(bad)


def test_metres_model_takes_projected_coordinates_and_batch_size_is_checked():
    model = CaLLiPerModel(tiny_config(coordinate_unit="metres"))
    assert (model.config.min_lambda, model.config.max_lambda) == (100.0, 10000.0)
    emb = model.get_location_embeddings([[530000.0, 180000.0], [531000.0, 181500.0]])  # British National Grid
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="batch_size"):
        model.get_location_embeddings([[1.0, 2.0]], batch_size=0)
    with pytest.raises(ValueError, match="text_embeddings"):
        model.get_text_embeddings(np.zeros((2, 5)))


# configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"frequency_num": 0}, "frequency_num"),
        ({"frequency_num": 2.5}, "frequency_num"),
        ({"frequency_num": True}, "frequency_num"),
        ({"min_lambda": 0.0}, "min_lambda"),
        ({"min_lambda": -1.0}, "min_lambda"),
        ({"min_lambda": 1.0, "max_lambda": 1.0}, "max_lambda"),
        ({"max_lambda": float("nan")}, "max_lambda"),
        ({"coordinate_unit": "feet"}, "coordinate_unit"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_residual_blocks": -1}, "num_residual_blocks"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"text_embedding_dim": "384"}, "text_embedding_dim"),
        ({"logit_scale_init_value": 5.0}, "logit_scale_init_value"),
        ({"logit_scale_min": 1.0, "logit_scale_init_value": 0.5}, "logit_scale_init_value"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaLLiPerConfig(**kwargs)


def test_config_defaults_and_units():
    config = CaLLiPerConfig()
    assert config.model_type == "hf-mobility-calliper"
    assert (config.frequency_num, config.min_lambda, config.max_lambda) == (32, 0.01, 10.0)
    assert (config.hidden_size, config.num_residual_blocks, config.dropout, config.embedding_dim) == (256, 4, 0.5, 128)
    assert config.coordinate_unit == "degrees" and config.text_embedding_dim == 384
    assert CaLLiPerConfig(coordinate_unit="meters").coordinate_unit == "metres"
    assert CaLLiPerConfig(logit_scale_max=None).logit_scale_max is None  # no cap, as the original
    reloaded = CaLLiPerConfig.from_dict(CaLLiPerConfig(coordinate_unit="metres", min_lambda=50.0).to_dict())
    assert (reloaded.coordinate_unit, reloaded.min_lambda, reloaded.max_lambda) == ("metres", 50.0, 10000.0)


# save / load


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys

    import numpy as np
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    coords = np.load(sys.argv[2])
    print(json.dumps({
        "module": type(model).__module__,
        "class": type(model).__name__,
        "embeddings": model.get_location_embeddings(coords).tolist(),
    }))
    """
)


def _trained_tiny_model() -> CaLLiPerModel:
    torch.manual_seed(0)
    model = CaLLiPerModel(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    coords = torch.tensor([[-73.99, 40.75], [-73.95, 40.70], [-74.01, 40.80], [-73.90, 40.72]], dtype=torch.float64)
    for _ in range(3):
        model(coords, text_embeddings=torch.randn(4, 24)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    model = _trained_tiny_model()
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_calliper.py", "configuration_calliper.py"} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "hf-mobility-calliper"
    assert config["auto_map"]["AutoModel"] == "modeling_calliper.CaLLiPerModel"
    loaded = CaLLiPerModel.from_pretrained(tmp_path / "m")
    coords = np.array([[-73.97, 40.76], [2.35, 48.86], [151.2, -33.9]])  # unseen, even other cities
    assert torch.equal(loaded.get_location_embeddings(coords), model.get_location_embeddings(coords))
    assert loaded.logit_scale.item() == model.logit_scale.item()


def test_trust_remote_code_load_in_fresh_process(tmp_path, run_without_our_packages):
    model = _trained_tiny_model()
    model_dir = tmp_path / "saved model"
    model.save_pretrained(model_dir)
    coords = np.array([[-73.97, 40.76], [-73.91, 40.69], [2.35, 48.86]])
    np.save(tmp_path / "coords.npy", coords)
    result = run_without_our_packages(_FRESH_PROCESS, model_dir, tmp_path / "coords.npy")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules") and payload["class"] == "CaLLiPerModel"
    torch.testing.assert_close(
        torch.tensor(payload["embeddings"]), model.get_location_embeddings(coords), rtol=0, atol=1e-6
    )


# POI texts


def test_poi_texts_wording_and_fallbacks():
    assert (
        poi_text("Coffee Shop", "Food", "Kim's Coffee")
        == "A place of Coffee Shop, a type of Food, called Kim's Coffee"
    )
    assert poi_text("Coffee Shop", "Food") == "A place of Coffee Shop, a type of Food"
    assert poi_text("Food", "Food", None) == "A place of Food"
    assert poi_text(None, "Food", "Owl") == "A place of the type Food, called Owl"
    assert poi_text(None, None, None, "transit_hub") == "A place in a transit hub area"
    assert poi_text("Bar", "Nightlife Spot", "Owl", "nightlife") == (
        "A place of Bar, a type of Nightlife Spot in a nightlife area, called Owl"
    )
    assert poi_text(None, None, "Owl", "parks") == "A place in a parks area, called Owl"
    assert poi_text(None, None, "  Owl   Tap ") == "A place called Owl Tap"
    assert poi_text(float("nan"), "", None) == "A place"
    frame = pd.DataFrame({"category": ["Bar", None], "name": [None, "Lucy's"]})
    assert build_poi_texts(frame).tolist() == ["A place of Bar", "A place called Lucy's"]
    assert build_poi_texts(frame, include_names=False).tolist() == ["A place of Bar", "A place"]


def test_visit_profile_texts_hand_computed():
    rows = []  # (location, user, day, hour); day 0 is a Monday, so days 5, 6, 12 and 13 are weekend days
    rows += [("L1", u, d, 19) for u, d in zip("abcde", range(5))]  # 5 weekday evenings, 5 people
    rows += [("L2", "a", 5, 8), ("L2", "a", 6, 13), ("L2", "a", 12, 20)]  # weekend, morning / midday / evening
    rows += [("L3", "f", 7, 3), ("L3", "f", 13, 3)]  # nights, a Monday and a Sunday
    checkins = pd.DataFrame(rows, columns=["location_id", "user_id", "day", "hour"])
    checkins["timestamp"] = checkins["day"] * 86400 + checkins["hour"] * 3600 + 600
    texts = visit_profile_texts(checkins, ["L1", "L2", "L3", "L4"], day0_weekday=0)
    # weekend share of all visits 4/10: L1 (0) is 15 points below, L2 (1) above, L3 (1/2) within; visits 5 / 3 / 2
    # and people 5 / 1 / 1 fall in the thirds of the visited places, a tie with the lower cut in the lower third
    assert texts.tolist() == [
        "visited mostly in the evening, mostly on weekdays; busy, by many different people",
        "visited at all times of day, mostly at weekends; visited now and then, by few people",
        "visited mostly at night, all week; rarely visited, by few people",
        "",  # no check-ins
    ]
    # local time: the same visits 2 hours earlier in UTC, with a +120 min offset, give the same texts
    shifted = checkins.assign(timestamp=checkins["timestamp"] - 7200, tz_offset_min=120)
    assert visit_profile_texts(shifted, ["L1", "L2", "L3", "L4"], day0_weekday=0).tolist() == texts.tolist()
    with pytest.raises(ValueError, match="user_id"):
        visit_profile_texts(checkins.drop(columns="user_id"), ["L1"])


def test_locations_without_attributes_get_visit_profile_texts(tmp_path, monkeypatch):
    """Gowalla-style data (no category, name or land use): every attribute text would be "A place", so the texts
    describe the places' visits instead, and the encoder learns to retrieve them better than chance."""
    from dataset_builders.preprocess import CheckinPreprocessConfig, prepare_checkins
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_checkins
    from train.calliper import train_calliper

    monkeypatch.setenv("HF_MOBILITY_HOME", str(tmp_path / "home"))
    ck = synthesize_checkins(num_users=8, num_locations=80, num_days=40, seed=1).checkins
    stamps = pd.to_datetime(ck["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    pd.DataFrame({"user": ck["user_id"], "time": stamps, "lat": ck["latitude"], "lon": ck["longitude"],
                  "loc": ck["location_id"]}).to_csv(tmp_path / "gowalla.txt", sep="\t", header=False, index=False)
    cfg = CheckinPreprocessConfig(min_user_visits=5, min_location_visits=3, seed=0)
    data = write_prepared(prepare_checkins(read_dataset("gowalla", tmp_path / "gowalla.txt"), cfg), tmp_path / "data")
    tiny = dict(frequency_num=8, hidden_size=32, num_residual_blocks=1, embedding_dim=16, batch_size=16, max_epochs=3,
                seed=0, num_threads=1)
    result = train_calliper(data, tmp_path / "run", progress=False, **tiny)
    assert result.report["poi_text_source"] == "visits"
    table = pd.read_parquet(tmp_path / "run" / "poi_texts.parquet")
    texts = table["text"]
    from dataset_builders.publish import load_prepared

    trained_at = set(load_prepared(data).table("checkins", "train").column("location_id").to_pylist())
    # a place's profile comes from its training check-ins; a place first visited after the training days has none
    assert (texts.str.startswith("A place, visited ") == table["location_id"].isin(trained_at)).all()
    assert (texts == "A place").sum() == (~table["location_id"].isin(trained_at)).sum() < len(texts) // 10
    assert result.report["num_distinct_texts"] == texts.nunique() > 5
    assert "visit profile" in (tmp_path / "run" / "README.md").read_text()
    bare = train_calliper(data, tmp_path / "bare", progress=False, poi_texts="attributes", **tiny)
    assert bare.report["num_distinct_texts"] == 1  # what InfoNCE would have had: one text for every place
    with pytest.raises(ValueError, match="poi_texts"):
        load_recipe(None, poi_texts="names")


def test_recipes_load_and_reject_unknown_keys(tmp_path):
    from train.calliper import DEMO_RECIPE, PAPER_RECIPE

    paper = load_recipe(PAPER_RECIPE)
    assert (paper.batch_size, paper.learning_rate, paper.weight_decay, paper.max_epochs) == (128, 1e-3, 0.01, 100)
    assert paper.model_config(384).to_dict()["frequency_num"] == 32
    demo = load_recipe(DEMO_RECIPE, max_epochs="3")
    assert demo.max_epochs == 3 and demo.patience is not None
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe(None, batchsize=3)
    with pytest.raises(ValueError, match="batch_size"):
        load_recipe(None, batch_size="many")
    with pytest.raises(ValueError, match="validation_fraction"):
        load_recipe(None, validation_fraction=1.0)
    (tmp_path / "r.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        load_recipe(tmp_path / "r.yaml")


# training script


@pytest.fixture(scope="module")
def prepared_dir(small_city_dir):
    return small_city_dir


def test_train_calliper_writes_outputs_and_keeps_heldout_unseen(prepared_dir, tmp_path, monkeypatch, capsys):
    import train.text_encoder as text_encoder
    from dataset_builders.publish import load_prepared

    monkeypatch.setenv("HF_MOBILITY_HOME", str(tmp_path / "home"))
    seen_texts: list[list[str]] = []
    real_encode = text_encoder.encode_texts

    def spy(texts, *args, **kwargs):
        seen_texts.append(list(texts))
        return real_encode(texts, *args, **kwargs)

    monkeypatch.setattr(text_encoder, "encode_texts", spy)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "frequency_num: 8\nhidden_size: 32\nnum_residual_blocks: 1\nembedding_dim: 16\nbatch_size: 16\n"
        "max_epochs: 3\npatience: 2\nseed: 0\nnum_threads: 1\n"
    )
    out = tmp_path / "run"
    result = main(
        [
            "--data",
            str(prepared_dir),
            "--output-dir",
            str(out),
            "--config",
            str(recipe),
            "--no-progress",
            "--learning-rate",
            "2e-3",
        ]
    )
    assert "load with: AutoModel.from_pretrained" in capsys.readouterr().out

    locations = load_prepared(prepared_dir).table("locations").to_pandas()
    heldout = locations["heldout"].to_numpy(dtype=bool)
    assert heldout.sum() > 0
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_calliper.py",
        "configuration_calliper.py",
        "README.md",
        "location_embeddings.parquet",
        "poi_texts.parquet",
        "report.json",
        "run_info.json",
        "recipe.yaml",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*")), "temporary files or checkpoints left behind"

    # only the texts of locations that are not held out were embedded (inductive honesty)
    texts = pd.read_parquet(out / "poi_texts.parquet")
    assert texts["location_id"].tolist() == locations["location_id"].tolist()
    assert (texts["split"] == "heldout").to_numpy().tolist() == heldout.tolist()
    assert seen_texts == [texts["text"][~heldout].tolist()]
    report = json.loads((out / "report.json").read_text())
    assert report["num_heldout_locations"] == int(heldout.sum())
    assert report["poi_text_source"] == "attributes"  # the synthetic city's places have categories and names
    assert report["num_train_locations"] + report["num_validation_locations"] == int((~heldout).sum())
    assert report["num_validation_locations"] == (texts["split"] == "validation").sum() >= 1
    assert 1 <= report["best_epoch"] <= report["epochs_trained"] <= 3
    assert 0.0 <= report["val_top1_accuracy"] <= 1.0 and 0.0 < report["val_top1_chance"] <= 1.0
    assert report["best_val_loss"] == pytest.approx(min(h["eval_loss"] for h in report["history"]), rel=1e-4)
    assert report["logit_scale"] <= 100.0 + 1e-4

    # every location is embedded, held-out ones included, from its coordinates
    table = pq.read_table(out / "location_embeddings.parquet")
    embedding_type = table.schema.field("embedding").type
    assert pa.types.is_list(embedding_type) and embedding_type.value_type == pa.float32()
    frame = table.to_pandas()
    assert frame["location_id"].tolist() == locations["location_id"].tolist()
    assert frame["heldout"].tolist() == heldout.tolist()
    emb = np.stack(frame["embedding"].to_numpy())
    assert emb.shape == (len(locations), 16) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    coords = locations[["longitude", "latitude"]].to_numpy()
    loaded = CaLLiPerModel.from_pretrained(out)
    np.testing.assert_allclose(loaded.get_location_embeddings(coords).numpy(), emb, atol=1e-6)
    np.testing.assert_allclose(result.model.get_location_embeddings(coords[heldout]).numpy(), emb[heldout], atol=1e-6)

    info = json.loads((out / "run_info.json").read_text())
    assert info["method"] == "calliper" and info["data"] == str(prepared_dir.resolve())
    assert info["recipe"]["learning_rate"] == 2e-3
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "2506.14070" in card and "CaLLiPer" in card


def test_train_calliper_rejects_bad_input(prepared_dir, tmp_path):
    from train.calliper import train_calliper

    with pytest.raises(ValueError, match="data_dir"):
        train_calliper(None, tmp_path / "run")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        train_calliper(prepared_dir, tmp_path / "run", epochs=3)
    with pytest.raises(ValueError, match="coordinate_unit"):
        train_calliper(prepared_dir, tmp_path / "run", coordinate_unit="feet")
