"""Grid datasets as check-in datasets (dataset_builders/grid_visits.py): stays, cell centres, splits, samples, CLI."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from datasets import load_dataset

from dataset_builders.descriptions import EARTH_RADIUS_M, great_circle_m
from dataset_builders.grid_visits import cell_centres, grid_to_checkins, grid_visits
from dataset_builders.preprocess import GridPreprocessConfig, local_time_features, prepare_grid
from dataset_builders.publish import load_prepared, write_prepared
from dataset_builders.readers.base import LoadedGrid
from dataset_builders.schema import RowAccount
from train.cli import main

H = (5, 5)  # everyone's home


def _user_rows(u: int, target_cells: bool = True) -> list[tuple[int, int, int, int, int]]:
    """15 records of user u over days 0-3 (day 3 = target day) that make 9 stays (hand-counted below)."""
    W, P = (10 + u, 5), (50 + u, 50)  # a workplace, and a place only u goes to (on the target day)
    cells = [
        (0, 0, H), (0, 1, H),  # stay 1 (d0 t0 H)
        (0, 16, W), (0, 17, W),  # stay 2
        (0, 36, H), (1, 0, H),  # stay 3, across midnight (d0 t36 H)
        (1, 18, W),  # stay 4
        (1, 40, H),  # stay 5
        (2, 10, W), (2, 12, W), (2, 13, W),  # stay 6 (d2 t10 W); a hidden cell at t11 is injected for user 0
        (3, 1, H),  # stay 7: the first target-day visit
        (3, 20, P), (3, 21, P),  # stay 8
        (3, 30, H),  # stay 9
    ]
    hidden = (999, 999)
    return [(u, d, t, *(c if target_cells or d < 3 else hidden)) for d, t, c in cells]


VISITS = [(0, 0, "H"), (0, 16, "W"), (0, 36, "H"), (1, 18, "W"), (1, 40, "H"), (2, 10, "W"), (3, 1, "H"),
          (3, 20, "P"), (3, 30, "H")]


def _cell(u: int, name: str) -> str:
    return {"H": "5_5", "W": f"{10 + u}_5", "P": f"{50 + u}_50"}[name]


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """Users 0-3 split 2/1/1 by user, user 4 in the hidden split (its target cells are 999); the train grid table gets
    one hidden cell (user 0, day 2, slot 11), as a hand-made grid might have."""
    rows = [r for u in range(4) for r in _user_rows(u)] + _user_rows(4, target_cells=False)
    g = pd.DataFrame(rows, columns=["uid", "d", "t", "x", "y"]).astype(
        {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"}
    )
    loaded = LoadedGrid(g, RowAccount(), {"format": "yjmob", "grid_size": 200, "coordinate_base": 1,
                                          "slots_per_day": 48, "source_files": ["hand-made"]})
    prepared = prepare_grid(loaded, GridPreprocessConfig(predict_days=(3, 3), user_fractions=(0.5, 0.25, 0.25),
                                                         day0_weekday=5))
    split_of = {u: s for s, t in prepared.samples.items() for u in t.column("uid").to_pylist()}
    table = prepared.grid[split_of[0]]  # user 0 may be in any split: the hidden cell goes into its table
    extra = pa.table({"uid": pa.array([0], pa.int64()), "d": pa.array([2], pa.int16()), "t": pa.array([11], pa.int8()),
                      "x": pa.array([999], pa.int16()), "y": pa.array([999], pa.int16())})
    prepared.grid[split_of[0]] = pa.concat_tables([table, extra.cast(table.schema)])  # appended: out of order
    out = write_prepared(prepared, tmp_path_factory.mktemp("grid") / "grid")
    return out, split_of


@pytest.fixture(scope="module")
def converted(grid_dir, tmp_path_factory):
    folder, split_of = grid_dir
    out = grid_to_checkins(folder, tmp_path_factory.mktemp("ck") / "checkins")
    return out, split_of


def test_stays_merge_and_the_row_account(converted):
    out, split_of = converted
    data = load_prepared(out)
    assert data.kind == "checkins"
    steps = {s.name.split(":")[0].split(" (")[0]: s for s in data.account.steps}
    read = steps["grid records of the train/validation/test users"]
    assert read.rows_in == 4 * 15 + 1 + 15 and read.rows_kept == 60
    assert read.dropped == {"hidden_split_user": 15, "hidden_cell": 1}
    assert read.notes["hidden_split_users"] == 1
    stays = steps["stays"]
    assert (stays.rows_in, stays.rows_kept, stays.dropped) == (60, 36, {"same_cell_as_previous_record": 24})
    assert data.account.steps[0].name.startswith("split days")  # the grid dataset's own steps come first
    checkins = pd.concat([data.table("checkins", s).to_pandas() for s in ("train", "validation", "test")])
    assert len(checkins) == 36 == data.metadata["num_checkins"]
    for u in range(4):
        mine = checkins[checkins["user_id"] == str(u)].sort_values("timestamp")
        expected_ts = [(d * 48 + t) * 1800 for d, t, _ in VISITS]
        assert mine["timestamp"].tolist() == expected_ts
        assert mine["location_id"].tolist() == [_cell(u, c) for _, _, c in VISITS]
    assert (checkins["tz_offset_min"] == 0).all()
    # the weekday of the grid's day 0 is carried: day 3 with day 0 a Saturday is a Tuesday
    assert data.metadata["day0_weekday"] == 5 and data.metadata["time_reference"] == "relative_day0"
    _, _, _, weekday = local_time_features(np.array([(3 * 48 + 20) * 1800]), 0, data.metadata["day0_weekday"])
    assert weekday.tolist() == [1]
    meta = data.metadata
    assert meta["source"] == "grid" and meta["source_path"].endswith("grid") and meta["cell_size_m"] == 500.0
    assert meta["origin"] == [35.0, 135.0] and meta["predict_days"] == [3, 3] and meta["extra_checkin_columns"] == []
    assert meta["num_users"] == 4 and meta["num_heldout_locations"] == 0


def test_cell_centres_hand_computed():
    lat, lon = cell_centres(np.array([1, 2, 1]), np.array([1, 1, 2]))
    m_per_deg = np.pi * EARTH_RADIUS_M / 180.0  # 111,194.9 m per degree on the library's sphere
    assert lat[0] == pytest.approx(35.0 - 250.0 / m_per_deg, abs=1e-12)
    assert lon[0] == pytest.approx(135.0 + 250.0 / (m_per_deg * np.cos(np.radians(lat[0]))), abs=1e-12)
    assert lat[2] < lat[0] and lat[1] == lat[0]  # y grows south, x east
    assert lon[1] > lon[0] and lon[2] == pytest.approx(lon[0], abs=1e-3)
    east = great_circle_m(lat[:1], lon[:1], lat[1:2], lon[1:2])[0]
    south = great_circle_m(lat[:1], lon[:1], lat[2:3], lon[2:3])[0]
    assert east == pytest.approx(500.0, rel=0.005) and south == pytest.approx(500.0, rel=0.005)
    # the far corner of a 200 x 200 grid: still 500 m cells, and 199 cells = 99.5 km from the first
    far_lat, far_lon = cell_centres(np.array([200, 199, 200]), np.array([200, 200, 199]))
    assert great_circle_m(far_lat[:1], far_lon[:1], far_lat[1:2], far_lon[1:2])[0] == pytest.approx(500, rel=1e-4)
    assert great_circle_m(far_lat[:1], far_lon[:1], far_lat[2:3], far_lon[2:3])[0] == pytest.approx(500, rel=1e-4)
    diag = great_circle_m(lat[:1], lon[:1], far_lat[:1], far_lon[:1])[0]
    assert diag == pytest.approx(199 * 500 * np.sqrt(2), rel=0.005)
    # base 0: cell (0, 0) is where base 1 has (1, 1)
    assert cell_centres(np.array([0]), np.array([0]), coordinate_base=0)[0][0] == lat[0]
    with pytest.raises(ValueError, match="latitude"):
        cell_centres(np.array([1]), np.array([1]), origin=(95.0, 0.0))
    with pytest.raises(ValueError, match="hidden"):
        cell_centres(np.array([999]), np.array([999]))
    with pytest.raises(ValueError, match="cell_size_m"):
        cell_centres(np.array([1]), np.array([1]), cell_size_m=0)


def test_locations_are_the_visited_cells(converted):
    out, _ = converted
    locations = load_prepared(out).table("locations").to_pandas()
    ids = ["5_5"] + [f"{10 + u}_5" for u in range(4)] + [f"{50 + u}_50" for u in range(4)]
    assert locations["location_id"].tolist() == sorted(ids)
    assert not locations["heldout"].any()
    assert list(locations.columns) == ["location_id", "latitude", "longitude", "heldout"]
    row = locations.set_index("location_id").loc["50_50"]
    lat, lon = cell_centres(np.array([50]), np.array([50]))
    assert (row["latitude"], row["longitude"]) == (lat[0], lon[0])
    # check-ins carry the coordinates of their cell
    train = load_prepared(out).table("checkins", "train").to_pandas()
    merged = train.merge(locations, on="location_id", suffixes=("", "_loc"))
    assert (merged["latitude"] == merged["latitude_loc"]).all()
    assert (merged["longitude"] == merged["longitude_loc"]).all()


def test_splits_keep_the_users_and_the_observed_past(converted):
    out, split_of = converted
    data = load_prepared(out)
    train = data.table("checkins", "train").to_pandas()
    for split in ("validation", "test"):
        (user,) = [str(u) for u, s in split_of.items() if s == split]
        evaluated = data.table("checkins", split).to_pandas()
        assert set(evaluated["user_id"]) == {user} and len(evaluated) == 3
        assert (evaluated["timestamp"] >= 3 * 86400).all()  # target day only
        mine = train[train["user_id"] == user]
        assert len(mine) == 6 and (mine["timestamp"] < 3 * 86400).all()  # the input days, no target-day visit
    train_users = {str(u) for u, s in split_of.items() if s == "train"}
    assert (train.groupby("user_id").size()[sorted(train_users)] == 9).all()
    assert "4" not in set(train["user_id"])  # the hidden split is left out


def test_samples_windows_and_target_seen(converted, grid_dir):
    out, split_of = converted
    data = load_prepared(out)
    sizes = {s: data.table("samples", s).num_rows for s in ("train", "validation", "test")}
    assert sizes == {"train": 2 * 8, "validation": 3, "test": 3}  # a train user's first visit has no history
    assert data.account.steps[-1].dropped == {"short_history": 2}
    ids = np.concatenate([data.table("samples", s).column("sample_id").to_numpy() for s in sizes])
    assert ids.tolist() == list(range(22))
    for split in sizes:
        samples = data.table("samples", split).to_pandas()
        for hist, target in zip(samples["history_timestamps"], samples["target_timestamp"]):
            assert len(hist) >= 1 and (np.diff(hist) > 0).all() and hist[-1] < target
            assert target // 86400 - hist[0] // 86400 <= 7
    test = data.table("samples", "test").to_pandas()
    (u,) = [x for x, s in split_of.items() if s == "test"]
    assert test["user_id"].tolist() == [str(u)] * 3
    assert test["target_location_id"].tolist() == ["5_5", _cell(u, "P"), "5_5"]
    assert test["target_timestamp"].tolist() == [(3 * 48 + t) * 1800 for t in (1, 20, 30)]
    # histories: every earlier visit (input days, then earlier target-day visits: teacher forcing)
    assert [len(h) for h in test["history_location_ids"]] == [6, 7, 8]
    assert list(test["history_location_ids"][2]) == [_cell(u, c) for _, _, c in VISITS[:8]]
    # home is visited by the train users; the test user's own place never is
    assert test["target_seen"].tolist() == [True, False, True]
    assert data.table("samples", "train").column("target_seen").to_numpy().all()

    # one day of history: the windows start at the day before the target (by the visit's start)
    short = grid_visits(grid_dir[0], history_days=1)
    t = short.samples["test"].to_pandas()
    assert [len(h) for h in t["history_location_ids"]] == [1, 2, 3]
    # the same day only, at least 2 visits: only the last target-day visit keeps a history
    tight = grid_visits(grid_dir[0], history_days=0, min_history=2)
    assert tight.samples["test"].num_rows == 1 and tight.samples["train"].num_rows == 2 * 2  # stays 3 and 9
    assert tight.account.steps[-1].dropped == {"short_history": 24 - 6}


def test_loads_with_datasets_and_the_baselines_run(converted):
    from train.evaluate import evaluate_baselines

    out, _ = converted
    ds = load_dataset(str(out), "samples")
    assert set(ds) == {"train", "validation", "test"}
    assert ds["test"].to_pandas().equals(load_prepared(out).table("samples", "test").to_pandas())
    report = evaluate_baselines(out)
    assert set(report["results"]) == {"popularity", "most-frequent", "history-frequency", "markov"}
    markov = report["results"]["markov"]
    assert markov["num_samples"] == 3 and all(np.isfinite(markov[k]) for k in ("acc@1", "acc@5", "mrr"))
    assert markov["unseen"]["num_samples"] == 1  # the test user's own place


def test_non_grid_datasets_are_refused(converted, tmp_path):
    out, _ = converted
    with pytest.raises(ValueError, match=f"{re.escape(str(out))}.*not a grid dataset"):
        grid_visits(out)
    with pytest.raises(FileNotFoundError):
        grid_visits(tmp_path)
    with pytest.raises(ValueError, match="history_days"):
        grid_to_checkins(out, tmp_path / "x", history_days=-1)


def test_cli(grid_dir, tmp_path, capsys):
    folder, _ = grid_dir
    out = tmp_path / "ck"
    assert main(["-q", "data", "grid-visits", "--data", str(folder), "--out", str(out), "--history-days", "1",
                 "--origin", "40.0,-74.5", "--cell-size-m", "250"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "36 visits" in printed[0] and "test 3" in printed[0]
    meta = load_prepared(out).metadata
    assert meta["origin"] == [40.0, -74.5] and meta["cell_size_m"] == 250.0 and meta["preprocess"]["history_days"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["data", "grid-visits", "--data", str(folder), "--out", str(out), "--origin", "35"])
    assert exc.value.code == 2 and "LAT,LON" in capsys.readouterr().err
    assert main(["data", "grid-visits", "--data", str(folder), "--out", str(out), "--origin", "95,135"]) == 2
    assert "origin" in capsys.readouterr().err
    assert main(["data", "grid-visits", "--data", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "not a grid dataset" in capsys.readouterr().err
