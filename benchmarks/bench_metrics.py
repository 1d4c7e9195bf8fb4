"""Benchmark of the vectorised trajectory metrics (GEO-BLEU, DTW) of `train.metrics`.

Builds seeded trajectories on a 200 x 200 grid, times `geobleu` (N=5 and N=3) and `dtw` over all user-days, and
compares them on a subsample of user-days with

- the library's single-day reference (`geobleu_day`, `dtw_day`: plain Python loops, GEO-BLEU's greedy over one sorted
  pair list): speed-up and largest absolute difference of the per-day values;
- a naive scorer written the way the HuMob reference scorer works (numpy scalar math per point pair, the pair list
  re-filtered after every greedy match, DTW by a double loop over a numpy table), timed on fewer days since it is slow.

Two trajectory patterns: `walk` (default; random walks from home that stay put 70% of the time, with about a third of
the generated steps copied from the reference) and `routine` (home / work / home days with small excursions, generated
days shifted by up to two slots) — both make tied proximities frequent, as real data does.

Usage:

    python benchmarks/bench_metrics.py [--users 1000 --days 15 --slots 48 --pattern walk --subsample 200 --seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.metrics import dtw, dtw_day, geobleu, geobleu_day  # noqa: E402

GRID = 200
TARGET_SECONDS = 10.0
COLUMNS = ["uid", "d", "t", "x", "y"]


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _keys(users: int, days: int, slots: int) -> np.ndarray:
    uid, d, t = np.meshgrid(np.arange(users), np.arange(days), np.arange(slots), indexing="ij")
    return np.column_stack([uid.ravel(), d.ravel(), t.ravel()])


def random_walks(rng: np.random.Generator, homes: np.ndarray, days: int, slots: int, stay: float = 0.7) -> np.ndarray:
    """[users, days, slots, 2] cells: each day starts at home and moves by steps of up to 3 cells."""
    moves = rng.integers(-3, 4, size=(len(homes), days, slots, 2))
    moves[rng.random((len(homes), days, slots)) < stay] = 0
    moves[:, :, 0] = 0
    return np.clip(homes[:, None, None, :] + np.cumsum(moves, axis=2), 0, GRID - 1)


def routines(rng: np.random.Generator, homes: np.ndarray, works: np.ndarray, days: int, slots: int) -> np.ndarray:
    """[users, days, slots, 2] cells: home, then work from about a third of the day to about 70%, then home."""
    users = len(homes)
    slot = np.arange(slots)[None, None, :]
    shift = rng.integers(-2, 3, size=(users, days, 1))
    at_work = (slot >= slots // 3 + shift) & (slot < (7 * slots) // 10 + shift)
    xy = np.where(at_work[..., None], works[:, None, None, :], homes[:, None, None, :])
    excursion = rng.random((users, days, slots)) < 0.1
    xy = xy + excursion[..., None] * rng.integers(-5, 6, size=(users, days, slots, 2))
    return np.clip(xy, 0, GRID - 1)


def build(users: int, days: int, slots: int, seed: int, pattern: str = "walk") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded generated and reference trajectories sharing (uid, d, t)."""
    rng = np.random.default_rng(seed)
    homes = rng.integers(20, GRID - 20, size=(users, 2))
    if pattern == "walk":
        reference = random_walks(rng, homes, days, slots)
        generated = random_walks(rng, homes, days, slots)
        # A model gets part of the day right: copy about a third of the reference steps.
        copy = rng.random(generated.shape[:3]) < 0.3
        generated[copy] = reference[copy]
    elif pattern == "routine":
        works = np.clip(homes + rng.integers(-20, 21, size=(users, 2)), 0, GRID - 1)
        reference = routines(rng, homes, works, days, slots)
        generated = routines(rng, homes, works, days, slots)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected 'walk' or 'routine'")
    keys = _keys(users, days, slots)
    generated = pd.DataFrame(np.column_stack([keys, generated.reshape(-1, 2)]), columns=COLUMNS)
    reference = pd.DataFrame(np.column_stack([keys, reference.reshape(-1, 2)]), columns=COLUMNS)
    return generated, reference


# ----------------------------------------------------------------------------------------------------------------------
# A naive single-day scorer in the style of the HuMob reference implementation (for timing only)
# ----------------------------------------------------------------------------------------------------------------------


def _naive_distance(a, b, scale=1.0):
    return np.sqrt((b[0] - a[0]) ** 2.0 + (b[1] - a[1]) ** 2.0) / scale


def naive_geobleu_day(gen, ref, max_n=5, beta=0.5):
    num_n = min(max_n, len(gen), len(ref))
    p_values = []
    for n in range(1, num_n + 1):
        gen_grams = [gen[i : i + n] for i in range(len(gen) - n + 1)]
        ref_grams = [ref[j : j + n] for j in range(len(ref) - n + 1)]
        edges = []
        for i, g in enumerate(gen_grams):
            for j, r in enumerate(ref_grams):
                value = np.prod([np.exp(-beta * _naive_distance(a, b)) for a, b in zip(g, r, strict=True)])
                edges.append(((i, j), value))
        edges.sort(key=lambda edge: edge[1], reverse=True)
        total = 0.0
        while edges:
            (bi, bj), value = edges[0]
            total += value
            edges = [edge for edge in edges if edge[0][0] != bi and edge[0][1] != bj]
        p_values.append(total / len(gen_grams))
    brevity = 1.0 if len(gen) > len(ref) else np.exp(1.0 - len(ref) / len(gen))
    return 0.0 if min(p_values) == 0 else brevity * math.exp(np.mean(np.log(p_values)))


def naive_dtw_day(gen, ref, scale=2.0):
    n, m = len(gen), len(ref)
    table = np.full((n + 1, m + 1), np.inf)
    table[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = _naive_distance(gen[i - 1], ref[j - 1], scale)
            table[i, j] = cost + np.min([table[i - 1, j], table[i, j - 1], table[i - 1, j - 1]])
    return table[n, m]


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------------


def per_day_seconds(fn, gen_days, ref_days):
    start = time.perf_counter()
    values = np.array([fn(g, r) for g, r in zip(gen_days, ref_days, strict=True)])
    return values, (time.perf_counter() - start) / len(gen_days)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--slots", type=int, default=48)
    parser.add_argument("--pattern", choices=("walk", "routine"), default="walk")
    parser.add_argument("--subsample", type=int, default=200, help="user-days scored by geobleu_day / dtw_day")
    parser.add_argument("--naive-subsample", type=int, default=10, help="user-days scored by the naive scorer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generated, reference = build(args.users, args.days, args.slots, args.seed, args.pattern)
    num_days = args.users * args.days
    print(
        f"{args.pattern} trajectories: {args.users} users x {args.days} days x {args.slots} slots = {num_days} "
        f"user-days ({len(generated)} steps per side)"
    )

    # Subsample: evenly spread user-days; one pseudo-user per user-day so that per-user values are per-day values.
    sub = np.unique(np.linspace(0, num_days - 1, min(args.subsample, num_days)).astype(int))
    naive_sub = sub[: max(1, min(args.naive_subsample, len(sub)))]
    gen_xy = generated[["x", "y"]].to_numpy().reshape(num_days, args.slots, 2)
    ref_xy = reference[["x", "y"]].to_numpy().reshape(num_days, args.slots, 2)
    day_id = (generated["uid"] * args.days + generated["d"]).to_numpy()
    in_sub = np.isin(day_id, sub)
    sub_gen = generated[in_sub].assign(uid=day_id[in_sub])
    sub_ref = reference[in_sub].assign(uid=day_id[in_sub])
    naive_gen = [[tuple(p) for p in gen_xy[i].tolist()] for i in naive_sub]
    naive_ref = [[tuple(p) for p in ref_xy[i].tolist()] for i in naive_sub]

    metrics = [
        ("GEO-BLEU (N=5)", lambda g, r, **kw: geobleu(g, r, max_n=5, **kw), lambda g, r: geobleu_day(g, r, max_n=5),
         lambda g, r: naive_geobleu_day(g, r, max_n=5), "geobleu"),
        ("GEO-BLEU (N=3)", lambda g, r, **kw: geobleu(g, r, max_n=3, **kw), lambda g, r: geobleu_day(g, r, max_n=3),
         lambda g, r: naive_geobleu_day(g, r, max_n=3), "geobleu"),
        ("DTW", dtw, dtw_day, naive_dtw_day, "dtw"),
    ]  # fmt: skip
    rows, seconds_of = [], {}
    for name, vectorised, single_day, naive_day, column in metrics:
        start = time.perf_counter()
        value = vectorised(generated, reference)
        seconds = time.perf_counter() - start
        seconds_of[name] = seconds
        ms_per_day = 1e3 * seconds / num_days

        ref_values, ref_seconds = per_day_seconds(single_day, gen_xy[sub], ref_xy[sub])
        _, per_day = vectorised(sub_gen, sub_ref, return_per_user=True)
        max_diff = float(np.max(np.abs(per_day.set_index("uid")[column].loc[sub].to_numpy() - ref_values)))

        naive_values, naive_seconds = per_day_seconds(naive_day, naive_gen, naive_ref)
        naive_diff = float(np.max(np.abs(naive_values - ref_values[: len(naive_sub)])))
        rows.append((name, value, seconds, ms_per_day, 1e3 * ref_seconds, max_diff, 1e3 * naive_seconds, naive_diff))

    header = (
        f"{'metric':<15} {'value':>9} {'seconds':>8} {'ms/day':>7} | {'ref ms/day':>10} {'speed-up':>8} "
        f"{'max|diff|':>9} | {'naive ms/day':>12} {'speed-up':>8} {'max|diff|':>9}"
    )
    print(
        f"\nvectorised over all {num_days} user-days | vs geobleu_day / dtw_day on {len(sub)} user-days | "
        f"vs naive HuMob-style scorer on {len(naive_sub)} user-days"
    )
    print(header)
    print("-" * len(header))
    for name, value, seconds, ms, ref_ms, diff, naive_ms, naive_diff in rows:
        print(
            f"{name:<15} {value:>9.5f} {seconds:>8.2f} {ms:>7.4f} | {ref_ms:>10.2f} {ref_ms / ms:>7.0f}x "
            f"{diff:>9.1e} | {naive_ms:>12.1f} {naive_ms / ms:>7.0f}x {naive_diff:>9.1e}"
        )
    total = seconds_of["GEO-BLEU (N=5)"] + seconds_of["DTW"]
    verdict = "OK" if total <= TARGET_SECONDS else "OVER"
    print(f"\nGEO-BLEU(5) + DTW total: {total:.2f} s (target <= {TARGET_SECONDS:.0f} s for 1000 x 15 x 48): {verdict}")


if __name__ == "__main__":
    main()
