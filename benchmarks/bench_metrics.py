"""Benchmark of the vectorised trajectory metrics (GEO-BLEU, DTW) of `train.metrics`.

Builds seeded random-walk trajectories on a 200 x 200 grid (users who mostly stay put, as HuMob users do, which makes
tied proximities frequent), times `geobleu` (N=5 and N=3) and `dtw` over all user-days, and compares them with the
pure-Python single-day reference (`geobleu_day`, `dtw_day`) on a subsample: speed-up and largest absolute difference.

Usage:

    python benchmarks/bench_metrics.py [--users 1000 --days 15 --slots 48 --subsample 200 --seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.metrics import dtw, dtw_day, geobleu, geobleu_day  # noqa: E402

GRID = 200
TARGET_SECONDS = 10.0


def random_walks(rng: np.random.Generator, homes: np.ndarray, days: int, slots: int, stay: float = 0.7) -> np.ndarray:
    """[users * days * slots, 5] int array (uid, d, t, x, y): each day starts at home and moves by small steps."""
    users = len(homes)
    moves = rng.integers(-3, 4, size=(users, days, slots, 2))
    moves[rng.random((users, days, slots)) < stay] = 0
    moves[:, :, 0] = 0
    xy = np.clip(homes[:, None, None, :] + np.cumsum(moves, axis=2), 0, GRID - 1)
    uid, d, t = np.meshgrid(np.arange(users), np.arange(days), np.arange(slots), indexing="ij")
    return np.column_stack([uid.ravel(), d.ravel(), t.ravel(), xy.reshape(-1, 2)]).astype(np.int64)


def build(users: int, days: int, slots: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    homes = rng.integers(20, GRID - 20, size=(users, 2))
    reference = random_walks(rng, homes, days, slots)
    generated = random_walks(rng, homes, days, slots)
    # A model gets part of the day right: copy about a third of the reference steps into the generated trajectory.
    copy = rng.random(len(generated)) < 0.3
    generated[copy, 3:] = reference[copy, 3:]
    columns = ["uid", "d", "t", "x", "y"]
    return pd.DataFrame(generated, columns=columns), pd.DataFrame(reference, columns=columns)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--slots", type=int, default=48)
    parser.add_argument("--subsample", type=int, default=200, help="user-days scored by the single-day reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generated, reference = build(args.users, args.days, args.slots, args.seed)
    num_days = args.users * args.days
    print(f"{args.users} users x {args.days} days x {args.slots} slots = {num_days} user-days, {len(generated)} steps")

    # The subsample: the first `subsample` user-days (users are contiguous, days in order).
    sub_days = min(args.subsample, num_days)
    sub_uid, sub_d = np.divmod(np.arange(sub_days), args.days)
    gen_xy = generated[["x", "y"]].to_numpy().reshape(num_days, args.slots, 2)
    ref_xy = reference[["x", "y"]].to_numpy().reshape(num_days, args.slots, 2)
    keys = set(zip(sub_uid.tolist(), sub_d.tolist(), strict=True))
    in_sub = np.array([k in keys for k in zip(generated["uid"], generated["d"], strict=True)])

    metrics = {
        "GEO-BLEU (N=5)": (
            lambda g, r: geobleu(g, r, max_n=5, return_per_user=True),
            lambda g, r: geobleu_day(g, r, max_n=5),
            "geobleu",
        ),
        "GEO-BLEU (N=3)": (
            lambda g, r: geobleu(g, r, max_n=3, return_per_user=True),
            lambda g, r: geobleu_day(g, r, max_n=3),
            "geobleu",
        ),
        "DTW": (lambda g, r: dtw(g, r, return_per_user=True), dtw_day, "dtw"),
    }
    rows = []
    totals = {}
    for name, (vectorised, single_day, column) in metrics.items():
        (value, _), seconds = timed(vectorised, generated, reference)
        totals[name] = seconds
        # Reference on the subsample, day by day.
        start = time.perf_counter()
        ref_values = np.array([single_day(gen_xy[i], ref_xy[i]) for i in range(sub_days)])
        ref_seconds = time.perf_counter() - start
        # Vectorised on the same subsample: one user-day per "user" so that per-user values are per-day values.
        sub_gen = generated[in_sub].assign(uid=lambda f: f["uid"] * args.days + f["d"])
        sub_ref = reference[in_sub].assign(uid=lambda f: f["uid"] * args.days + f["d"])
        _, per_day = vectorised(sub_gen, sub_ref)
        max_diff = float(np.max(np.abs(per_day[column].to_numpy() - ref_values)))
        ms_per_day = 1e3 * seconds / num_days
        ref_ms_per_day = 1e3 * ref_seconds / sub_days
        rows.append((name, value, seconds, ms_per_day, ref_ms_per_day, ref_ms_per_day / ms_per_day, max_diff))

    header = f"{'metric':<16} {'value':>9} {'seconds':>8} {'ms/user-day':>12} {'ref ms/day':>11} {'speed-up':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for name, value, seconds, ms, ref_ms, speedup, diff in rows:
        print(f"{name:<16} {value:>9.5f} {seconds:>8.2f} {ms:>12.4f} {ref_ms:>11.2f} {speedup:>8.0f}x {diff:>11.1e}")
    total = totals["GEO-BLEU (N=5)"] + totals["DTW"]
    verdict = "OK" if total <= TARGET_SECONDS else "OVER"
    print(f"GEO-BLEU(5)+DTW total: {total:.2f} s (target <= {TARGET_SECONDS:.0f} s for 1000 x 15 x 48): {verdict}")


if __name__ == "__main__":
    main()
