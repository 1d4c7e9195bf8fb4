"""Benchmark of NextLocMoE (train/nextlocmoe.py): training samples/s and predictions/s of the demo model, and its
predictions/s beside QT-Mob's generative model on the same test samples (the paper reports NextLocMoE up to 600x faster
than LLM-based generation; this prints ours).

Data: the default synthetic check-in city (`synthesize_checkins(seed=--seed)`), TSMC files read back with the
`foursquare` reader, default prepare (as `mobility demo`).

1. NextLocMoE with `train/recipes/nextlocmoe_demo.yaml` (the prepared SmolLM2-135M-Instruct truncated, or
   `--backbone tiny`), cut to `--train-samples` samples x 1 epoch: training samples/s (Trainer's training time,
   evaluation excluded), then predictions/s over the first `--samples` test samples (batch `--batch-size`; forward
   passes plus the KD-tree ranking of every location).
2. QT-Mob with `train/recipes/qtmob_demo.yaml` (the demo's tiny Llama, semantic location codes): location tokenizer,
   instructions, one optimiser step (the decoding cost of a constrained beam search does not depend on the weights:
   every beam decodes exactly `num_levels + 1` tokens), then `evaluate_run` over the same first `--samples` test
   samples with 20 beams (the demo's setting): predictions/s = samples / wall time of that call. `--qtmob-run RUN`
   times an existing QT-Mob run instead (e.g. `runs/demo/sft/qtmob` of `make demo`).

Wall times depend on the machine and what else runs on it; nothing here asserts on them.

Usage:

    python benchmarks/bench_nextlocmoe.py [--backbone smollm2-135m-instruct|tiny] [--train-samples 512]
                                          [--samples 400] [--batch-size 64] [--qtmob-run RUN] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/bench_humob.py

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_mhsa import build_demo_data  # noqa: E402
from benchmarks.tables import print_table  # noqa: E402

NEXTLOCMOE_RECIPE = REPO / "train" / "recipes" / "nextlocmoe_demo.yaml"
QTMOB_RECIPE = REPO / "train" / "recipes" / "qtmob_demo.yaml"


def time_qtmob(data_dir: Path, root: Path, samples: int, seed: int, run: Path | None) -> tuple[float, str]:
    """Seconds of `evaluate_run` over the first `samples` test samples, and a description of the run."""
    from train.evaluate import evaluate_run

    if run is None:
        from dataset_builders.instructions.qtmob import run_instructions_cli
        from train.demo import DEMO_MAX_HISTORY
        from train.location_tokenizer import build_location_tokenizer
        from train.sft import load_recipe, run_sft

        build_location_tokenizer(data_dir, root / "loctok", seed=seed, progress=False)
        run_instructions_cli(data_dir, root / "loctok" / "tokenizer", ["next"], root / "instructions",
                             max_history=DEMO_MAX_HISTORY, seed=seed)
        recipe = load_recipe(QTMOB_RECIPE, instructions=str(root / "instructions"), location_tokenizer=None,
                             tasks=["next"], output_dir=str(root / "qtmob"), seed=seed, max_steps=1)
        run = Path(run_sft(recipe))
        what = f"{QTMOB_RECIPE.name}, 1 step"
    else:
        what = str(run)
    evaluate_run(run, data_dir, max_samples=min(samples, 8))  # warm-up
    t0 = time.perf_counter()
    evaluate_run(run, data_dir, max_samples=samples)
    return time.perf_counter() - t0, what


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=None, help="override the demo recipe's backbone (e.g. tiny)")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--samples", type=int, default=400, help="test samples both models score")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--qtmob-run", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from train.nextlocmoe import evaluate_nextlocmoe, load_recipe, train_nextlocmoe

    overrides = {"max_train_samples": args.train_samples, "max_epochs": 1, "evaluate": False, "progress": False,
                 "seed": args.seed}
    if args.backbone:
        overrides["backbone"] = args.backbone
    recipe = load_recipe(NEXTLOCMOE_RECIPE, **overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_nextlocmoe_") as tmp:
        root = Path(tmp)
        data_dir = build_demo_data(root, seed=args.seed)
        result = train_nextlocmoe(data_dir, root / "nlm", recipe=recipe)
        info = result.run_info
        evaluate_nextlocmoe(result.output_dir, data_dir, max_samples=8, model=result.model)  # warm-up
        t0 = time.perf_counter()
        report = evaluate_nextlocmoe(result.output_dir, data_dir, max_samples=args.samples,
                                     batch_size=args.batch_size, model=result.model)
        nlm_seconds = time.perf_counter() - t0
        inference = report["inference"]
        qt_seconds, qt_what = time_qtmob(data_dir, root, args.samples, args.seed, args.qtmob_run)

    n = inference["samples"]
    rows = [
        ["NextLocMoE", f"{Path(str(info['backbone'])).name} ({info['num_backbone_layers']} layers, MoE in {info['moe_layers']})",
         f"{info['trainable_parameters']:,} / {info['parameters']:,}", f"{info['train_samples_per_second']:.1f}",
         f"{n / inference['forward_seconds']:.1f}", f"{n / nlm_seconds:.1f}"],
        ["QT-Mob", qt_what, "-", "-", "-", f"{n / qt_seconds:.2f}"],
    ]
    print_table(f"Synthetic check-in city, {info['train_samples']:,} training samples x 1 epoch (batch "
                f"{recipe.batch_size}); {n:,} test samples scored by both models",
                ["model", "backbone / run", "trainable / all params", "training samples/s", "forward samples/s",
                 "predictions/s (evaluate)"], rows, "llrrrr")
    print(f"\nNextLocMoE predicts {(n / nlm_seconds) / (n / qt_seconds):.1f}x as many samples per second as QT-Mob's "
          "constrained beam search (20 beams) on the same samples (paper: up to 600x vs Llama-3-8B-Mob generation).")


if __name__ == "__main__":
    main()
