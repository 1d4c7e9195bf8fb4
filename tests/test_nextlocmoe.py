"""NextLocMoE training side: visit windows, KD-tree ranking, recipes, a tiny end-to-end run and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataset_builders.publish import load_prepared
from train.nextlocmoe import (
    EARTH_RADIUS_M,
    build_nextlocmoe_samples,
    evaluate_nextlocmoe,
    kdtree_ranks,
    load_recipe,
    mercator_xy,
    pointer_ranks,
    train_nextlocmoe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mercator_known_values():
    xy = mercator_xy([0.0, 180.0, -90.0], [0.0, 0.0, 45.0])
    assert np.allclose(xy[0], [0.0, 0.0])
    assert np.isclose(xy[1, 0], np.pi * EARTH_RADIUS_M)
    assert np.isclose(xy[2, 0], -np.pi / 2 * EARTH_RADIUS_M)
    assert np.isclose(xy[2, 1], EARTH_RADIUS_M * np.log(np.tan(np.pi / 4 + np.radians(45.0) / 2)))


def test_kdtree_ranks_of_a_known_point():
    cand = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    pred = np.array([[0.9, 0.0], [0.9, 0.0], [0.0, 0.0], [2.0, 0.0]])
    # distances from (0.9, 0): 0.9, 0.1, 2.1, 2.19, ~13.4 -> order 1, 0, 2, 3, 4
    ranks, topk = kdtree_ranks(pred, cand, np.array([1, 3, 4, 1]), k=3)
    assert ranks[0] == 1 and ranks[1] == 4 and ranks[2] == 5
    # from (2, 0) candidates 1 and 2 are both at distance 1: a tie counts against the model
    assert ranks[3] == 2
    assert topk.shape == (4, 3)
    assert topk[0].tolist() == [1, 0, 2]
    assert topk[2].tolist() == [0, 1, 3]
    ranks, _ = kdtree_ranks(pred[:1], cand, np.array([-1]))
    assert np.isinf(ranks[0])
    with pytest.raises(ValueError, match="NaN"):
        kdtree_ranks(np.array([[np.nan, 0.0]]), cand, np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        kdtree_ranks(pred, cand[:, :1], np.array([0, 0, 0, 0]))


def test_pointer_ranks_hand_worked():
    """Window places first by summed pointer mass, then the other candidates by distance from the point; ties
    against the model."""
    cand = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0], [40.0, 0.0]])
    window = np.array([[1, 1, 3], [-1, 1, 3], [1, 3, -1], [2, 4, 2]])
    probs = np.array([[0.2, 0.3, 0.4], [0.0, 0.5, 0.4], [0.5, 0.4, 0.0], [0.25, 0.5, 0.25]])
    pred = np.zeros((4, 2))
    # row 0: place 1 has 0.5, place 3 0.4 -> target 3 ranks 2; row 1: target 4 is outside the window: 2 window places,
    # then 0 (0 m), 2 (20 m), 4 (40 m) -> 5; row 2: target 0 -> 2 + 1; row 3: places 2 and 4 tie at 0.5 -> 2
    ranks = pointer_ranks(window, probs, pred, cand, np.array([3, 4, 0, 2]))
    assert ranks.tolist() == [2.0, 5.0, 3.0, 2.0]
    given = kdtree_ranks(pred, cand, np.array([3, 4, 0, 2]))[0]  # the caller's point ranks give the same
    assert pointer_ranks(window, probs, pred, cand, np.array([3, 4, 0, 2]), point_ranks=given).tolist() == ranks.tolist()
    ranks = pointer_ranks(window, probs, pred, cand, np.array([1, -1, 3, 0]))
    assert ranks[0] == 1 and np.isinf(ranks[1]) and ranks[2] == 2 and ranks[3] == 3
    # without any window visit the ranking is the point's (kdtree_ranks)
    empty = np.full((4, 3), -1)
    target = np.array([0, 1, 2, 4])
    assert np.array_equal(pointer_ranks(empty, np.zeros((4, 3)), pred, cand, target),
                          kdtree_ranks(pred, cand, target)[0])
    with pytest.raises(ValueError, match="shape"):
        pointer_ranks(window, probs[:, :2], pred, cand, target)
    with pytest.raises(ValueError, match="beyond"):
        pointer_ranks(window + 5, probs, pred, cand, target)


def test_windows_come_from_the_visits_before_the_target(small_city_dir):
    data = load_prepared(small_city_dir)
    s = build_nextlocmoe_samples(data, "test", history_length=6, current_length=3)
    table = data.table("samples", "test")
    assert len(s) == table.num_rows
    assert s.history_xy.shape == (len(s), 6, 2) and s.current_xy.shape == (len(s), 3, 2)
    # the last visit of the window is the last visit of the sample's (7-day) history, and it is before the target
    locations = data.table("locations")
    ids = locations.column("location_id").to_pylist()
    loc_xy = mercator_xy(locations.column("longitude").to_numpy(), locations.column("latitude").to_numpy())
    last_hist = [h[-1] for h in table.column("history_location_ids").to_pylist()]
    expected = loc_xy[[ids.index(v) for v in last_hist]]
    assert s.current_mask[:, -1].all()
    assert np.allclose(s.current_xy[:, -1], expected, atol=1.0)
    # the duration of the last visit runs to the target's time
    last_ts = np.array([h[-1] for h in table.column("history_timestamps").to_pylist()])
    hours = (table.column("target_timestamp").to_numpy() - last_ts) / 3600.0
    assert np.allclose(s.current_duration[:, -1], hours, atol=1e-3)
    # windows are left-padded: once a step is real, every later step is real
    mask = np.concatenate([s.history_mask, s.current_mask], axis=1)
    assert (np.diff(mask.astype(int), axis=1) >= 0).all()
    # the window = the sample's own history, completed with the user's earlier check-ins: never a visit at or after
    # the target, and as many steps as there are (at most 9)
    import pandas as pd

    allc = pd.concat([data.table("checkins", sp).to_pandas() for sp in data.splits("checkins")])
    users = table.column("user_id").to_pylist()
    histories = table.column("history_timestamps").to_pylist()
    for i in range(0, len(s), max(1, len(s) // 20)):
        older = int(((allc.user_id == users[i]) & (allc.timestamp < histories[i][0])).sum())
        assert mask[i].sum() == min(9, len(histories[i]) + older)
    assert (s.target_xy == loc_xy[s.target_index]).all()


def test_recipe_validation():
    with pytest.raises(ValueError, match="moe_layers"):
        load_recipe(moe_layers="one,two")
    with pytest.raises(ValueError, match="routing_threshold|lr_scheduler_type|learning_rate"):
        load_recipe(learning_rate=0)
    with pytest.raises(ValueError, match="unknown|allowed"):
        load_recipe(no_such_key=1)
    assert load_recipe(moe_layers="1, 3").moe_layer_list() == [1, 3]
    from train.nextlocmoe import main, parse_recipe

    with pytest.raises(ValueError, match="--output-dir"):
        main(["--data", "somewhere"])
    recipe = parse_recipe(["--config", "train/recipes/nextlocmoe_demo.yaml", "--max-epochs", "7", "--moe_layers", "0,1"])
    assert recipe.max_epochs == 7 and recipe.moe_layer_list() == [0, 1] and recipe.load_balance_weight == 100
    paper = load_recipe("train/recipes/nextlocmoe_paper.yaml")
    assert paper.moe_layer_list() == [8, 10] and paper.num_backbone_layers == 12 and paper.entropy_weight == 300


def test_grid_data_trains_on_its_visits_with_the_pointer(tmp_path):
    """A grid dataset: the sample builder refuses it with a pointer to the conversion; training and evaluation read it
    as visits at cell centres (converted once into the run folder, reused, a temporary folder with write=False), here
    with the history pointer, whose report also holds the paper's point ranking."""
    from dataset_builders.preprocess import GridPreprocessConfig, prepare_grid
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import LoadedGrid
    from dataset_builders.schema import RowAccount
    from dataset_builders.synthetic import synthesize_grid

    grid = synthesize_grid(num_users=12, num_days=12, seed=0)
    loaded = LoadedGrid(grid, RowAccount(), {"format": "yjmob", "grid_size": 200, "coordinate_base": 1})
    prepared = prepare_grid(loaded, GridPreprocessConfig(predict_days=(10, 11), user_fractions=(0.5, 0.25, 0.25)))
    folder = write_prepared(prepared, tmp_path / "grid")
    with pytest.raises(ValueError, match="grid-visits"):
        build_nextlocmoe_samples(load_prepared(folder), "test")

    out = tmp_path / "run"
    result = train_nextlocmoe(folder, out, backbone="tiny", history_length=6, current_length=2, location_dim=8,
                              time_dim=4, duration_dim=4, tcn_levels=2, router_hidden_size=8, lora_rank=2,
                              lora_alpha=2, history_pointer=True, pointer_size=8, max_epochs=1, batch_size=64,
                              max_train_samples=256, learning_rate=3e-3, warmup_ratio=0.0, progress=False)
    info = result.run_info
    assert info["data"] == str(folder.resolve()) and info["history_pointer"] is True
    visits = load_prepared(info["grid_visits"])
    assert visits.kind == "checkins" and visits.metadata["source"] == "grid"
    assert [p.parent.name for p in (out / "grid_visits").glob("*/hf_mobility.json")] != []
    res = result.report["results"]["nextlocmoe"]
    assert 0.0 <= res["acc@1"] <= res["acc@10"] <= 1.0 and np.isfinite(res["distance_m"])
    assert 0.0 <= res["point_ranking"]["acc@10"] <= 1.0
    assert result.report["inference"]["samples"] == visits.table("samples", "test").num_rows
    assert "markov" in result.report["results"]
    converted = sorted((out / "grid_visits").iterdir())
    again = evaluate_nextlocmoe(out, folder, max_samples=10, write=False)
    assert sorted((out / "grid_visits").iterdir()) == converted  # reused, nothing new in the run
    assert again["inference"]["samples"] == 10


@pytest.fixture(scope="module")
def tiny_run(small_city_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nlm") / "run"
    result = train_nextlocmoe(small_city_dir, out, backbone="tiny", history_length=8, current_length=3,
                              location_dim=16, time_dim=4, duration_dim=4, tcn_levels=2, router_hidden_size=16,
                              lora_rank=4, lora_alpha=4, load_balance_weight=5.0, max_epochs=2, batch_size=32,
                              learning_rate=3e-3,
                              warmup_ratio=0.0, progress=False)
    return result


def test_tiny_run_trains_saves_and_evaluates(tiny_run, small_city_dir):
    out = tiny_run.output_dir
    for name in ("model/config.json", "model/model.safetensors", "run_info.json", "recipe.yaml", "README.md",
                 "metrics.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["method"] == "nextlocmoe" and info["backbone"] == "tiny"
    losses = [e["loss"] for e in tiny_run.history if "loss" in e]
    assert losses and all(np.isfinite(losses))
    report = tiny_run.report
    res = report["results"]["nextlocmoe"]
    assert 0.0 <= res["acc@1"] <= res["acc@5"] <= res["acc@10"] <= 1.0
    assert res["distance_m"] > 0 and np.isfinite(res["distance_m"])
    for baseline in ("markov", "most-frequent", "nearest"):
        assert baseline in report["results"]
    # the same samples: every baseline counts as many samples as the model
    n = report["inference"]["samples"]
    assert n == load_prepared(small_city_dir).table("samples", "test").num_rows
    assert len(report["routing"]["overall"]) == 11
    assert abs(sum(report["routing"]["overall"]) - 1.0) < 1e-3
    card = (out / "README.md").read_text()
    assert "Mean distance" in card and "arXiv 2505.24597" in card
    assert "load-balancing term (weight 5" in card  # the deviation from the paper is stated

    # a reload from the folder scores the first 25 samples, and the baselines the same 25
    again = evaluate_nextlocmoe(out, small_city_dir, max_samples=25)
    assert again["inference"]["samples"] == 25
    sub = again["results"]["nextlocmoe"]
    assert 0.0 <= sub["acc@10"] <= 1.0
    # per-city normalisation on the training city uses the same statistics, so the same predictions; write=False
    # leaves the run's metrics.json alone
    before = (out / "metrics.json").read_text()
    same = evaluate_nextlocmoe(out, small_city_dir, max_samples=25, normalize_per_city=True, write=False)
    assert same["results"]["nextlocmoe"] == sub
    assert same["normalization"]["per_city"] and same["normalization"]["coord_mean"] == info["coord_mean"]
    assert (out / "metrics.json").read_text() == before


def test_cli_train_and_evaluate(tiny_run, small_city_dir, tmp_path, capsys):
    from train.cli import main

    main(["evaluate", str(tiny_run.output_dir), "--data", str(small_city_dir), "--out", str(tmp_path / "m.json")])
    text = capsys.readouterr().out
    assert "nextlocmoe" in text and "mean distance" in text
    assert json.loads((tmp_path / "m.json").read_text())["results"]["nextlocmoe"]["acc@1"] >= 0
    with pytest.raises(SystemExit):
        main(["train", "nextlocmoe", "--no-such-option", "1"])


def test_demo_routing_summary_by_hand():
    from train.demo import _routing_summary

    routing = {"roles": ["a", "b", "c"], "overall": [0.5, 0.3, 0.2], "by_archetype": {
        "office_worker": {"samples": 100, "weights": [0.7, 0.2, 0.1]},
        "student": {"samples": 50, "weights": [0.1, 0.3, 0.6]},
        "visitor": {"samples": 3, "weights": [0.0, 0.0, 1.0]},  # too few samples to be compared
    }}
    rows, spread = _routing_summary(routing)
    assert rows[0] == "| office_worker | 100 | a 0.70, b 0.20, c 0.10 |"
    assert rows[1] == "| student | 50 | c 0.60, b 0.30, a 0.10 |"
    assert len(rows) == 3
    assert spread == pytest.approx(0.5 * (0.6 + 0.1 + 0.5))
