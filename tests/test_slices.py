"""Evaluation slices ("abnormal scenarios"): long-tail targets and per-value slices of a check-in column, from the
readers (extra CSV columns kept) through `evaluate_baselines`, the tables and `mobility evaluate --slice-by`."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from dataset_builders.publish import load_prepared, write_dataset
from dataset_builders.readers import read_dataset
from train.baselines import fit_checkin_baseline
from train.cli import main
from train.evaluate import (
    LONG_TAIL_FRACTION,
    MAX_SLICE_VALUES,
    evaluate_baselines,
    format_results_table,
    long_tail_locations,
    sample_slices,
    slice_metrics,
)
from train.metrics import ranking_metrics

LOCATIONS = list("ABCDEFGHIJ")
# training visits: A5 B3 C1 D1 E2 F1 G4 H0 I2 J1. Sorted by (visits, id): H0 C1 D1 F1 J1 E2 I2 B3 G4 A5; the tail is
# the first ceil(0.2 * 10) = 2 of them: H (never visited in training) and C (1 visit; D, F and J also have 1 visit but
# come after C by id)
TRAIN_VISITS = {"A": 5, "B": 3, "C": 1, "D": 1, "E": 2, "F": 1, "G": 4, "I": 2, "J": 1}
# test samples: (user, target, target timestamp, history)
SAMPLES = [
    ("u1", "H", 100, ["A"]),
    ("u1", "C", 200, ["H"]),
    ("u2", "A", 300, ["B"]),
    ("u2", "D", 400, ["A"]),
    ("u3", "A", 500, ["G"]),  # no check-in row at t=500: its weather is "missing"
    ("u3", "B", 600, ["A"]),
    ("u1", "E", 700, ["A"]),
]
# target check-in rows of the test split: (user, location, timestamp, weather); u2/A/300 twice (the first row wins)
TEST_CHECKINS = [
    ("u1", "A", 50, "sun"), ("u1", "H", 100, "rain"), ("u1", "C", 200, "sun"), ("u2", "B", 250, "snow"),
    ("u2", "A", 300, "rain"), ("u2", "A", 300, "snow"), ("u2", "D", 400, None), ("u3", "G", 450, "sun"),
    ("u3", "A", 499, "sun"), ("u3", "B", 600, "rain"), ("u1", "E", 700, "fog"),
]


def _checkins(rows, weather=True) -> pa.Table:
    cols = {
        "user_id": pa.array([r[0] for r in rows], pa.string()),
        "location_id": pa.array([r[1] for r in rows], pa.string()),
        "timestamp": pa.array([r[2] for r in rows], pa.int64()),
        "tz_offset_min": pa.array([0] * len(rows), pa.int16()),
        "latitude": pa.array([40.0] * len(rows)),
        "longitude": pa.array([-74.0] * len(rows)),
    }
    if weather:
        cols["weather"] = pa.array([r[3] for r in rows], pa.string())
    return pa.table(cols)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A hand-made prepared check-in dataset (train check-ins without extra columns, like an older prepared folder;
    test check-ins with `weather`)."""
    train_rows, t = [], 0
    for loc, n in TRAIN_VISITS.items():
        for i in range(n):
            t += 1
            train_rows.append((f"u{1 + i % 3}", loc, t))
    samples = pa.table({
        "sample_id": pa.array(range(len(SAMPLES)), pa.int64()),
        "user_id": [s[0] for s in SAMPLES],
        "history_location_ids": pa.array([s[3] for s in SAMPLES], pa.list_(pa.string())),
        "history_timestamps": pa.array([[s[2] - 10] for s in SAMPLES], pa.list_(pa.int64())),
        "history_tz_offset_min": pa.array([[0] for _ in SAMPLES], pa.list_(pa.int16())),
        "target_location_id": [s[1] for s in SAMPLES],
        "target_timestamp": pa.array([s[2] for s in SAMPLES], pa.int64()),
        "target_tz_offset_min": pa.array([0] * len(SAMPLES), pa.int16()),
        "target_seen": [s[1] != "H" for s in SAMPLES],
    })
    locations = pa.table({
        "location_id": LOCATIONS,
        "latitude": [40.0 + i / 100 for i in range(10)],
        "longitude": [-74.0 + i / 100 for i in range(10)],
        "category": ["Cafe" if loc in "ABC" else "Park" for loc in LOCATIONS],
        "heldout": [loc == "H" for loc in LOCATIONS],
    })
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(out, {"samples": {"test": samples},
                        "checkins": {"train": _checkins(train_rows, weather=False), "test": _checkins(TEST_CHECKINS)},
                        "locations": {"train": locations}},
                  metadata={"kind": "checkins", "day0_weekday": 3})
    return load_prepared(out)


def test_long_tail_is_the_bottom_fifth_of_the_location_table_ties_by_id(tiny):
    tail = long_tail_locations(tiny)
    assert LONG_TAIL_FRACTION == 0.2
    assert tail.index.tolist() == ["H", "C"] and tail.tolist() == [0, 1]
    masks = sample_slices(tiny, "test")
    assert list(masks) == ["long_tail"]
    np.testing.assert_array_equal(masks["long_tail"], [True, True, False, False, False, False, False])
    assert long_tail_locations(tiny, fraction=0.5).index.tolist() == ["H", "C", "D", "F", "J"]
    with pytest.raises(ValueError, match="fraction"):
        long_tail_locations(tiny, fraction=0.0)


def test_value_slices_join_the_target_checkin(tiny):
    masks = sample_slices(tiny, "test", slice_by="weather")
    # most frequent first, "missing" (an empty value, and a sample without a matching check-in) last
    # (ties by value: fog before sun)
    assert list(masks) == ["long_tail", "weather=rain", "weather=fog", "weather=sun", "weather=missing"]
    np.testing.assert_array_equal(masks["weather=rain"], [True, False, True, False, False, True, False])
    np.testing.assert_array_equal(masks["weather=fog"], [False, False, False, False, False, False, True])
    np.testing.assert_array_equal(masks["weather=sun"], [False, True, False, False, False, False, False])
    np.testing.assert_array_equal(masks["weather=missing"], [False, False, False, True, True, False, False])
    # aligned to the given sample ids; a column only the location table has comes from the target location
    masks = sample_slices(tiny, "test", sample_ids=[5, 0, 4], slice_by=["weather", "category"])
    np.testing.assert_array_equal(masks["long_tail"], [False, True, False])
    np.testing.assert_array_equal(masks["weather=rain"], [True, True, False])
    np.testing.assert_array_equal(masks["weather=missing"], [False, False, True])
    np.testing.assert_array_equal(masks["category=Cafe"], [True, False, True])
    np.testing.assert_array_equal(masks["category=Park"], [False, True, False])


def test_many_values_are_grouped_not_dropped(tiny, monkeypatch):
    import train.evaluate as ev

    monkeypatch.setattr(ev, "MAX_SLICE_VALUES", 2)
    masks = sample_slices(tiny, "test", slice_by="weather")
    assert list(masks) == ["long_tail", "weather=rain", "weather=(other)", "weather=missing"]
    np.testing.assert_array_equal(masks["weather=(other)"], [False, True, False, False, False, False, True])
    assert MAX_SLICE_VALUES == 20


def test_unknown_column_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="no column 'nope'") as err:
        sample_slices(tiny, "test", slice_by="nope")
    assert "weather" in str(err.value) and "category" in str(err.value)
    with pytest.raises(ValueError, match="no column 'weather'"):  # an older folder: no extra check-in column
        evaluate_baselines(_old_folder(tiny), "popularity", split="test", slice_by="weather")


def _old_folder(tiny):
    """A copy of `tiny` whose test check-ins have no extra column (an older prepared folder)."""
    out = tiny.path.parent / "old"
    if not out.exists():
        write_dataset(out, {"samples": {"test": tiny.table("samples", "test")},
                            "checkins": {"train": tiny.table("checkins", "train"),
                                         "test": tiny.table("checkins", "test").drop_columns(["weather"])},
                            "locations": {"train": tiny.table("locations")}},
                      metadata={"kind": "checkins"})
    return out


def test_slice_metrics_by_hand():
    ranks = np.array([1, 2, np.inf, 4, 10, 1])
    slices = {"a": np.array([1, 1, 0, 0, 0, 0], bool), "b": np.array([0, 0, 1, 1, 1, 0], bool),
              "empty": np.zeros(6, bool)}
    out = slice_metrics(ranks, slices)
    assert list(out) == ["a", "b"]  # empty slices are left out
    a, b = out["a"], out["b"]
    assert a["num_samples"] == 2 and a["acc@1"] == 0.5 and a["acc@5"] == 1.0 and a["mrr"] == pytest.approx(0.75)
    assert a["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert b["num_samples"] == 3 and b["acc@1"] == 0.0 and b["acc@5"] == pytest.approx(1 / 3)
    assert b["acc@10"] == pytest.approx(2 / 3) and b["mrr"] == pytest.approx((0 + 1 / 4 + 1 / 10) / 3)
    assert b["ndcg@10"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(11)) / 3)
    with pytest.raises(ValueError, match="entries"):
        slice_metrics(ranks, {"short": np.ones(3, bool)})


def test_evaluate_baselines_slices_and_table(tiny):
    report = evaluate_baselines(tiny, "all", split="test", slice_by="weather")
    samples = tiny.table("samples", "test")
    train = tiny.table("checkins", "train").to_pandas()
    masks = sample_slices(tiny, "test", slice_by="weather")
    assert report["slice_info"] == {"long_tail": {"fraction": 0.2, "num_locations": 2, "of_locations": 10,
                                                  "max_train_visits": 1}, "slice_by": ["weather"]}
    for name, res in report["results"].items():
        ranks = fit_checkin_baseline(name, train, LOCATIONS).rank(samples)
        assert set(res["slices"]) == {"long_tail", "weather=rain", "weather=fog", "weather=sun", "weather=missing"}
        for key, mask in masks.items():
            assert res["slices"][key] == ranking_metrics(ranks[mask])
        counts = {k: v["num_samples"] for k, v in res["slices"].items()}
        assert counts == {"long_tail": 2, "weather=rain": 3, "weather=fog": 1, "weather=sun": 1, "weather=missing": 2}
    text = format_results_table(report)
    plain = format_results_table({**report, "results": {n: {k: v for k, v in r.items() if k != "slices"}
                                                        for n, r in report["results"].items()}})
    assert text.startswith(plain + "\n\n")  # the existing tables unchanged, the slices after them
    assert ("Long-tail targets (bottom 20% of locations by training visits, ties by location id; 2 of 10 locations, "
            "at most 1 training visit each)") in text
    for title in ("Samples with weather=rain:", "Samples with weather=sun:", "Samples with weather=missing"):
        assert title in text
    assert text.index("Long-tail") < text.index("weather=rain") < text.index("weather=fog") < text.index(
        "weather=sun") < text.index("weather=missing")
    assert "| popularity |" in text.split("Samples with weather=sun:")[1]
    # an older prepared folder (no extra columns) still evaluates, with the long-tail slice
    old = evaluate_baselines(_old_folder(tiny), "popularity", split="test")
    assert list(old["results"]["popularity"]["slices"]) == ["long_tail"]


def test_csv_extra_column_survives_prepare_and_slices_the_cli_evaluation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lines = ["uid,venue,ts,lat,lon,weather,"]  # the trailing comma makes an unnamed column, which is not kept
    for u in range(6):
        for day in range(30):
            v = int(rng.integers(0, 8))
            weather = ["rain", "sun", ""][int(rng.integers(0, 3))]
            lines.append(f"u{u},v{v},{1_333_238_400 + day * 86400 + u * 60},{40 + v / 100},{-74 + v / 100},{weather},")
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    loaded = read_dataset("csv", tmp_path / "c.csv", columns="user_id=uid,location_id=venue,timestamp=ts,"
                          "latitude=lat,longitude=lon")
    assert list(loaded.checkins.columns) == ["user_id", "location_id", "timestamp", "tz_offset_min", "latitude",
                                             "longitude", "weather"]
    assert loaded.metadata["extra_checkin_columns"] == ["weather"]
    out = tmp_path / "data"
    assert main(["-q", "data", "prepare", "--format", "csv", "--input", str(tmp_path / "c.csv"), "--out", str(out),
                 "--columns", "user_id=uid,location_id=venue,timestamp=ts,latitude=lat,longitude=lon",
                 "--min-location-visits", "1", "--min-user-visits", "1"]) == 0
    data = load_prepared(out)
    test = data.table("checkins", "test").to_pandas()
    assert test.columns.tolist()[-1] == "weather" and data.metadata["extra_checkin_columns"] == ["weather"]
    assert set(test["weather"].dropna()) == {"rain", "sun"} and test["weather"].isna().any()
    capsys.readouterr()

    assert main(["-q", "evaluate", "--data", str(out), "--slice-by", "weather", "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "Long-tail targets (bottom 20% of locations" in printed and "Samples with weather=rain:" in printed
    report = json.loads((tmp_path / "m.json").read_text())
    n = data.table("samples", "test").num_rows
    for res in report["results"].values():
        values = {k: v["num_samples"] for k, v in res["slices"].items() if k.startswith("weather=")}
        assert set(values) == {"weather=rain", "weather=sun", "weather=missing"} and sum(values.values()) == n

    assert main(["-q", "evaluate", "--data", str(out), "--slice-by", "wind", "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "no column 'wind'" in err and "weather" in err

    grid = tmp_path / "grid"
    write_dataset(grid, {"samples": {"test": pa.table({"uid": [1]})}}, metadata={"kind": "grid"})
    assert main(["-q", "evaluate", "--data", str(grid), "--slice-by", "weather"]) == 2
    assert "check-in data only" in capsys.readouterr().err


def test_small_slices_get_one_line_instead_of_a_table():
    from train.metrics import ranking_metrics

    res = ranking_metrics(np.array([1.0, 3.0, 30.0]))
    res["slices"] = {"long_tail": ranking_metrics(np.array([2.0]))}
    report = {"kind": "checkins", "split": "test", "results": {"m": res},
              "slice_info": {"long_tail": {"fraction": 0.2, "num_locations": 2, "of_locations": 10,
                                           "max_train_visits": 1}}}
    full = format_results_table(report)
    assert full.count("| m |") == 2  # the main table and the long-tail table
    short = format_results_table(report, min_slice_samples=20)
    assert short.count("| m |") == 1 and ": 1 sample(s), too few for a table" in short
    assert short.split("\n")[-1].startswith("Long-tail targets (bottom 20% of locations")
