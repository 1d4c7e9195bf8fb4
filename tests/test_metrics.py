"""Tests of train.metrics: ranking metrics, GEO-BLEU and DTW (hand-worked values and agreement with references)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train import metrics
from train.metrics import (
    accuracy_at_k,
    dtw,
    dtw_day,
    geobleu,
    geobleu_day,
    mrr,
    ndcg_at_k,
    ranking_metrics,
    ranks_from_scores,
    ranks_from_topk,
)

COLUMNS = ["uid", "d", "t", "x", "y"]


def e(distance: float) -> float:
    """Point proximity with beta = 0.5."""
    return math.exp(-0.5 * distance)


# ----------------------------------------------------------------------------------------------------------------------
# Independent pure-Python references (the greedy re-filters its list after every match, as the HuMob scorer does)
# ----------------------------------------------------------------------------------------------------------------------


def naive_geobleu_day(gen, ref, max_n=5, beta=0.5):
    gen = [tuple(map(float, p)) for p in gen]
    ref = [tuple(map(float, p)) for p in ref]
    if not gen or not ref:
        return 0.0

    def point(a, b):
        # numpy's exp, as the library and the HuMob scorer use (math.exp can differ in the last bit).
        return float(np.exp(-beta * math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2)))

    num_n = min(max_n, len(gen), len(ref))
    p_values = []
    for n in range(1, num_n + 1):
        edges = []
        for i in range(len(gen) - n + 1):
            for j in range(len(ref) - n + 1):
                value = 1.0
                for k in range(n):
                    value *= point(gen[i + k], ref[j + k])
                edges.append(((i, j), value))
        edges.sort(key=lambda edge: edge[1], reverse=True)  # stable: ties stay in (i, j) order
        total = 0.0
        while edges:
            (bi, bj), value = edges[0]
            total += value
            edges = [edge for edge in edges if edge[0][0] != bi and edge[0][1] != bj]
        p_values.append(total / (len(gen) - n + 1))
    if min(p_values) == 0.0:
        return 0.0
    brevity = 1.0 if len(gen) > len(ref) else math.exp(1.0 - len(ref) / len(gen))
    return brevity * math.exp(sum(math.log(p) for p in p_values) / len(p_values))


def naive_dtw_day(gen, ref, scale=2.0, old_first_row=False):
    n, m = len(gen), len(ref)
    table = [[math.inf] * (m + 1) for _ in range(n + 1)]
    table[0][0] = 0.0
    if old_first_row:
        table[0] = [0.0] * (m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = math.dist(gen[i - 1], ref[j - 1]) / scale
            table[i][j] = cost + min(table[i - 1][j], table[i][j - 1], table[i - 1][j - 1])
    return table[n][m]


def per_user_reference(generated: pd.DataFrame, reference: pd.DataFrame, day_fn) -> pd.Series:
    """Mean over days per user, day by day with a single-day function."""
    gen = generated.sort_values(["uid", "d", "t"])
    ref = reference.sort_values(["uid", "d", "t"])
    values = {}
    for uid, gen_user in gen.groupby("uid"):
        ref_user = ref[ref["uid"] == uid]
        days = [
            day_fn(gen_day[["x", "y"]].to_numpy(), ref_user[ref_user["d"] == d][["x", "y"]].to_numpy())
            for d, gen_day in gen_user.groupby("d")
        ]
        values[uid] = float(np.mean(days))
    return pd.Series(values)


def random_trajectories(seed: int, users: int, grid: int, max_days: int = 4, stay: float = 0.5):
    """Generated and reference DataFrames sharing (uid, d, t), with variable day lengths and many ties."""
    rng = np.random.default_rng(seed)
    keys = []
    for uid in range(users):
        for d in rng.choice(30, size=int(rng.integers(1, max_days + 1)), replace=False):
            length = int(rng.integers(1, 31))
            for t in np.sort(rng.choice(48, size=length, replace=False)):
                keys.append((10 * uid + 7, int(d), int(t)))
    keys = np.array(keys, dtype=np.int64)

    def cells():
        xy = rng.integers(0, grid, size=(len(keys), 2))
        stays = rng.random(len(keys)) < stay
        for row in np.flatnonzero(stays)[1:]:
            xy[row] = xy[row - 1]  # frequent repeated cells, as in real trajectories
        return xy

    generated = pd.DataFrame(np.column_stack([keys, cells()]), columns=COLUMNS)
    reference = pd.DataFrame(np.column_stack([keys, cells()]), columns=COLUMNS)
    return generated, reference


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------------------------------


RANKS = np.array([1, 3, np.inf, 6, 2])


def test_accuracy_mrr_ndcg_hand_computed():
    # Acc@1: only rank 1 -> 1/5. Acc@5: ranks 1, 3, 2 -> 3/5. Acc@10 and Acc@20: also rank 6 -> 4/5 (inf never hits).
    assert accuracy_at_k(RANKS, 1) == pytest.approx(0.2)
    assert accuracy_at_k(RANKS, 5) == pytest.approx(0.6)
    assert accuracy_at_k(RANKS, 10) == pytest.approx(0.8)
    # MRR: (1 + 1/3 + 0 + 1/6 + 1/2) / 5 = 2 / 5.
    assert mrr(RANKS) == pytest.approx(0.4)
    # NDCG@5: (1/log2(2) + 1/log2(4) + 1/log2(3)) / 5 = (1 + 0.5 + 0.6309298) / 5 = 0.4261860.
    assert ndcg_at_k(RANKS, 5) == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 5)
    assert ndcg_at_k(RANKS, 5) == pytest.approx(0.42618595, abs=1e-8)
    # NDCG@10 adds rank 6: + 1/log2(7) = 0.3562072 -> 0.4974274.
    assert ndcg_at_k(RANKS, 10) == pytest.approx(0.49742739, abs=1e-8)


def test_ranking_metrics_dict():
    out = ranking_metrics(RANKS)
    assert set(out) == {"acc@1", "acc@5", "acc@10", "acc@20", "mrr", "ndcg@5", "ndcg@10", "num_samples"}
    assert out["acc@20"] == pytest.approx(0.8)
    assert out["mrr"] == pytest.approx(0.4)
    assert out["ndcg@10"] == pytest.approx(0.49742739, abs=1e-8)
    assert out["num_samples"] == 5
    # All misses: every metric is 0 (fractions, not percentages).
    misses = ranking_metrics([np.inf, np.inf])
    assert all(misses[k] == 0.0 for k in misses if k != "num_samples")


@pytest.mark.parametrize(
    "bad", [[], [[1, 2]], [0, 1], [np.nan], [-np.inf], ["a"]], ids=["empty", "2d", "zero", "nan", "-inf", "str"]
)
def test_ranking_metrics_reject_bad_ranks(bad):
    with pytest.raises(ValueError):
        ranking_metrics(bad)


def test_ranking_metrics_reject_bad_k():
    with pytest.raises(ValueError, match="positive integer"):
        accuracy_at_k([1, 2], 0)
    with pytest.raises(ValueError, match="positive integer"):
        ndcg_at_k([1, 2], 2.5)
    with pytest.raises(ValueError, match="positive integer"):
        ranking_metrics([1, 2], ks=(1, True))


def test_ranks_from_topk_strings_ints_and_padding():
    # Row 0: "b" at position 2. Row 1: "a" first occurs at position 2 (duplicates ignored). Row 2: "x" absent.
    topk = [["a", "b", "c"], ["b", "a", "a"], ["c", "d", None]]
    np.testing.assert_array_equal(ranks_from_topk(topk, ["b", "a", "x"]), [2.0, 2.0, np.inf])
    # Integer ids padded with -1: 1 at position 2, 5 at position 3, 4 absent.
    ints = np.array([[3, 1, -1], [2, 2, 5], [7, -1, -1]])
    np.testing.assert_array_equal(ranks_from_topk(ints, np.array([1, 5, 4])), [2.0, 3.0, np.inf])
    with pytest.raises(ValueError, match="rows"):
        ranks_from_topk(ints, [1, 2])
    with pytest.raises(ValueError, match="2-D"):
        ranks_from_topk([1, 2, 3], [1, 2, 3])


def test_ranks_from_scores_ties_by_column():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.9], [0.3, 0.3, 0.3, 0.9]])
    # Row 0, target col 2 (0.5): nothing higher, one tie at a lower column (col 1) -> rank 2.
    # Row 1, target col 1 (0.3): 0.9 is higher (1), tie at col 0 before it (1) -> rank 3.
    # Row 2, target col 0 (0.3): 0.9 is higher, no tie before -> rank 2.
    np.testing.assert_array_equal(ranks_from_scores(scores, [2, 1, 0]), [2.0, 3.0, 2.0])
    # The tie-break agrees with a stable descending sort.
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = [1 + int(np.flatnonzero(order[i] == c)[0]) for i, c in enumerate([2, 1, 0])]
    np.testing.assert_array_equal(ranks_from_scores(scores, [2, 1, 0]), expected)
    with pytest.raises(ValueError, match="out of range"):
        ranks_from_scores(scores, [0, 1, 4])
    with pytest.raises(ValueError, match="integers"):
        ranks_from_scores(scores, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores([[np.nan, 1.0]], [0])


def test_ranks_from_scores_matches_stable_sort_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 30)).astype(float)
    targets = rng.integers(0, 30, size=200)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = 1 + np.argmax(order == targets[:, None], axis=1)
    np.testing.assert_array_equal(ranks_from_scores(scores, targets), expected)
    np.testing.assert_array_equal(ranks_from_topk(order, targets), expected)


# ----------------------------------------------------------------------------------------------------------------------
# GEO-BLEU, hand-worked
# ----------------------------------------------------------------------------------------------------------------------


def test_geobleu_day_hand_worked_with_brevity_penalty():
    gen = [(0, 0), (1, 0), (2, 0)]
    ref = [(0, 0), (1, 0), (1, 1), (3, 0)]
    # Cell distances d[i][j] (gen i, ref j):
    #   g0=(0,0): 0, 1, sqrt2, 3      g1=(1,0): 1, 0, 1, 2      g2=(2,0): 2, 1, sqrt2, 1
    # n=1: the two exact hits (0,0) and (1,1) are matched first (e(0) = 1 each). Among the e(1) pairs, in (i, j) order,
    #   (0,1), (1,0), (1,2), (2,1) reuse a matched row or column; (2,3) is free -> p1 = (2 + e(1)) / 3 = 0.8688436.
    p1 = (2 + e(1)) / 3
    # n=2: bigram proximities G_a R_b = e(d[a][b]) * e(d[a+1][b+1]):
    #   G0R0 = 1, G0R1 = e(1)e(1), G0R2 = e(sqrt2)e(2), G1R0 = e(1)e(1), G1R1 = e(0)e(sqrt2), G1R2 = e(1)e(1).
    #   Greedy: G0R0 = 1, then G1's best free is R1 = e(sqrt2) = 0.4930687 > e(2) -> p2 = (1 + e(sqrt2)) / 2.
    p2 = (1 + e(math.sqrt(2))) / 2
    # n=3: T0S0 = e(0)e(0)e(sqrt2) = 0.4930687 beats T0S1 = e(1)e(1)e(1) = 0.2231302 -> p3 = e(sqrt2).
    p3 = e(math.sqrt(2))
    # Brevity penalty: gen (3) not longer than ref (4) -> exp(1 - 4/3) = 0.7165313.
    expected = math.exp(1 - 4 / 3) * (p1 * p2 * p3) ** (1 / 3)
    assert expected == pytest.approx(0.49000605, abs=1e-8)
    assert geobleu_day(gen, ref, max_n=3) == pytest.approx(expected, rel=1e-12)
    # max_n=5 is capped at the shorter length (3): same value.
    assert geobleu_day(gen, ref, max_n=5) == pytest.approx(expected, rel=1e-12)
    assert naive_geobleu_day(gen, ref, max_n=5) == pytest.approx(expected, rel=1e-12)
    # The other way round the generated day is the longer one: no brevity penalty.
    assert geobleu_day(ref, gen, max_n=1) == pytest.approx((2 + e(1)) / 4 * 1.0, rel=1e-12)


def test_geobleu_day_short_day_caps_n():
    gen = [(0, 0), (0, 1)]
    ref = [(0, 0), (0, 2)]
    # n=1: (0,0) = 1 first; then the e(1) pairs (1,0) and (1,1) tie: (1,0) comes first but column 0 is taken, so
    #   (1,1) is matched -> p1 = (1 + e(1)) / 2 = 0.8032653.
    # n=2: one bigram each: e(0) * e(1) -> p2 = 0.6065307. N is capped at 2 (no 3-, 4-, 5-grams).
    expected = math.sqrt((1 + e(1)) / 2 * e(1))
    assert expected == pytest.approx(0.69800075, abs=1e-8)
    assert geobleu_day(gen, ref, max_n=5) == pytest.approx(expected, rel=1e-12)
    assert geobleu_day(gen, ref, max_n=2) == pytest.approx(expected, rel=1e-12)
    assert geobleu(frame([(1, 0, 0, 0, 0), (1, 0, 1, 0, 1)]), frame([(1, 0, 0, 0, 0), (1, 0, 1, 0, 2)])) == (
        pytest.approx(expected, rel=1e-12)
    )


def test_geobleu_tie_break_follows_generated_then_reference_index():
    # Proximities: (0,0) = (0,1) = (1,0) = e(1), (1,1) = e(3). In (gen, ref) order, (0,0) is taken first, which blocks
    # (0,1) and (1,0), so (1,1) is matched: p1 = (e(1) + e(3)) / 2. (Taking (0,1) first would give 2 e(1) / 2.)
    gen = [(0, 0), (2, 0)]
    ref = [(1, 0), (-1, 0)]
    expected = (e(1) + e(3)) / 2
    assert geobleu_day(gen, ref, max_n=1) == pytest.approx(expected, rel=1e-12)
    gen_df = frame([(5, 2, 0, 0, 0), (5, 2, 1, 2, 0)])
    ref_df = frame([(5, 2, 0, 1, 0), (5, 2, 1, -1, 0)])
    assert geobleu(gen_df, ref_df, max_n=1) == pytest.approx(expected, rel=1e-12)


def test_geobleu_day_edge_cases():
    assert geobleu_day([], [(0, 0)]) == 0.0
    assert geobleu_day(np.empty((0, 2)), np.empty((0, 2))) == 0.0
    assert geobleu_day([(0, 0)], [(0, 0)]) == 1.0
    with pytest.raises(ValueError, match="max_n"):
        geobleu_day([(0, 0)], [(0, 0)], max_n=0)
    with pytest.raises(ValueError, match="beta"):
        geobleu_day([(0, 0)], [(0, 0)], beta=-1.0)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        geobleu_day([(0, 0, 0)], [(0, 0)])


def test_identical_trajectories_give_geobleu_one_and_dtw_zero():
    rng = np.random.default_rng(3)
    keys = [(u, d, t) for u in range(3) for d in range(2) for t in range(int(rng.integers(1, 12)))]
    traj = frame([(*k, *rng.integers(0, 5, size=2)) for k in keys])
    assert geobleu(traj, traj) == pytest.approx(1.0, abs=1e-15)
    assert dtw(traj, traj) == 0.0
    assert dtw(traj, traj, old_first_row=True) == 0.0
    assert geobleu_day([(1, 1), (1, 1), (2, 3)], [(1, 1), (1, 1), (2, 3)]) == pytest.approx(1.0, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# DTW, hand-worked
# ----------------------------------------------------------------------------------------------------------------------


def test_dtw_day_hand_worked():
    gen = [(0, 0), (1, 0), (2, 0)]
    ref = [(0, 0), (2, 0), (2, 0)]
    # Local costs (distance / 2), rows = gen, columns = ref:  g0: 0, 1, 1   g1: 0.5, 0.5, 0.5   g2: 1, 0, 0.
    # D[1,1] = 0, D[1,2] = 1, D[1,3] = 2; D[2,1] = 0.5, D[2,2] = 0.5 + min(1, 0.5, 0) = 0.5, D[2,3] = 0.5 + 0.5 = 1;
    # D[3,1] = 1 + 0.5 = 1.5, D[3,2] = 0 + min(0.5, 1.5, 0.5) = 0.5, D[3,3] = 0 + min(1, 0.5, 0.5) = 0.5.
    assert dtw_day(gen, ref) == pytest.approx(0.5, abs=1e-15)
    assert naive_dtw_day(gen, ref) == pytest.approx(0.5, abs=1e-15)
    # scale=1 doubles every cost.
    assert dtw_day(gen, ref, scale=1.0) == pytest.approx(1.0, abs=1e-15)


def test_dtw_old_first_row_skips_reference_prefix():
    # The generated day matches a suffix of the reference: ref = (0,0), (1,0), (2,0); gen = (1,0), (2,0).
    gen = [(1, 0), (2, 0)]
    ref = [(0, 0), (1, 0), (2, 0)]
    # Costs (distance / 2): g0: 0.5, 0, 0.5   g1: 1, 0.5, 0.
    # 2025 (only D[0,0] = 0): ref[0] must be aligned to something: D[1,1] = 0.5, D[1,2] = 0.5, D[1,3] = 1,
    #   D[2,1] = 1.5, D[2,2] = 0.5 + min(0.5, 1.5, 0.5) = 1, D[2,3] = 0 + min(1, 1, 0.5) = 0.5.
    assert dtw_day(gen, ref) == pytest.approx(0.5, abs=1e-15)
    # HuMob'24 (D[0, j] = 0): D[1,2] = 0 + D[0,1] = 0, D[1,3] = 0.5, D[2,2] = 0.5 + 0 = 0.5, D[2,3] = 0 + D[1,2] = 0.
    assert dtw_day(gen, ref, old_first_row=True) == pytest.approx(0.0, abs=1e-15)
    keys = [(4, 1, 0), (4, 1, 1), (4, 1, 2)]
    gen_df = frame([(*keys[0], 1, 0), (*keys[1], 1, 0), (*keys[2], 2, 0)])
    ref_df = frame([(*k, *p) for k, p in zip(keys, ref, strict=True)])
    assert dtw(gen_df, ref_df, old_first_row=True) < dtw(gen_df, ref_df)


def test_dtw_day_rejects_empty_and_bad_scale():
    with pytest.raises(ValueError, match="empty"):
        dtw_day([], [(0, 0)])
    with pytest.raises(ValueError, match="scale"):
        dtw_day([(0, 0)], [(0, 0)], scale=0)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def test_mismatched_steps_are_an_error_naming_the_step():
    gen = frame([(1, 0, 0, 5, 5), (1, 0, 1, 5, 5), (2, 3, 7, 1, 1)])
    ref = frame([(1, 0, 0, 5, 5), (1, 0, 2, 5, 5), (2, 3, 7, 1, 1)])
    # First mismatching key in (uid, d, t) order: (1, 0, 1), present in generated only.
    with pytest.raises(ValueError, match=r"uid=1, d=0, t=1\) is in the generated trajectory but missing from the ref"):
        geobleu(gen, ref)
    with pytest.raises(ValueError, match=r"uid=1, d=0, t=1\) is in the reference trajectory but missing from the gen"):
        dtw(ref, gen)
    # A whole day missing from the generated side.
    with pytest.raises(ValueError, match=r"uid=2, d=3, t=7\) is in the reference trajectory but missing from the gen"):
        geobleu(gen.iloc[:2], pd.concat([gen.iloc[:2], ref.iloc[[2]]]))


def test_duplicate_steps_are_an_error():
    gen = frame([(1, 0, 0, 5, 5), (1, 0, 0, 6, 6)])
    ref = frame([(1, 0, 0, 5, 5)])
    with pytest.raises(ValueError, match=r"generated trajectory has duplicate steps: \(uid=1, d=0, t=0\)"):
        geobleu(gen, ref)
    with pytest.raises(ValueError, match="reference trajectory has duplicate"):
        dtw(ref, gen)


def test_bad_trajectory_inputs():
    good = frame([(1, 0, 0, 5, 5)])
    with pytest.raises(ValueError, match="lacks column"):
        geobleu(good.drop(columns="t"), good)
    with pytest.raises(ValueError, match=r"\[M, 5\]"):
        dtw(np.zeros((3, 4)), good)
    with pytest.raises(ValueError, match="no steps"):
        geobleu(good.iloc[:0], good.iloc[:0])
    with pytest.raises(ValueError, match="finite"):
        dtw(good.assign(x=np.nan), good)
    with pytest.raises(ValueError, match="integers"):
        geobleu(good.assign(t=0.5), good.assign(t=0.5))


def test_array_and_dataframe_inputs_agree_and_row_order_is_irrelevant():
    generated, reference = random_trajectories(seed=5, users=4, grid=6)
    shuffled = generated.sample(frac=1.0, random_state=0)
    expected = geobleu(generated, reference)
    assert geobleu(shuffled.to_numpy(), reference.to_numpy()) == pytest.approx(expected, abs=1e-15)
    assert dtw(shuffled, reference.to_numpy()) == pytest.approx(dtw(generated, reference), abs=1e-12)
    # Narrow integer dtypes (as in the grid schema) work too.
    narrow = generated.astype({"d": "int16", "t": "int8", "x": "int16", "y": "int16"})
    assert geobleu(narrow, reference) == pytest.approx(expected, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# Vectorised == references
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [2, 4, 40])
@pytest.mark.parametrize("max_n", [1, 3, 5])
def test_vectorised_geobleu_matches_single_day_reference(grid, max_n):
    generated, reference = random_trajectories(seed=10 * grid + max_n, users=12, grid=grid)
    value, per_user = geobleu(generated, reference, max_n=max_n, return_per_user=True)
    expected = per_user_reference(generated, reference, lambda g, r: geobleu_day(g, r, max_n=max_n))
    np.testing.assert_allclose(per_user.set_index("uid")["geobleu"].loc[expected.index], expected, rtol=0, atol=1e-12)
    assert value == pytest.approx(expected.mean(), abs=1e-12)


def test_vectorised_geobleu_matches_naive_greedy():
    generated, reference = random_trajectories(seed=99, users=5, grid=3, max_days=3)
    _, per_user = geobleu(generated, reference, max_n=5, return_per_user=True)
    expected = per_user_reference(generated, reference, lambda g, r: naive_geobleu_day(g, r, max_n=5))
    np.testing.assert_allclose(per_user.set_index("uid")["geobleu"].loc[expected.index], expected, rtol=0, atol=1e-12)


def test_vectorised_geobleu_small_batches(monkeypatch):
    # Tiny batches mix day lengths inside a padded batch and exercise the batching.
    monkeypatch.setattr(metrics, "_MAX_BATCH_CELLS", 700)
    generated, reference = random_trajectories(seed=7, users=8, grid=3)
    _, per_user = geobleu(generated, reference, max_n=4, return_per_user=True)
    expected = per_user_reference(generated, reference, lambda g, r: geobleu_day(g, r, max_n=4))
    np.testing.assert_allclose(per_user.set_index("uid")["geobleu"].loc[expected.index], expected, rtol=0, atol=1e-12)
    dtw_value = dtw(generated, reference)
    expected_dtw = per_user_reference(generated, reference, dtw_day)
    assert dtw_value == pytest.approx(expected_dtw.mean(), abs=1e-9)


@pytest.mark.parametrize("old_first_row", [False, True])
def test_vectorised_dtw_matches_references(old_first_row):
    generated, reference = random_trajectories(seed=21, users=10, grid=30)
    _, per_user = dtw(generated, reference, old_first_row=old_first_row, return_per_user=True)
    got = per_user.set_index("uid")["dtw"]
    expected = per_user_reference(generated, reference, lambda g, r: dtw_day(g, r, old_first_row=old_first_row))
    np.testing.assert_allclose(got.loc[expected.index], expected, rtol=1e-12, atol=1e-9)
    naive = per_user_reference(generated, reference, lambda g, r: naive_dtw_day(g, r, old_first_row=old_first_row))
    np.testing.assert_allclose(got.loc[naive.index], naive, rtol=1e-12, atol=1e-9)


points = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(gen=points, ref=points, max_n=st.integers(1, 5))
def test_geobleu_day_agrees_with_naive_and_batch(gen, ref, max_n):
    expected = naive_geobleu_day(gen, ref, max_n=max_n)
    assert geobleu_day(gen, ref, max_n=max_n) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The vectorised kernel on this single day (lengths may differ here).
    batch = metrics._geobleu_batch(
        np.array(gen, dtype=float)[None],
        np.array(ref, dtype=float)[None],
        np.array([len(gen)]),
        np.array([len(ref)]),
        max_n,
        0.5,
    )
    assert batch[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    dtw_batch = metrics._dtw_batch(
        np.array(gen, dtype=float)[None],
        np.array(ref, dtype=float)[None],
        np.array([len(gen)]),
        np.array([len(ref)]),
        2.0,
        False,
    )
    assert dtw_batch[0] == pytest.approx(naive_dtw_day(gen, ref), rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Averaging
# ----------------------------------------------------------------------------------------------------------------------


def test_mean_of_per_user_means():
    # User 1: one identical day -> DTW 0, GEO-BLEU 1.
    # User 2: three one-point days, two 2 cells off (DTW 2/2 = 1, GEO-BLEU e(2)) and one identical (0, 1).
    gen = frame([(1, 0, 0, 3, 3), (2, 0, 0, 0, 0), (2, 1, 5, 0, 0), (2, 2, 9, 4, 4)])
    ref = frame([(1, 0, 0, 3, 3), (2, 0, 0, 2, 0), (2, 1, 5, 0, 2), (2, 2, 9, 4, 4)])
    # DTW: per user 0 and (1 + 1 + 0) / 3 = 2/3 -> mean of means 1/3 (the mean over all four days would be 1/2).
    value, per_user = dtw(gen, ref, return_per_user=True)
    assert value == pytest.approx(1 / 3, abs=1e-15)
    assert per_user["uid"].tolist() == [1, 2]
    assert per_user["num_days"].tolist() == [1, 3]
    np.testing.assert_allclose(per_user["dtw"], [0.0, 2 / 3], atol=1e-15)
    # GEO-BLEU: per user 1 and (2 e(2) + 1) / 3 -> mean of means (1 + (2 e(2) + 1) / 3) / 2.
    value, per_user = geobleu(gen, ref, return_per_user=True)
    assert value == pytest.approx((1 + (2 * e(2) + 1) / 3) / 2, rel=1e-12)
    np.testing.assert_allclose(per_user["geobleu"], [1.0, (2 * e(2) + 1) / 3], rtol=1e-12)
