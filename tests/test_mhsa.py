"""MHSA next-location predictor (modeling_mobility/mhsa) and its Trainer-based training/evaluation (train/mhsa.py)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_builders.preprocess import local_time_features
from dataset_builders.publish import load_prepared
from modeling_mobility.mhsa import MHSAConfig, MHSAForNextLocation, time_ids_from_timestamps
from train.mhsa import build_mhsa_samples, evaluate_mhsa, load_recipe, main, parse_recipe, train_mhsa

RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"
NUM_LOCATIONS, NUM_USERS, FEATURE_DIM = 12, 3, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(location_encoder: str = "id", **overrides) -> MHSAConfig:
    values = dict(
        location_ids=[f"loc{i}" for i in range(NUM_LOCATIONS)],
        user_ids=[f"user{i}" for i in range(NUM_USERS)],
        location_encoder=location_encoder,
        location_feature_dim=FEATURE_DIM,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    values.update(overrides)
    return MHSAConfig(**values)


def tiny_model(location_encoder: str = "id", seed: int = 0, **overrides) -> MHSAForNextLocation:
    torch.manual_seed(seed)
    model = MHSAForNextLocation(tiny_config(location_encoder, **overrides))
    if location_encoder == "features":
        table = torch.randn(NUM_LOCATIONS, FEATURE_DIM, generator=torch.Generator().manual_seed(7))
        model.set_location_features(table)
    return model.eval()


def random_batch(batch: int = 4, length: int = 6, seed: int = 0, lengths=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths) if lengths is not None else torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    times = torch.stack([torch.randint(0, n, (batch, length), generator=g) for n in (24, 4, 7)], dim=-1)
    target_times = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in (24, 4, 7)], dim=-1)
    return {
        "input_ids": torch.randint(0, NUM_LOCATIONS, (batch, length), generator=g) * mask,
        "attention_mask": mask,
        "time_ids": times * mask[..., None],
        "user_ids": torch.randint(0, NUM_USERS + 1, (batch,), generator=g),
        "target_time_ids": target_times,
    }


# configuration


@pytest.mark.parametrize(
    "overrides",
    [
        {"location_encoder": "calliper"},
        {"hidden_size": 30, "num_attention_heads": 4},  # not divisible
        {"hidden_size": 15, "num_attention_heads": 1},  # odd: no sinusoidal positions
        {"num_hidden_layers": 0},
        {"hidden_dropout_prob": 1.0},
        {"head_norm": "group_norm"},
        {"hidden_act": "swish"},
        {"use_target_time": "yes"},
        {"num_locations": 5},  # disagrees with location_ids
        {"location_ids": ["a", "b", "a"]},
        {"location_ids": "abc"},
        {"num_users": 7},  # disagrees with user_ids
        {"location_feature_dim": 0},
        {"initializer_range": 0.0},
    ],
)
def test_config_validation(overrides):
    with pytest.raises(ValueError):
        tiny_config(**overrides)


def test_config_defaults_are_the_paper_setting():
    config = MHSAConfig(location_ids=["a", "b"])
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        128, 6, 8, 256)
    assert config.hidden_act == "gelu" and config.hidden_dropout_prob == 0.1 and config.num_locations == 2
    assert config.model_type == "hf-mobility-mhsa"
    assert MHSAConfig().num_locations == 1  # constructible without arguments (transformers needs that)


# model behaviour


@pytest.mark.parametrize("encoder", ["id", "features"])
def test_output_shapes_and_loss(encoder):
    model = tiny_model(encoder)
    batch = random_batch(batch=4, length=6)
    out = model(**batch, labels=torch.tensor([0, 3, 5, 11]))
    assert out.logits.shape == (4, NUM_LOCATIONS)
    assert out.query.shape == (4, 16)
    assert out.last_hidden_state.shape == (4, 6, 16)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    subset = model(**batch, candidate_indices=torch.tensor([2, 5, 7])).logits
    torch.testing.assert_close(subset, out.logits[:, [2, 5, 7]])
    assert len(model(**batch, return_dict=False)) == 3


@pytest.mark.parametrize("encoder", ["id", "features"])
def test_causal_mask(encoder):
    model = tiny_model(encoder)
    batch = random_batch(batch=3, length=7, lengths=[7, 7, 7])
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 4] = (changed["input_ids"][:, 4] + 1) % NUM_LOCATIONS
    changed["time_ids"][:, 4] = (changed["time_ids"][:, 4] + 1) % torch.tensor([24, 4, 7])
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        after = model(**changed).last_hidden_state
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 4:], before[:, 4:])


@pytest.mark.parametrize("encoder", ["id", "features"])
def test_padding_does_not_change_the_prediction(encoder):
    model = tiny_model(encoder)
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
    # a short history in a padded batch scores as it does alone
    with torch.no_grad():
        mixed = random_batch(batch=2, length=6, lengths=[2, 6], seed=3)
        alone = {k: v[:1, :2] if v.ndim >= 2 and k != "target_time_ids" else v[:1] for k, v in mixed.items()}
        torch.testing.assert_close(model(**mixed).logits[:1], model(**alone).logits, rtol=1e-5, atol=1e-5)


def test_unseen_locations_features_variant_ranks_them():
    model = tiny_model("features")
    batch = random_batch()
    new_features = torch.randn(2, FEATURE_DIM)
    model.set_location_features(new_features, ["new_a", "loc3"], append=True)
    assert model.config.num_locations == NUM_LOCATIONS + 1
    assert model.config.location_ids[-1] == "new_a"
    torch.testing.assert_close(model.location_features[3], new_features[1])
    logits = model(**batch).logits
    assert logits.shape == (4, NUM_LOCATIONS + 1)
    assert torch.isfinite(logits).all()  # the new place gets a real score
    assert model.location_index(["new_a", "loc0"]).tolist() == [NUM_LOCATIONS, 0]
    # replacing the whole table with a new vocabulary
    model.set_location_features(torch.randn(3, FEATURE_DIM), ["x", "y", "z"])
    assert model(**{**batch, "input_ids": batch["input_ids"] % 3}).logits.shape == (4, 3)
    with pytest.raises(ValueError, match="location_feature_dim|shape"):
        model.set_location_features(torch.randn(3, FEATURE_DIM + 1), ["x", "y", "z"])
    with pytest.raises(ValueError, match="append"):
        model.set_location_features(torch.randn(1, FEATURE_DIM), append=True)
    with pytest.raises(ValueError, match="not in the model's location vocabulary"):
        model.location_index(["loc0"])


def test_feature_standardization_is_fixed_and_saved(tmp_path):
    model = tiny_model("features")
    batch = random_batch()
    before = model(**batch).logits
    table = model.location_features.clone()
    model.fit_feature_standardization(np.arange(NUM_LOCATIONS) < 8)  # fit on some rows only
    torch.testing.assert_close(model.location_feature_mean, table[:8].mean(0))
    torch.testing.assert_close(model.location_feature_scale, table[:8].std(0))
    standardized = model._standardized_features()[:8]
    torch.testing.assert_close(standardized.std(0), torch.ones(FEATURE_DIM))
    assert not torch.allclose(model(**batch).logits, before)
    mean = model.location_feature_mean.clone()
    model.set_location_features(torch.randn(2, FEATURE_DIM), ["n1", "n2"], append=True)
    torch.testing.assert_close(model.location_feature_mean, mean)  # adding places keeps the fitted statistics
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = MHSAForNextLocation.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.location_feature_scale, model.location_feature_scale)
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="features"):
        tiny_model("id").fit_feature_standardization()


def test_unseen_locations_id_variant_cannot_rank_them():
    model = tiny_model("id")
    mask = np.ones(NUM_LOCATIONS, dtype=bool)
    mask[[4, 9]] = False
    model.set_candidate_mask(mask)
    out = model(**random_batch(), labels=torch.tensor([4, 1, 2, 9]))
    assert torch.isneginf(out.logits[:, [4, 9]]).all()
    assert torch.isfinite(out.logits[:, mask]).all()
    assert torch.isfinite(out.loss)  # samples whose target cannot be predicted are left out of the loss
    with pytest.raises(ValueError, match="features"):
        model.set_location_features(torch.randn(NUM_LOCATIONS, FEATURE_DIM))
    with pytest.raises(ValueError, match="at least one"):
        model.set_candidate_mask(np.zeros(NUM_LOCATIONS, dtype=bool))


def test_input_validation():
    model = tiny_model("id")
    batch = random_batch()
    with pytest.raises(ValueError, match="time_ids"):
        model(**{**batch, "time_ids": None})
    with pytest.raises(ValueError, match="target_time_ids"):
        model(**{**batch, "target_time_ids": None})
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": batch["input_ids"] + NUM_LOCATIONS})
    with pytest.raises(ValueError, match="at least one history visit"):
        model(**{**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])})
    with pytest.raises(ValueError, match="user_ids"):
        model(**{**batch, "user_ids": torch.full((4,), NUM_USERS + 1)})


def test_prepare_inputs_and_time_features():
    model = tiny_model("id")
    ts = np.array([1333263600, 1333267200 + 17 * 60, 0])
    expected = local_time_features(ts, -240, 3)
    times = time_ids_from_timestamps(ts, -240)
    assert times[:, 0].tolist() == expected[1].tolist()
    assert times[:, 1].tolist() == ((expected[2] % 60) // 15).tolist()
    assert times[:, 2].tolist() == expected[3].tolist()
    batch = model.prepare_inputs([["loc1", "loc2"], ["loc3"]], [[1, 2], [3]], [10, 20], users=["user0", "stranger"])
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["user_ids"].tolist() == [1, 0]  # an unknown user gets the shared row 0
    assert model(**batch).logits.shape == (2, NUM_LOCATIONS)
    with pytest.raises(ValueError, match="at least one history visit"):
        model.prepare_inputs([[]], [[]], [1])


@pytest.mark.parametrize("encoder", ["id", "features"])
def test_loss_falls_on_a_learnable_task(encoder):
    # the next location is the last history location + 1 (mod L): learnable from the last step alone
    model = tiny_model(encoder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, head_dropout_prob=0.0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(120):
        batch = random_batch(batch=32, length=5, seed=100 + step)
        last = (batch["attention_mask"].sum(1) - 1)
        labels = (batch["input_ids"][torch.arange(32), last] + 1) % NUM_LOCATIONS
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_history_features_hand_computed():
    model = tiny_model("id", history_bias=True)
    assert torch.equal(model.history_bias.weight, torch.ones(1, 3))  # the prior: history places score higher
    # history a=2, b=5, a=2, c=7 (then padding)
    input_ids = torch.tensor([[2, 5, 2, 7, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 0]])
    features = model.history_features(input_ids, valid)
    assert features.shape == (1, NUM_LOCATIONS, 3)
    expected = torch.zeros(NUM_LOCATIONS, 3)
    expected[2] = torch.tensor([1.0, math.log(3.0), 1 / 2])  # twice, one visit after its last
    expected[5] = torch.tensor([1.0, math.log(2.0), 1 / 3])
    expected[7] = torch.tensor([1.0, math.log(2.0), 1.0])  # the last visit
    torch.testing.assert_close(features[0], expected)  # padding (row 0) adds nothing
    subset = model.history_features(input_ids, valid, torch.tensor([7, 0, 2]))
    torch.testing.assert_close(subset[0], expected[[7, 0, 2]])


def test_history_bias_adds_the_weighted_history_features_also_for_new_places():
    model = tiny_model("features", history_bias=True)
    model.set_location_features(torch.randn(1, FEATURE_DIM), ["brand_new"], append=True)  # never trained
    batch = random_batch(batch=4, length=6, seed=5)
    batch["input_ids"][:, 0] = NUM_LOCATIONS  # every history starts at the new place
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        model.history_bias.weight.copy_(torch.tensor([[0.5, -1.0, 3.0]]))
        with_bias = model(**batch).logits
        features = model.history_features(batch["input_ids"], valid)
        model.history_bias.weight.zero_()
        without = model(**batch).logits
    assert features[:, NUM_LOCATIONS, 0].eq(1).all()  # the new place is "visited" in every sample
    torch.testing.assert_close(with_bias - without, features @ torch.tensor([0.5, -1.0, 3.0]))
    with torch.no_grad():  # a large recency weight puts the last visit first, whatever its features
        model.history_bias.weight.copy_(torch.tensor([[0.0, 0.0, 1000.0]]))
        top = model(**batch).logits.argmax(1)
    last = batch["input_ids"][torch.arange(4), batch["attention_mask"].sum(1) - 1]
    assert torch.equal(top, last)
    plain = MHSAForNextLocation(tiny_config("features"))
    assert plain.history_bias is None and "history_bias.weight" in model.state_dict()


@pytest.mark.parametrize("encoder", ["id", "features"])
def test_save_load_round_trip(tmp_path, encoder):
    model = tiny_model(encoder)
    if encoder == "features":
        model.set_location_features(torch.randn(1, FEATURE_DIM), ["brand_new"], append=True)
    else:
        mask = np.ones(NUM_LOCATIONS, dtype=bool)
        mask[5] = False
        model.set_candidate_mask(mask)
    batch = random_batch()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = MHSAForNextLocation.from_pretrained(tmp_path).eval()
    assert loaded.config.location_ids == model.config.location_ids
    assert loaded.config.user_ids == model.config.user_ids
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    assert torch.equal(loaded.candidate_mask, model.candidate_mask)


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(**batch).logits
    ids = model.prepare_inputs([["loc1", "loc2"]], [[1333263600, 1333267200]], [1333270800], users=["user1"])
    print(json.dumps({
        "module": type(model).__module__,
        "logits": logits.tolist(),
        "helper": model(**ids).logits.tolist(),
        "num_locations": model.config.num_locations,
    }))
    """
)


def test_trust_remote_code_load_in_fresh_process(tmp_path, run_without_our_packages):
    model = tiny_model("features")
    model.fit_feature_standardization()
    model.set_location_features(torch.randn(1, FEATURE_DIM), ["brand_new"], append=True)
    model_dir = tmp_path / "saved model"
    model.save_pretrained(model_dir)
    batch = random_batch()
    torch.save(batch, tmp_path / "batch.pt")
    result = run_without_our_packages(_FRESH_PROCESS, model_dir, tmp_path / "batch.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    assert payload["num_locations"] == NUM_LOCATIONS + 1
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(payload["logits"]), model(**batch).logits)
        ids = model.prepare_inputs([["loc1", "loc2"]], [[1333263600, 1333267200]], [1333270800], users=["user1"])
        torch.testing.assert_close(torch.tensor(payload["helper"]), model(**ids).logits)


# data, training and evaluation


@pytest.fixture(scope="module")
def prepared_dir(small_city_dir):
    return small_city_dir


TINY_RECIPE = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_epochs=2,
                   batch_size=32, warmup_epochs=0.5, progress=False)


class _CoordinateEncoder:
    """A stand-in for CaLLiPer: fixed random Fourier features of (longitude, latitude), L2-normalised."""

    def __init__(self, dim: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.frequencies = torch.randn(2, dim // 2, generator=g, dtype=torch.float64) * 60.0
        self.calls = 0

    def get_location_embeddings(self, coordinates):
        self.calls += 1
        x = torch.as_tensor(np.asarray(coordinates), dtype=torch.float64) @ self.frequencies
        out = torch.cat([x.sin(), x.cos()], dim=1).float()
        return out / out.norm(dim=1, keepdim=True)


def test_build_samples_matches_the_table(prepared_dir):
    data = load_prepared(prepared_dir)
    locations = data.table("locations").column("location_id").to_pylist()
    table = data.table("samples", "validation").to_pylist()
    users = sorted({row["user_id"] for row in table})[1:]  # one user left out: unknown
    samples = build_mhsa_samples(data, "validation", locations, users)
    position = {loc: i for i, loc in enumerate(locations)}
    assert len(samples) == len(table)
    for i in (0, len(table) // 2, len(table) - 1):
        row = table[i]
        hist = samples.history_index[samples.offsets[i] : samples.offsets[i + 1]]
        assert hist.tolist() == [position[loc] for loc in row["history_location_ids"]]
        assert samples.target_index[i] == position[row["target_location_id"]]
        expected_user = users.index(row["user_id"]) + 1 if row["user_id"] in users else 0
        assert samples.user_index[i] == expected_user
        _, hour, minute, weekday = local_time_features(np.array(row["history_timestamps"]),
                                                       np.array(row["history_tz_offset_min"]),
                                                       data.metadata["day0_weekday"])
        times = samples.history_time[samples.offsets[i] : samples.offsets[i + 1]]
        assert times.tolist() == np.stack([hour, (minute % 60) // 15, weekday], 1).tolist()
    short = build_mhsa_samples(data, "validation", locations, users, max_history=2)
    assert short.lengths.max() <= 2
    longest = int(np.argmax(samples.lengths))
    assert short.history_index[short.offsets[longest] : short.offsets[longest + 1]].tolist() == (
        samples.history_index[samples.offsets[longest + 1] - 2 : samples.offsets[longest + 1]].tolist())
    batch = samples.batch([0, longest])
    assert batch["input_ids"].shape == (2, samples.lengths[longest])
    with pytest.raises(ValueError, match="vocabulary"):
        build_mhsa_samples(data, "validation", locations[:10], users)


def test_train_and_evaluate_id_variant(prepared_dir, tmp_path):
    run = tmp_path / "run-id"
    main(["--data", str(prepared_dir), "--output-dir", str(run), "--config", str(RECIPES / "mhsa_demo.yaml"),
          *[a for k, v in TINY_RECIPE.items() for a in (f"--{k}", str(v))]])
    info = json.loads((run / "run_info.json").read_text())
    assert info["method"] == "mhsa" and info["location_encoder"] == "id" and info["data"]
    assert info["num_trained_locations"] < info["num_locations"]
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["results"])[0] == "mhsa-id"
    assert {"popularity", "markov"} <= set(report["results"])
    model_res = report["results"]["mhsa-id"]
    test_rows = load_prepared(prepared_dir).table("samples", "test").num_rows
    assert model_res["num_samples"] == test_rows == report["results"]["markov"]["num_samples"]
    unseen = model_res["unseen"]
    assert unseen["num_samples"] > 0
    assert unseen["acc@20"] == 0.0 and unseen["mrr"] == 0.0  # learned IDs cannot predict unseen places
    assert model_res["unseen_candidates"]["mrr"] == 0.0  # not even among the unseen places alone
    nearest = report["results"]["nearest"]
    assert nearest["num_samples"] == test_rows and nearest["unseen"]["num_samples"] == unseen["num_samples"]
    # among the few held-out places, the nearest one to the last visit is often right
    assert nearest["unseen_candidates"]["mrr"] > nearest["unseen"]["mrr"] > 0.0
    card = (run / "README.md").read_text()
    assert "| mhsa-id |" in card and "2506.14070" in card and "How do you go where" in card
    assert (run / "model" / "model.safetensors").is_file()
    # evaluating again from the saved folder gives the same numbers
    again = evaluate_mhsa(run, prepared_dir, split="test")
    assert again["results"]["mhsa-id"] == model_res


def test_train_and_evaluate_features_variant(prepared_dir, tmp_path):
    encoder = _CoordinateEncoder()
    result = train_mhsa(prepared_dir, tmp_path / "run-feat", location_encoder=encoder, **TINY_RECIPE)
    assert encoder.calls >= 1
    assert result.model.config.location_encoder == "features"
    assert result.run_info["location_encoder"] == "<_CoordinateEncoder>"
    report = json.loads((tmp_path / "run-feat" / "metrics.json").read_text())
    model_res = report["results"]["mhsa-features"]
    assert model_res["unseen"]["mrr"] > 0.0  # every unseen target gets a finite rank
    among = model_res["unseen_candidates"]
    assert among["num_samples"] == model_res["unseen"]["num_samples"] and among["mrr"] >= model_res["unseen"]["mrr"]
    assert bool(result.model.candidate_mask.all())  # trained on the training locations, saved with all as candidates
    assert report == result.report
    data = load_prepared(prepared_dir)
    coords = np.stack([data.table("locations").column("longitude").to_numpy(),
                       data.table("locations").column("latitude").to_numpy()], 1)
    torch.testing.assert_close(result.model.location_features, encoder.get_location_embeddings(coords))
    assert not torch.equal(result.model.location_feature_scale, torch.ones(24))  # fitted on the training locations


def test_recipes_and_argument_errors(prepared_dir, tmp_path):
    demo = load_recipe(RECIPES / "mhsa_demo.yaml")
    paper = load_recipe(RECIPES / "mhsa_paper.yaml")
    assert (paper.batch_size, paper.learning_rate, paper.weight_decay, paper.patience, paper.max_epochs) == (
        128, 1e-3, 1e-6, 3, 100)
    assert (paper.hidden_size, paper.num_hidden_layers, paper.num_attention_heads) == (128, 6, 8)
    assert demo.max_epochs <= paper.max_epochs
    recipe = parse_recipe(["--config", str(RECIPES / "mhsa_paper.yaml"), "--max-epochs", "7", "--learning_rate",
                           "1e-4", "--max_history", "null", "--use_target_time", "false"])
    assert (recipe.max_epochs, recipe.learning_rate, recipe.max_history, recipe.use_target_time) == (7, 1e-4, None,
                                                                                                      False)
    with pytest.raises(ValueError, match="unknown recipe keys"):
        load_recipe(None, lr=1.0)
    with pytest.raises(ValueError, match="max_epochs"):
        load_recipe(None, max_epochs="many")
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        load_recipe(None, lr_scheduler_type="exotic")
    with pytest.raises(ValueError, match="CaLLiPer"):
        train_mhsa(prepared_dir, tmp_path / "x", location_encoder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="shape"):
        train_mhsa(prepared_dir, tmp_path / "x", location_encoder=np.zeros((3, 4)))


def test_location_residual_trains_seen_locations_only(tmp_path):
    """`location_residual`: a learned residual on top of the frozen features for the locations in `residual_mask`;
    the others keep exactly zero (features only), also after training steps and when places are added."""
    model = tiny_model("features", location_residual=True).train()
    seen = torch.zeros(NUM_LOCATIONS, dtype=torch.bool)
    seen[:8] = True
    model.set_residual_mask(seen)
    assert torch.count_nonzero(model.location_residuals.weight) == 0  # zero-initialised: starts as features only
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = random_batch(batch=8, seed=3)
    labels = torch.randint(0, NUM_LOCATIONS, (8,), generator=torch.Generator().manual_seed(4))
    for _ in range(5):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    effective = model._residuals()
    assert effective[:8].abs().sum() > 0 and torch.count_nonzero(effective[8:]) == 0
    assert model.location_residuals.weight.grad[8:].abs().sum() == 0  # unseen rows get no gradient
    model.eval()
    torch.testing.assert_close(
        model.candidate_embeddings(torch.tensor([9])),
        model.location_output_projection(model._standardized_features(torch.tensor([9]))),
    )
    before = model._residuals()[:8].clone()
    model.set_location_features(torch.randn(1, FEATURE_DIM), ["new"], append=True)  # a new place: features only
    assert model.residual_mask.tolist() == seen.tolist() + [False]
    torch.testing.assert_close(model._residuals()[:8], before)
    assert torch.isfinite(model(**random_batch()).logits).all()
    model.save_pretrained(tmp_path / "m")
    again = MHSAForNextLocation.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(again(**random_batch()).logits, model(**random_batch()).logits)
    with pytest.raises(ValueError, match="needs `location_encoder='features'`"):
        tiny_config("id", location_residual=True)
    with pytest.raises(ValueError, match="location_residual=True"):
        tiny_model("features").set_residual_mask(seen)


def test_cli_train_evaluate_and_calliper_folder_refused(prepared_dir, tmp_path, capsys):
    """`mobility train mhsa` passes its options to train/mhsa.py; `mobility evaluate RUN` recognises an MHSA run; a
    CaLLiPer folder is refused with a hint."""
    from train.cli import main as cli

    run = tmp_path / "cli-run"
    args = ["-q", "train", "mhsa", "--config", str(RECIPES / "mhsa_demo.yaml"), "--data", str(prepared_dir),
            "--output-dir", str(run), "--location-encoder", "id", "--evaluate", "false"]
    for key, value in TINY_RECIPE.items():
        args += [f"--{key}", str(value)]
    assert cli(args) == 0
    assert not (run / "metrics.json").exists()
    assert cli(["-q", "evaluate", str(run), "--data", str(prepared_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| mhsa-id |" in printed and "| markov |" in printed and "every location ranked" in printed
    assert json.loads((run / "metrics.json").read_text())["results"]["mhsa-id"]["num_samples"] > 0
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "run_info.json").write_text(json.dumps({"method": "calliper"}))
    assert cli(["-q", "evaluate", str(tmp_path / "cal"), "--data", str(prepared_dir)]) == 2
    assert "not a next-location predictor" in capsys.readouterr().err
