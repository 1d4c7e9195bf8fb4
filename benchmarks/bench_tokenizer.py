"""Benchmark of the QT-Mob location quantizer: RQ-VAE training + unique codes, and encode-to-codes throughput.

Data: seeded synthetic "location embeddings" shaped like sentence-transformer output (unit-norm, 384-d), two patterns:

- `lowrank` (default): each location mixes a category centre (40), an area centre (60), a location-specific part of
  low rank (16 factors, as descriptions differ in a few directions: name, address, neighbours) and a little noise;
- `isotropic`: 200 sub-clusters in 20 groups, locations = sub-cluster centre + isotropic noise (a harder case: what
  tells two locations of a sub-cluster apart is incompressible noise, so nearest codes collide more and
  `get_unique_codes` has to move more of them).

No text encoder is involved; the embedding step has its own benchmark.

1. `train_rqvae` on `--locations` rows (default config: 384 -> 256 -> 128 -> 64 -> 32, 4 levels x 64 codes), then
   `get_unique_codes` on all of them. Target: at most 60 s together on 2 CPU cores.
2. `get_codes` on `--encode-rows` rows (nearest codes, and with the Sinkhorn-balanced last level). Target: at least
   50,000 locations/s.

Usage:

    python benchmarks/bench_tokenizer.py [--pattern lowrank --locations 10000 --encode-rows 100000 --max-epochs 200
                                          --patience 10 --batch-size 1024 --seed 0 --threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mobility.rqvae import RQVAEConfig  # noqa: E402
from train.rqvae import train_rqvae  # noqa: E402

TRAIN_TARGET_SECONDS = 60.0
ENCODE_TARGET_PER_SECOND = 50_000.0


def synthetic_embeddings(n: int, pattern: str = "lowrank", dim: int = 384, seed: int = 0) -> np.ndarray:
    """Unit-norm `(n, dim)` float32 embeddings (see the module docstring for the two patterns)."""
    rng = np.random.default_rng(seed)
    if pattern == "lowrank":
        category_centres = rng.normal(size=(40, dim))
        area_centres = 0.6 * rng.normal(size=(60, dim))
        factors = rng.normal(size=(16, dim)) / np.sqrt(16)
        own = rng.normal(size=(n, 16)) @ factors
        x = category_centres[rng.integers(40, size=n)] + area_centres[rng.integers(60, size=n)] + 0.8 * own
        x += 0.2 * rng.normal(size=(n, dim))
    elif pattern == "isotropic":
        groups = rng.normal(size=(20, dim))
        centres = (groups[:, None, :] + 0.5 * rng.normal(size=(20, 10, dim))).reshape(200, dim)
        x = centres[rng.integers(200, size=n)] + 0.3 * rng.normal(size=(n, dim))
    else:
        raise ValueError(f"`pattern` must be 'lowrank' or 'isotropic', got {pattern!r}.")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", choices=["lowrank", "isotropic"], default="lowrank")
    parser.add_argument("--locations", type=int, default=10_000)
    parser.add_argument("--encode-rows", type=int, default=100_000)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--selection-metric", default="objective")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    embeddings = synthetic_embeddings(args.locations, args.pattern, seed=args.seed)
    config = RQVAEConfig(input_dim=embeddings.shape[1])

    # 1. training + unique codes
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        result = train_rqvae(
            embeddings,
            config,
            output_dir=output_dir,
            max_epochs=args.max_epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            selection_metric=args.selection_metric,
            seed=args.seed,
            progress=False,
        )
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        codes, report = result.model.get_unique_codes(torch.from_numpy(embeddings))
        unique_seconds = time.perf_counter() - start
    model = result.model
    best = next(entry for entry in result.history if entry["epoch"] == result.best_epoch)

    # 2. encode-to-codes throughput
    encode_rows = torch.from_numpy(synthetic_embeddings(args.encode_rows, args.pattern, seed=args.seed + 1))
    model.get_codes(encode_rows[:1000])  # warm-up
    timings = {}
    for use_sinkhorn in (False, True):
        start = time.perf_counter()
        model.get_codes(encode_rows, use_sinkhorn=use_sinkhorn)
        timings[use_sinkhorn] = time.perf_counter() - start

    total = train_seconds + unique_seconds
    rows = [
        ("train_rqvae (s)", f"{train_seconds:.1f}", "", ""),
        ("get_unique_codes (s)", f"{unique_seconds:.2f}", "", ""),
        (
            f"train + unique codes, {args.locations:,} locations (s)",
            f"{total:.1f}",
            f"<= {TRAIN_TARGET_SECONDS:.0f}",
            "yes" if total <= TRAIN_TARGET_SECONDS else "NO",
        ),
    ]
    for use_sinkhorn, seconds in timings.items():
        rate = args.encode_rows / seconds
        name = (
            f"get_codes {'Sinkhorn last level' if use_sinkhorn else 'nearest codes'}, {args.encode_rows:,} rows (/s)"
        )
        rows.append(
            (
                name,
                f"{rate:,.0f}",
                f">= {ENCODE_TARGET_PER_SECOND:,.0f}",
                "yes" if rate >= ENCODE_TARGET_PER_SECOND else "NO",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"pattern: {args.pattern}, torch threads: {torch.get_num_threads()}")
    print(f"{'measure':<{width}}  {'value':>10}  {'target':>10}  met")
    for name, value, target, met in rows:
        print(f"{name:<{width}}  {value:>10}  {target:>10}  {met}")
    print()
    print(
        f"epochs run: {result.history[-1]['epoch']} (best {result.best_epoch}, stopped early: {result.stopped_early})"
    )
    print(
        f"best epoch, validation rows: loss {best['eval_loss']:.5f}, "
        f"reconstruction {best['eval_reconstruction_loss']:.5f}, collision rate {best['eval_collision_rate']:.4f}"
    )
    print(
        f"all {report['num_rows']:,} locations: collision rate nearest codes {report['collision_rate_before']:.4f}, "
        f"after Sinkhorn {report['collision_rate_after_sinkhorn']:.4f}, final {report['collision_rate_final']:.4f} "
        f"({report['num_moved']} moved)"
    )
    print("per-level usage:      " + ", ".join(f"{u:.3f}" for u in report["usage"]))
    print(
        "per-level perplexity: "
        + ", ".join(f"{p:.1f}" for p in report["perplexity"])
        + f" (of {config.codebook_size})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
