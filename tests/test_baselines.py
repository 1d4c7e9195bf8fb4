"""Baselines against hand-worked rankings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from train.baselines import CHECKIN_BASELINES, fit_checkin_baseline, nearest_location_ranks, slot_mode_predictions

# Training check-ins (time order per user):
#   u1: A, B, A, C   -> visits A2 B1 C1; transitions A->B, B->A, A->C
#   u2: B, B, D      -> visits B2 D1;    transitions B->B, B->D
# popularity: A2 B3 C1 D1; global transitions: A->B, A->C, B->A, B->B, B->D (1 each)
TRAIN = pd.DataFrame(
    {
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u2"],
        "location_id": ["A", "B", "A", "C", "B", "B", "D"],
        "timestamp": [1, 2, 3, 4, 1, 2, 3],
    }
)
LOCATIONS = ["A", "B", "C", "D"]
SAMPLES = pa.table(
    {
        "user_id": ["u1", "u2", "u9"],
        "history_location_ids": [["A"], ["B", "D"], ["B"]],
        "target_location_id": ["C", "B", "D"],
    }
)
# Hand-worked ranks of the targets (C for u1, B for u2, D for the unknown user u9):
#   popularity      : B A C D                       -> C=3, B=1, D=4 (C/D tie on popularity, id breaks it)
#   most-frequent   : u1: A B C D (B/C tie -> pop)  -> C=3; u2: B D A C -> B=1; u9: popularity -> D=4
#   history-freq.   : u1: A, then B C by user visits tie -> pop -> C=3; u2: B D tie -> user visits B2 -> B=1;
#                     u9: B, then popularity A C D -> D=4
#   markov          : u1 from A: B1 C1 tie, global A->B A->C tie, user visits tie, pop B > C -> B C ... -> C=2;
#                     u2 from D: no transitions -> user visits B2 -> B=1;
#                     u9 from B: global B->A, B->B, B->D -> tie -> pop B3 A2 D1 -> B A D C -> D=3
EXPECTED = {
    "popularity": [3, 1, 4],
    "most-frequent": [3, 1, 4],
    "history-frequency": [3, 1, 4],
    "markov": [2, 1, 3],
}


@pytest.mark.parametrize("name", CHECKIN_BASELINES)
def test_ranks_match_hand_worked_values(name):
    model = fit_checkin_baseline(name, TRAIN, LOCATIONS)
    np.testing.assert_array_equal(model.rank(SAMPLES), EXPECTED[name])


@pytest.mark.parametrize("name", CHECKIN_BASELINES)
def test_topk_agrees_with_rank(name):
    model = fit_checkin_baseline(name, TRAIN, LOCATIONS)
    top = model.topk(SAMPLES, k=4)
    ranks = model.rank(SAMPLES)
    for row, target, rank in zip(top, SAMPLES.column("target_location_id").to_pylist(), ranks):
        assert sorted(row) == LOCATIONS  # a full ranking: every candidate once
        assert list(row).index(target) + 1 == rank


def test_markov_full_ranking_order():
    model = fit_checkin_baseline("markov", TRAIN, LOCATIONS)
    assert list(model.topk(SAMPLES, k=4)[2]) == ["B", "A", "D", "C"]


def test_unknown_target_gets_infinite_rank_and_bad_name_raises():
    model = fit_checkin_baseline("popularity", TRAIN, LOCATIONS)
    samples = SAMPLES.set_column(2, "target_location_id", pa.array(["Z", "B", "D"]))
    ranks = model.rank(samples)
    assert np.isinf(ranks[0]) and ranks[1] == 1
    with pytest.raises(ValueError, match="unknown check-in baseline"):
        fit_checkin_baseline("oracle", TRAIN, LOCATIONS)


def test_batches_give_the_same_ranks(monkeypatch):
    rng = np.random.default_rng(0)
    locs = [f"L{i:03d}" for i in range(50)]
    train = pd.DataFrame({"user_id": rng.choice(["a", "b", "c"], 400), "location_id": rng.choice(locs, 400),
                          "timestamp": np.arange(400)})
    samples = pa.table({
        "user_id": rng.choice(["a", "b", "c", "d"], 300).tolist(),
        "history_location_ids": [list(rng.choice(locs, rng.integers(1, 6))) for _ in range(300)],
        "target_location_id": rng.choice(locs, 300).tolist(),
    })
    import train.baselines as tb

    full = {n: fit_checkin_baseline(n, train, locs).rank(samples) for n in CHECKIN_BASELINES}
    monkeypatch.setattr(tb, "_BATCH", 7)
    for n in CHECKIN_BASELINES:
        np.testing.assert_array_equal(fit_checkin_baseline(n, train, locs).rank(samples), full[n])


def _grid_samples():
    # user 0: input Mon d0/Tue d1 slot 10 at (5,5) twice; slot 20 at (7,7) and (8,8) once each; Sat d5 slot 10 (1,1)
    return pa.table({
        "uid": [0],
        "input_d": [[0, 0, 1, 1, 5]],
        "input_t": [[10, 20, 10, 20, 10]],
        "input_x": [[5, 7, 5, 8, 1]],
        "input_y": [[5, 7, 5, 8, 1]],
        "target_d": [[7, 7, 12, 12]],
        "target_t": [[10, 20, 10, 30]],
        "target_x": [[0, 0, 0, 0]],
        "target_y": [[0, 0, 0, 0]],
    })


def test_slot_mode_hand_worked():
    pred = slot_mode_predictions(_grid_samples(), day0_weekday=0)
    # d7 is a Monday: slot 10 -> (5,5); slot 20 tie (7,7)/(8,8) -> lower cell (7,7)
    # d12 is a Saturday: slot 10 -> weekend mode (1,1); slot 30 never seen -> the user's most visited cell (5,5)
    assert pred[["d", "t", "x", "y"]].values.tolist() == [[7, 10, 5, 5], [7, 20, 7, 7], [12, 10, 1, 1],
                                                          [12, 30, 5, 5]]
    # with day 0 a Saturday: d0, d1 and d7 are weekend days, d5 and d12 Thursdays. d7 slot 10 -> weekend mode (5,5),
    # d7 slot 20 -> weekend tie (7,7)/(8,8) -> (7,7); d12 slot 10 -> the weekday mode is now d5's (1,1); slot 30 ->
    # the user's most visited cell (5,5)
    pred2 = slot_mode_predictions(_grid_samples(), day0_weekday=5)
    assert pred2[["x", "y"]].values.tolist() == [[5, 5], [7, 7], [1, 1], [5, 5]]


def test_slot_mode_on_a_window_of_input_days():
    # days 1-5 only: Tue d1 slot 10 (5,5), slot 20 (8,8); Sat d5 slot 10 (1,1). d7 (Monday) slot 10 -> (5,5), slot 20
    # -> (8,8) (d0's (7,7) is outside the window); d12 (Saturday) slot 10 -> (1,1); slot 30 -> the user's most visited
    # cell in the window: a three-way tie (1,1)/(5,5)/(8,8) -> the lower cell (1,1)
    pred = slot_mode_predictions(_grid_samples(), day0_weekday=0, input_days=(1, 5))
    assert pred[["x", "y"]].values.tolist() == [[5, 5], [8, 8], [1, 1], [1, 1]]
    # the whole range is the plain baseline
    assert slot_mode_predictions(_grid_samples(), input_days=(0, 5)).equals(
        slot_mode_predictions(_grid_samples()))
    with pytest.raises(ValueError, match="no input rows in days 2-4"):
        slot_mode_predictions(_grid_samples(), input_days=(2, 4))
    with pytest.raises(ValueError, match="first <= last"):
        slot_mode_predictions(_grid_samples(), input_days=(5, 1))


def test_slot_mode_from_records_serves_any_records_and_keeps_target_order():
    import pandas as pd

    from train.baselines import explode_grid_samples, slot_mode_from_records

    records = explode_grid_samples(_grid_samples(), "input")
    targets = explode_grid_samples(_grid_samples(), "target")[["uid", "d", "t"]]
    assert slot_mode_from_records(records, targets).equals(slot_mode_predictions(_grid_samples()))
    # targets in another order come back in that order; records of other days (here: later ones) serve as well
    later = records.assign(d=records["d"] + 70)  # 70 days later: the same weekdays
    shuffled = targets.iloc[[3, 0, 2, 1]].reset_index(drop=True)
    got = slot_mode_from_records(later, shuffled)
    assert got[["d", "t", "x", "y"]].values.tolist() == [[12, 30, 5, 5], [7, 10, 5, 5], [12, 10, 1, 1],
                                                         [7, 20, 7, 7]]
    with pytest.raises(ValueError, match="no records"):
        slot_mode_from_records(pd.DataFrame(columns=["uid", "d", "t", "x", "y"]), targets)


def _brute_force_rank(name, train, locs, sample):
    """An independent reference: every candidate's key tuple from plain Python counts, sorted."""
    from collections import Counter

    train = train.sort_values(["user_id", "timestamp"], kind="stable")
    pop = Counter(train["location_id"])
    user_visits = Counter(zip(train["user_id"], train["location_id"]))
    user_trans, global_trans = Counter(), Counter()
    for _, g in train.groupby("user_id", sort=False):
        seq = list(g["location_id"])
        for a, b in zip(seq, seq[1:]):
            user_trans[(g["user_id"].iloc[0], a, b)] += 1
            global_trans[(a, b)] += 1
    user, hist, target = sample
    hist_counts = Counter(hist)
    last = hist[-1] if hist else None

    def key(c):
        uv = user_visits[(user, c)]
        if name == "popularity":
            k = ()
        elif name == "most-frequent":
            k = (uv,)
        elif name == "history-frequency":
            k = (hist_counts[c], uv)
        else:
            k = (user_trans[(user, last, c)], global_trans[(last, c)], uv)
        return tuple(-v for v in k) + (-pop[c], locs.index(c))

    ranking = sorted(locs, key=key)
    return ranking.index(target) + 1


def test_sparse_ranking_equals_brute_force():
    rng = np.random.default_rng(1)
    locs = [f"L{i:02d}" for i in range(30)]
    train = pd.DataFrame({"user_id": rng.choice(["a", "b", "c"], 150), "location_id": rng.choice(locs[:25], 150),
                          "timestamp": rng.permutation(150)})
    raw = [(str(rng.choice(["a", "b", "c", "z"])), list(rng.choice(locs, rng.integers(1, 5))), str(rng.choice(locs)))
           for _ in range(60)]
    samples = pa.table({"user_id": [r[0] for r in raw], "history_location_ids": [r[1] for r in raw],
                        "target_location_id": [r[2] for r in raw]})
    for name in CHECKIN_BASELINES:
        model = fit_checkin_baseline(name, train, locs)
        expected = [_brute_force_rank(name, train, locs, r) for r in raw]
        np.testing.assert_array_equal(model.rank(samples), expected, err_msg=name)
        top = model.topk(samples, k=30)
        assert [list(row).index(r[2]) + 1 for row, r in zip(top, raw)] == expected


def test_nearest_location_ranks_hand_worked():
    # four places on the equator at longitudes 0, 1, 3, 2 degrees; a fifth at the same point as place 1
    lat = np.zeros(5)
    lon = np.array([0.0, 1.0, 3.0, 2.0, 1.0])
    last = np.array([0, 0, 0, 2, 1])
    target = np.array([3, 1, 4, 1, 1])
    # from 0: 0 (d 0), 1 and 4 (d 1, table order), 3 (d 2), 2 (d 3); from 2: 2, 3, then 1 and 4; from 1: 1, 4
    np.testing.assert_array_equal(nearest_location_ranks(last, target, lat, lon), [4, 2, 3, 3, 1])
    # candidates restricted to {2, 3, 4}: targets outside are inf
    allowed = np.array([False, False, True, True, True])
    np.testing.assert_array_equal(nearest_location_ranks(last, target, lat, lon, allowed, batch_size=2),
                                  [2, np.inf, 1, np.inf, np.inf])
    with pytest.raises(ValueError, match="target_index"):
        nearest_location_ranks([0], [5], lat, lon)
    with pytest.raises(ValueError, match="candidates"):
        nearest_location_ranks([0], [1], lat, lon, np.ones(3, bool))
