"""Preprocessing (filters, splits, history windows, inductive hold-out, grids) and publishing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import load_dataset

from dataset_builders.preprocess import (
    CheckinPreprocessConfig,
    GridPreprocessConfig,
    local_time_features,
    prepare_checkins,
    prepare_grid,
)
from dataset_builders.publish import load_dataset_folder, load_prepared, write_dataset, write_prepared
from dataset_builders.readers.base import LoadedCheckins, LoadedGrid
from dataset_builders.schema import RowAccount

DAY = 86400
T0 = 1_333_238_400  # 2012-04-01 00:00 UTC, a Sunday


def _loaded(rows: list[tuple[str, str, int]], tz: int = 0) -> LoadedCheckins:
    df = pd.DataFrame(rows, columns=["user_id", "location_id", "timestamp"])
    df["user_id"] = df["user_id"].astype("string")
    df["location_id"] = df["location_id"].astype("string")
    df["timestamp"] = df["timestamp"].astype("int64")
    df["tz_offset_min"] = np.int16(tz)
    codes = df["location_id"].str.slice(1).astype(int)
    df["latitude"] = 40.0 + codes * 0.01
    df["longitude"] = -74.0 + codes * 0.01
    locs = df.drop_duplicates("location_id")[["location_id", "latitude", "longitude"]].reset_index(drop=True)
    locs["category"] = "Cafe"
    return LoadedCheckins(df, locs, RowAccount(), {"format": "test", "day0_weekday": 3})


def test_local_time_features_epoch_and_offset():
    # 2012-04-01 00:30 UTC is 2012-03-31 20:30 at -240 minutes, a Saturday (weekday 5)
    day, hour, minute, weekday = local_time_features(np.array([T0 + 1800]), np.array([-240]))
    assert hour[0] == 20 and minute[0] == 20 * 60 + 30 and weekday[0] == 5
    assert day[0] == (T0 + 1800 - 240 * 60) // DAY


def test_iterative_filter_counts_each_round():
    # u1: l1 x10 + l2 x1; u2: l2 x9; u3: l3 x2 + l1 x9.
    # round 1: locations l1=19, l2=10, l3=2 -> l3 dropped (2 rows); users u1=11, u2=9, u3=9 -> u2, u3 dropped (18).
    # round 2: l1=10, l2=1 -> l2 dropped (1 row); u1=10 stays. round 3: nothing changes.
    rows = [("u1", "l1", T0 + i * DAY) for i in range(10)] + [("u1", "l2", T0 + 11 * DAY)]
    rows += [("u2", "l2", T0 + i * DAY) for i in range(9)]
    rows += [("u3", "l3", T0 + i * DAY) for i in range(2)] + [("u3", "l1", T0 + (i + 3) * DAY) for i in range(9)]
    prepared = prepare_checkins(_loaded(rows), CheckinPreprocessConfig())
    step = prepared.account.steps[-2]
    assert step.name.startswith("filter")
    assert step.dropped == {"location_below_min_visits": 3, "user_below_min_visits": 18}
    assert step.rows_in == len(rows) == 31 and step.rows_kept == 10
    assert step.notes["iterations"] == 3
    assert prepared.metadata["num_users"] == 1 and prepared.metadata["num_locations"] == 1


def test_day_split_and_history_window():
    # one user, one check-in per day on days 0..9 at noon, locations cycle l0..l4 (each visited twice)
    rows = [("u1", f"l{i % 5}", T0 + i * DAY + 12 * 3600) for i in range(10)]
    cfg = CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1)
    prepared = prepare_checkins(_loaded(rows), cfg)
    s = {k: v.to_pandas() for k, v in prepared.samples.items()}
    # max day 9: train day < 5.4 -> days 0..5 (day 0 has no history), validation < 7.2 -> 6, 7; test 8, 9
    assert len(s["train"]) == 5 and len(s["validation"]) == 2 and len(s["test"]) == 2
    assert prepared.account.steps[-1].dropped == {"empty_history": 1}
    # the day-9 target has the visits of days 2..8 (day >= 9 - 7) as history
    last = s["test"].iloc[-1]
    assert list(last["history_location_ids"]) == [f"l{i % 5}" for i in range(2, 9)]
    assert list(last["history_timestamps"]) == [T0 + i * DAY + 12 * 3600 for i in range(2, 9)]
    assert last["target_location_id"] == "l4" and bool(last["target_seen"])
    # sample ids are unique across splits
    ids = np.concatenate([v["sample_id"].to_numpy() for v in s.values()])
    assert len(np.unique(ids)) == len(ids) == 9
    # check-in tables by split
    assert [prepared.checkins[k].num_rows for k in ("train", "validation", "test")] == [6, 2, 2]


def test_max_history_and_min_history():
    rows = [("u1", f"l{i % 3}", T0 + i * 3600) for i in range(12)]  # 12 visits on one day... and a second day
    rows += [("u1", "l0", T0 + DAY + 60)]
    cfg = CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1, max_history=3, min_history=2)
    prepared = prepare_checkins(_loaded(rows), cfg)
    all_samples = pd.concat([t.to_pandas() for t in prepared.samples.values()])
    lens = all_samples["history_location_ids"].map(len)
    assert lens.max() == 3 and lens.min() >= 2
    # targets 0 and 1 have histories of 0 and 1 visits: both dropped as too short
    assert prepared.account.steps[-1].dropped == {"empty_history": 2}


def _city(n_users=30, n_locs=40, days=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for d in range(days):
            for _ in range(rng.integers(1, 4)):
                rows.append((f"u{u}", f"l{rng.integers(0, n_locs)}", T0 + d * DAY + int(rng.integers(0, DAY))))
    return _loaded(rows)


def test_inductive_holdout():
    cfg = CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1, inductive_fraction=0.1, seed=3)
    prepared = prepare_checkins(_city(), cfg)
    locs = prepared.locations.to_pandas()
    held = set(locs.loc[locs["heldout"], "location_id"])
    assert len(held) == 4  # 10% of 40 training locations
    for split in ("train", "validation"):
        s = prepared.samples[split].to_pandas()
        touched = s["history_location_ids"].map(lambda h: bool(held & set(h))) | s["target_location_id"].isin(held)
        assert not touched.any()
        c = prepared.checkins[split].to_pandas()
        assert not c["location_id"].isin(held).any()
    test = prepared.samples["test"].to_pandas()
    touched = test["history_location_ids"].map(lambda h: bool(held & set(h))) | test["target_location_id"].isin(held)
    assert touched.all() and len(test) > 0
    assert (test["target_seen"] == ~test["target_location_id"].isin(held)).all()
    assert (~test["target_seen"]).any()
    # the account adds up and names the inductive drops
    step = prepared.account.steps[-2]
    assert {"inductive_heldout_in_train", "inductive_test_without_heldout"} <= set(step.dropped)
    # seeded: the same seed holds out the same locations, another seed others
    again = prepare_checkins(_city(), cfg).locations.to_pandas()
    assert set(again.loc[again["heldout"], "location_id"]) == held
    cfg2 = CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1, inductive_fraction=0.1, seed=4)
    other = prepare_checkins(_city(), cfg2).locations.to_pandas()
    assert set(other.loc[other["heldout"], "location_id"]) != held


def test_config_validation():
    with pytest.raises(ValueError, match="split_fractions"):
        CheckinPreprocessConfig(split_fractions=(0.8, 0.6))
    with pytest.raises(ValueError, match="inductive_fraction"):
        CheckinPreprocessConfig(inductive_fraction=1.5)
    with pytest.raises(ValueError, match="user_fractions"):
        GridPreprocessConfig(user_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="no check-ins left"):
        prepare_checkins(_loaded([("u1", "l1", T0)]), CheckinPreprocessConfig())


def _grid(num_users=10, days=20, hidden_users=(), partial_hidden=None):
    rows = []
    for u in range(num_users):
        for d in range(days):
            for t in (8, 12, 18):
                x, y = 10 + u, 20 + (t // 6)
                if d >= 15 and u in hidden_users:
                    x = y = 999
                rows.append((u, d, t, x, y))
    if partial_hidden is not None:
        rows.append((partial_hidden, 16, 20, 999, 999))
    g = pd.DataFrame(rows, columns=["uid", "d", "t", "x", "y"]).astype(
        {"uid": "int64", "d": "int16", "t": "int8", "x": "int16", "y": "int16"}
    )
    return LoadedGrid(g, RowAccount(), {"format": "yjmob", "grid_size": 200, "coordinate_base": 1})


def test_prepare_grid_splits_days_and_users():
    prepared = prepare_grid(_grid(hidden_users=(9,), partial_hidden=0), GridPreprocessConfig(predict_days=(15, 19)))
    sizes = {k: v.num_rows for k, v in prepared.samples.items()}
    assert sizes == {"train": 7, "validation": 1, "test": 1, "hidden": 1}
    hidden = prepared.samples["hidden"].to_pandas().iloc[0]
    assert hidden["uid"] == 9 and set(hidden["target_x"]) == {999} and len(hidden["target_d"]) == 15
    row = prepared.samples["train"].to_pandas().iloc[0]
    assert min(row["target_d"]) == 15 and max(row["input_d"]) == 14
    assert len(row["input_d"]) == 45 and len(row["target_d"]) == 15
    step = prepared.account.steps[-1]
    assert step.dropped == {"hidden_target_cell": 1}
    assert step.rows_in == 10 * 20 * 3 + 1
    # users are disjoint across splits
    uids = [set(v.column("uid").to_pylist()) for v in prepared.samples.values()]
    assert sum(len(u) for u in uids) == len(set().union(*uids)) == 10


def test_prepare_grid_default_predict_days_last_15():
    prepared = prepare_grid(_grid(days=75))
    assert prepared.metadata["predict_days"] == [60, 74]
    assert prepared.metadata["input_days"] == [0, 59]


def test_publish_roundtrip_with_load_dataset(tmp_path):
    cfg = CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1, inductive_fraction=0.1)
    prepared = prepare_checkins(_city(), cfg)
    out = write_prepared(prepared, tmp_path / "ds")
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == ["samples", "checkins", "locations"]
    card = (out / "README.md").read_text()
    assert "Row account" in card and "inductive_heldout_in_train" in card
    ds = load_dataset(str(out), "samples")
    assert set(ds) == {"train", "validation", "test"}
    for split, table in prepared.samples.items():
        assert ds[split].to_pandas().equals(table.to_pandas())
    locs = load_dataset(str(out), "locations")["train"].to_pandas()
    assert locs.equals(prepared.locations.to_pandas())
    back = load_prepared(out)
    assert back.kind == "checkins"
    assert back.account.to_dict() == prepared.account.to_dict()
    assert back.table("samples", "test").equals(prepared.samples["test"])
    with pytest.raises(ValueError, match="no split 'dev'"):
        back.table("samples", "dev")


def test_publish_grid_roundtrip(tmp_path):
    prepared = prepare_grid(_grid(hidden_users=(9,)), GridPreprocessConfig(predict_days=(15, 19)))
    out = write_prepared(prepared, tmp_path / "g")
    ds = load_dataset(str(out), "samples")
    assert set(ds) == {"train", "validation", "test", "hidden"}
    assert ds["train"].to_pandas().equals(prepared.samples["train"].to_pandas())
    # without hidden users the hidden split is empty: our loader still lists it, `load_dataset` leaves it out
    plain = write_prepared(prepare_grid(_grid(), GridPreprocessConfig(predict_days=(15, 19))), tmp_path / "plain")
    assert set(load_dataset(str(plain), "samples")) == {"train", "validation", "test"}
    assert "hidden" in load_prepared(plain).splits("samples")
    assert load_prepared(plain).table("samples", "hidden").num_rows == 0


def test_load_dataset_folder_never_serves_another_folders_rows(tmp_path):
    import pyarrow as pa

    def write(folder, value):
        return write_dataset(folder, {"rows": {"train": pa.table({"v": [value]}), "test": pa.table({"v": [0]})}},
                             pretty_name="t")

    # two folders with the same name and equal split sizes (as every run's instructions/ copy): datasets 5.2's
    # load_dataset gives both the rows of whichever was loaded first
    a, b = write(tmp_path / "a" / "instructions", 1), write(tmp_path / "b" / "instructions", 2)
    load_dataset(str(a), "rows", split="train")
    assert list(load_dataset_folder(a, "rows", split="train")["v"]) == [1]
    assert list(load_dataset_folder(b, "rows", split="train")["v"]) == [2]
    write(a, 3)  # rebuilt in place with other rows of the same size
    assert list(load_dataset_folder(a, "rows", split="train")["v"]) == [3]
    ds = load_dataset_folder(b, "rows")
    assert set(ds) == {"train", "test"} and list(ds["train"]["v"]) == [2]
    with pytest.raises(ValueError, match="nope"):
        load_dataset_folder(a, "nope")
    with pytest.raises(ValueError, match="Unknown split"):
        load_dataset_folder(a, "rows", split="validation")


def test_write_dataset_is_atomic_and_refuses_foreign_folders(tmp_path):
    import pyarrow as pa

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an hf-mobility dataset"):
        write_dataset(foreign, {"a": {"train": pa.table({"x": [1]})}})
    assert (foreign / "notes.txt").read_text() == "mine"
    out = write_dataset(tmp_path / "ds", {"a": {"train": pa.table({"x": [1, 2]})}})
    assert load_dataset(str(out), "a")["train"]["x"] == [1, 2]
    write_dataset(out, {"a": {"train": pa.table({"x": [3]})}})  # replaces our own folder
    # a re-written folder must not load the rows `datasets` cached for the old one
    assert load_dataset(str(out), "a")["train"]["x"] == [3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    # sharding
    out2 = write_dataset(tmp_path / "sh", {"a": {"train": pa.table({"x": list(range(25))})}}, max_rows_per_shard=10)
    assert len(list((out2 / "data" / "a").glob("train-*.parquet"))) == 3
    assert load_dataset(str(out2), "a")["train"]["x"] == list(range(25))


# ------------------------------------------------------------------------------------------------------------------
# The optional users table (the synthetic city's archetypes), carried from users.csv into the prepared dataset
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_raw(tmp_path_factory):
    from dataset_builders.synthetic import synthesize_checkins

    city = synthesize_checkins(num_users=40, num_locations=150, num_days=40, seed=5)
    return city, city.write_tsmc(tmp_path_factory.mktemp("raw"))


def test_users_table_survives_prepare(synthetic_raw, tmp_path):
    from dataset_builders.readers import read_dataset

    city, paths = synthetic_raw
    loaded = read_dataset("foursquare", paths["checkins"], locations_path=paths["pois"])  # users.csv found beside it
    assert loaded.users is not None and len(loaded.users) == 40
    assert str(paths["users"]) in loaded.metadata["source_files"]
    assert loaded.account.step("read users users.csv").dropped == {}
    assert loaded.users["first_day"].dtype == "Int64" and isinstance(loaded.users["archetype"].dtype, pd.StringDtype)
    prepared = prepare_checkins(loaded, CheckinPreprocessConfig(min_user_visits=32, min_location_visits=5))
    kept = set(pd.concat([t.to_pandas() for t in prepared.checkins.values()])["user_id"])
    assert 30 <= len(kept) < 40  # the filters remove a few users
    users = prepared.users.to_pandas()
    # one row per user of the prepared check-ins, with the synthetic city's columns and values
    assert users["user_id"].tolist() == sorted(kept)
    assert list(users.columns) == list(city.users.columns)
    truth = city.users.set_index("user_id")
    assert (users["archetype"].to_numpy() == truth.loc[users["user_id"], "archetype"].to_numpy()).all()
    assert (users["last_day"].to_numpy() == truth.loc[users["user_id"], "last_day"].to_numpy()).all()
    assert users["anchor_location_id"].isna().sum() == (users["archetype"] == "visitor").sum() > 0
    # users removed by the filters are counted, not silently lost
    step = prepared.account.step("users table: users of the prepared check-ins")
    assert step.rows_in == 40 and step.rows_kept == len(kept)
    assert step.dropped == {"user_filtered_out": 40 - len(kept)}
    assert step.notes == {"prepared_users_without_row": 0}
    # published as the `users` config, read with the same table API as the other tables
    out = write_prepared(prepared, tmp_path / "ds")
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == ["samples", "checkins", "locations", "users"]
    assert "`users`" in (out / "README.md").read_text() and "no model or baseline reads it" in (out / "README.md").read_text()
    back = load_prepared(out)
    assert back.table("users").equals(prepared.users)
    assert load_dataset(str(out), "users")["train"].to_pandas().equals(users)
    # every sample's user has a row: a report can group any split by archetype
    test_users = set(back.table("samples", "test").column("user_id").to_pylist())
    assert test_users <= set(users["user_id"])


def test_users_table_unknown_duplicate_and_missing_ids(synthetic_raw, tmp_path):
    from dataset_builders.readers import read_dataset
    from dataset_builders.schema import DataValidationError

    city, paths = synthetic_raw
    ids = city.users["user_id"].tolist()
    lines = ["user_id,archetype,shift_hours", f"{ids[0]},office_worker,8", f"  {ids[1]} ,student,7.5", "ghost,visitor,0",
             "", f"{ids[0]},student,8", ",visitor,1", f"{ids[2]},night_shift_worker,"]
    table = tmp_path / "people.csv"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = read_dataset("foursquare", paths["checkins"], users_path=table)
    step = loaded.account.step("read users people.csv")
    assert step.rows_in == 7 and step.rows_kept == 3
    assert step.dropped == {"blank_line": 1, "missing_user_id": 1, "duplicate_user_id": 1, "unknown_user": 1}
    assert step.notes == {"checkin_users_without_row": len(set(city.checkins["user_id"])) - 3}
    users = loaded.users
    assert users["user_id"].tolist() == ids[:3]  # stripped, first row wins
    assert users["archetype"].tolist() == ["office_worker", "student", "night_shift_worker"]
    assert users["shift_hours"].dtype == "float64" and users["shift_hours"].isna().tolist() == [False, False, True]
    # strict mode names the line of a repeated or missing id; unknown users are still only counted
    with pytest.raises(DataValidationError, match="line 7"):
        read_dataset("foursquare", paths["checkins"], users_path=table, on_error="raise")
    repeated = tmp_path / "repeated.csv"
    repeated.write_text(f"user_id\n{ids[0]}\n{ids[1]}\n{ids[0]}\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=f"line 4: user id '{ids[0]}' appears twice"):
        read_dataset("foursquare", paths["checkins"], users_path=repeated, on_error="raise")
    ok = tmp_path / "ok.csv"
    ok.write_text(f"user_id,archetype\n{ids[0]},office_worker\nghost,visitor\n", encoding="utf-8")
    strict = read_dataset("foursquare", paths["checkins"], users_path=ok, on_error="raise")
    assert strict.users["user_id"].tolist() == [ids[0]]
    assert strict.account.step("read users ok.csv").dropped == {"unknown_user": 1}
    # a hand-made table without user ids is an error when named explicitly
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,archetype\nu1,visitor\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="user_id"):
        read_dataset("foursquare", paths["checkins"], users_path=bad)


def test_users_table_is_optional(synthetic_raw, tmp_path):
    from dataset_builders.readers import read_dataset

    _, paths = synthetic_raw
    # switched off: no table, no users config
    loaded = read_dataset("foursquare", paths["checkins"], users_path=None)
    assert loaded.users is None
    assert not [s for s in loaded.account.steps if s.name.startswith("read users")]
    prepared = prepare_checkins(loaded, CheckinPreprocessConfig(min_user_visits=10, min_location_visits=5))
    assert prepared.users is None
    out = write_prepared(prepared, tmp_path / "ds")
    assert not (out / "data" / "users").exists()
    with pytest.raises(ValueError, match="config 'users' has no split"):
        load_prepared(out).table("users")
    # auto: a users.csv beside the check-ins that is not a user table (no user_id) is left alone, with a warning
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "checkins.txt").write_bytes(paths["checkins"].read_bytes())
    (folder / "users.csv").write_text("name,age\nann,31\n", encoding="utf-8")
    assert read_dataset("foursquare", folder / "checkins.txt").users is None
    (folder / "users.csv").unlink()
    assert read_dataset("foursquare", folder / "checkins.txt").users is None
    # grids have no user table
    with pytest.raises(ValueError, match="yjmob"):
        read_dataset("yjmob", paths["checkins"], users_path=paths["users"])


def test_prepare_checks_a_hand_made_users_table():
    loaded = _city()
    loaded.users = pd.DataFrame({"user_id": pd.array(["u1", "u1"], dtype="string"), "archetype": ["a", "b"]})
    with pytest.raises(ValueError, match="repeats user ids"):
        prepare_checkins(loaded, CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1))
    loaded.users = pd.DataFrame({"uid": ["u1"]})
    with pytest.raises(ValueError, match="no user_id column"):
        prepare_checkins(loaded, CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1))
    loaded.users = pd.DataFrame({"user_id": pd.array(["u1", "u2"], dtype="string"), "archetype": ["a", "b"]})
    prepared = prepare_checkins(loaded, CheckinPreprocessConfig(min_user_visits=1, min_location_visits=1))
    assert prepared.users.to_pandas()["user_id"].tolist() == ["u1", "u2"]
    assert prepared.account.steps[-1].notes == {"prepared_users_without_row": 28}
