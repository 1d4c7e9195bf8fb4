"""Benchmark of MHSA next-location prediction (train/mhsa.py) and of CaLLiPer location embedding throughput.

1. MHSA on the demo data: the default synthetic city (`synthesize_checkins(seed=0)`, written as TSMC files, read back
   with the `foursquare` reader and prepared with the default `prepare_checkins`) and the demo recipe
   (`train/recipes/mhsa_demo.yaml`) cut to `--epochs` epochs, for the two location encoders:
   - `id`: learned location IDs;
   - `calliper`: frozen CaLLiPer embeddings of the location coordinates (CaLLiPer trained first with
     `train/recipes/calliper_demo.yaml`; its output folder is passed as `location_encoder`), plus the recipe's
     learned residual.
   Per variant: training samples/s (`train_samples_per_second` of the run's `run_info.json`: training epochs only,
   validation excluded; the recipe's `num_threads`), test predictions/s (`evaluate_mhsa`'s
   `report["inference"]["predictions_per_second"]`: every location ranked for every test sample, batch
   `eval_batch_size`) for each `--threads` value, and test Acc@1 / MRR for reference (after a few epochs only; the
   recipe's full budget does better).
2. CaLLiPer embedding throughput: `CaLLiPerModel(CaLLiPerConfig())` (the paper's encoder, untrained weights: the cost
   does not depend on them) in eval mode, `get_location_embeddings` on `--coordinates` random (longitude, latitude)
   points inside the synthetic city's box (float64 numpy input, the default chunking), best of `--repeats`, for each
   `--threads` value, once exact (float32) and once with `compute_dtype=torch.bfloat16` (the fully connected layers
   under bfloat16 autocast; fast on CPUs with AVX512-BF16/AMX), with the smallest cosine similarity of its embeddings
   to the float32 ones. Target: at least 200,000 coordinates/s on 2 CPU cores.

Wall times depend on the machine and on what else runs on it; nothing here asserts on them.

Usage:

    python benchmarks/bench_mhsa.py [--epochs 2 --coordinates 1000000 --threads 1,2 --repeats 3 --seed 0
                                     --skip-training]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tables import print_table  # noqa: E402
from modeling_mobility.calliper import CaLLiPerConfig, CaLLiPerModel  # noqa: E402

MHSA_RECIPE = REPO / "train" / "recipes" / "mhsa_demo.yaml"
CALLIPER_RECIPE = REPO / "train" / "recipes" / "calliper_demo.yaml"
EMBED_TARGET_PER_SECOND = 200_000.0
# the synthetic city's box (dataset_builders.synthetic: latitude 40.68-40.88, longitude -74.06 to -73.86)
CITY_LON = (-74.06, -73.86)
CITY_LAT = (40.68, 40.88)


def _with_threads(threads: int, fn, *args, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


def build_demo_data(root: Path, seed: int = 0) -> Path:
    """The demo check-in dataset: the default synthetic city, TSMC files, `foursquare` reader, default prepare."""
    from dataset_builders.preprocess import prepare_checkins
    from dataset_builders.publish import write_prepared
    from dataset_builders.readers import read_dataset
    from dataset_builders.synthetic import synthesize_checkins

    city = synthesize_checkins(seed=seed)
    paths = city.write_tsmc(root / "raw")
    loaded = read_dataset("foursquare", paths["checkins"], locations_path=paths["pois"])
    return Path(write_prepared(prepare_checkins(loaded), root / "data"))


def bench_training(args, threads: list[int]) -> None:
    from train.calliper import train_calliper
    from train.mhsa import evaluate_mhsa, load_recipe, train_mhsa

    recipe = load_recipe(MHSA_RECIPE, max_epochs=args.epochs, seed=args.seed, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_mhsa_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data_dir = build_demo_data(root, seed=args.seed)
        t_data = time.perf_counter() - t0

        t0 = time.perf_counter()
        calliper = train_calliper(data_dir, root / "calliper", recipe=CALLIPER_RECIPE, progress=False)
        t_calliper = time.perf_counter() - t0

        rows, info, report = [], {}, {}
        for variant, encoder in (("id", "id"), ("calliper", str(calliper.output_dir))):
            t0 = time.perf_counter()
            result = train_mhsa(data_dir, root / f"mhsa-{variant}", location_encoder=encoder, recipe=recipe)
            t_run = time.perf_counter() - t0
            info, report = result.run_info, result.report
            model_name = next(iter(report["results"]))
            test = report["results"][model_name]
            speeds = []
            for n in threads:  # re-score the test split with n torch threads (same model, same samples)
                again = _with_threads(n, evaluate_mhsa, result.output_dir, data_dir, split=recipe.eval_split,
                                      batch_size=recipe.eval_batch_size, model=result.model)
                speeds.append(f"{again['inference']['predictions_per_second']:,.0f}")
            rows.append([
                variant,
                f"{info['trainable_parameters']:,}",
                f"{info['epochs']}",
                f"{info['train_seconds']:.1f}",
                f"{info['train_samples_per_second']:,.0f}",
                *speeds,
                f"{100 * test['acc@1']:.1f}%",
                f"{100 * test['mrr']:.1f}%",
                f"{t_run:.0f}",
            ])
        baselines = {k: v for k, v in report["results"].items() if k != next(iter(report["results"]))}
        best_name, best = max(baselines.items(), key=lambda kv: kv[1]["mrr"])
        rows.append([f"baseline: {best_name}", "-", "-", "-", "-", *["-"] * len(threads),
                     f"{100 * best['acc@1']:.1f}%", f"{100 * best['mrr']:.1f}%", "-"])

    header = ["variant", "trainable params", "epochs", "train s", "training samples/s",
              *[f"predictions/s ({n} thr)" for n in threads], "test Acc@1", "test MRR", "run s"]
    title = (f"MHSA, recipe {MHSA_RECIPE.name} with max_epochs={args.epochs} (training on {recipe.num_threads} torch "
             f"thread(s), batch {recipe.batch_size}); synthetic city: {info['train_samples']:,} training / "
             f"{report['results'][next(iter(report['results']))]['num_samples']:,} test samples, "
             f"{info['num_locations']:,} locations, {info['num_users']:,} users")
    print_table(title, header, rows, "l" + "r" * (len(header) - 1))
    print(f"\nset-up: data {t_data:.1f} s, CaLLiPer training {t_calliper:.1f} s "
          f"({calliper.report.get('epochs_trained')} epochs, best {calliper.report.get('best_epoch')}); "
          "'run s' = train_mhsa end to end (data, validation, test evaluation with baselines, saving)")


def bench_embeddings(args, threads: list[int]) -> None:
    rng = np.random.default_rng(args.seed)
    coords = np.column_stack([rng.uniform(*CITY_LON, args.coordinates), rng.uniform(*CITY_LAT, args.coordinates)])
    model = CaLLiPerModel(CaLLiPerConfig()).eval()
    rows = []
    exact = None
    for compute_dtype in (None, torch.bfloat16):
        embed = functools.partial(model.get_location_embeddings, compute_dtype=compute_dtype)
        for n in threads:
            _with_threads(n, embed, coords[:10_000])  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = _with_threads(n, embed, coords)
                times.append(time.perf_counter() - t0)
            if exact is None:
                exact = out
            cosine = torch.nn.functional.cosine_similarity(out, exact).min().item()
            best = min(times)
            rate = args.coordinates / best
            rows.append([
                "float32 (exact)" if compute_dtype is None else "bfloat16 autocast", f"{n}", f"{args.coordinates:,}",
                f"{best:.2f}", f"{np.median(times):.2f}", f"{rate:,.0f}", f"{cosine:.6f}",
                f">= {EMBED_TARGET_PER_SECOND:,.0f} (2 cores)", "yes" if rate >= EMBED_TARGET_PER_SECOND else "no",
            ])
    header = ["compute_dtype", "torch threads", "coordinates", f"best of {args.repeats} (s)", "median (s)",
              "coordinates/s", "min cosine to float32", "target", "meets target"]
    params = sum(p.numel() for p in model.location_encoder.parameters())
    title = (f"CaLLiPer get_location_embeddings (CaLLiPerConfig() defaults: {model.config.frequency_num} scales, "
             f"{params:,} location-encoder parameters, {tuple(out.shape)[1]}-d output), random points in the city box; "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print_table(title, header, rows, "lrrrrrrll")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="MHSA max_epochs override of the demo recipe (default 2)")
    parser.add_argument("--coordinates", type=int, default=1_000_000,
                        help="coordinates to embed with CaLLiPer (default 1,000,000)")
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated torch thread counts for the inference and embedding timings (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="embedding timings per thread count; best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true",
                        help="only the CaLLiPer embedding throughput (no data, no training)")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        parser.error(f"--threads must list positive integers, got {args.threads!r}")
    if args.epochs < 1 or args.coordinates < 1 or args.repeats < 1:
        parser.error("--epochs, --coordinates and --repeats must be positive")
    for name in ("transformers", "train", "dataset_builders"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" / "Loading weights" bars between the tables
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} at start (other work on the cores slows multi-thread runs)")

    if not args.skip_training:
        bench_training(args, threads)
    bench_embeddings(args, threads)


if __name__ == "__main__":
    main()
