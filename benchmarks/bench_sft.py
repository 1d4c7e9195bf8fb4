"""Benchmark of QT-Mob instruction tuning (train/sft.py): training tokens/s of the demo recipe.

Data: a seeded synthetic instruction set shaped like the QT-Mob builders' output (prompt-completion pairs): `--rows`
rows, 60% next location (a user profile, up to 20 timed history visits written as code tokens, "At {time}, user {u}
will visit" -> 4 code tokens), 20% mobility recovery (the same history with [MASK]/[UNKNOWN] slots -> the masked
location) and 20% location alignment (description -> codes, codes -> description), over 500 locations with 4-level
codes (64 codes per level).

The demo recipe (`train/recipes/qtmob_demo.yaml`: tiny Llama from scratch, BPE trained on the corpus, batch 16) runs
for `--max-steps` steps; tokens/s comes from TRL's logged `num_tokens` (prompt + completion tokens fed to the model)
over the Trainer's `train_runtime`. The table also projects the wall time of the recipe's full run on this data.

Usage:

    python benchmarks/bench_sft.py [--rows 4000 --max-steps 60 --recipe train/recipes/qtmob_demo.yaml --threads 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_builders.publish import write_dataset  # noqa: E402
from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer  # noqa: E402
from train.sft import load_recipe, run_sft  # noqa: E402

CATEGORIES = ["Cafe", "Office", "Gym", "Park", "Bar", "Train Station", "Restaurant", "Museum", "Shop", "Home"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def synthetic_instructions(rows: int, seed: int = 0, num_locations: int = 500):
    """`({task: {split: table}}, location_codes)`: a QT-Mob-shaped prompt-completion set (see the module docstring)."""
    rng = random.Random(seed)
    codes: dict[str, tuple[int, ...]] = {}
    while len(codes) < num_locations:
        code = tuple(rng.randrange(64) for _ in range(4))
        if code not in codes.values():
            codes[f"poi{len(codes)}"] = code
    ids = list(codes)
    text = {loc: "".join(f"<{'abcd'[k]}_{c}>" for k, c in enumerate(codes[loc])) for loc in ids}
    category = {loc: rng.choice(CATEGORIES) for loc in ids}

    def when() -> str:
        return f"{rng.choice(DAYS)} {rng.randrange(24):02d}:{rng.choice((0, 15, 30, 45)):02d}"

    def profile(user: int) -> str:
        hours = sorted(rng.sample(range(24), 2))
        return (f"User {user} is most active at {hours[0]}:00 and {hours[1]}:00, often visits "
                f"{', '.join(text[loc] for loc in rng.sample(ids, 3))} and likes "
                f"{', '.join(rng.sample(CATEGORIES, 3))}.")

    def history(n: int) -> list[tuple[str, str]]:
        return [(when(), rng.choice(ids)) for _ in range(n)]

    def make(task: str, n: int) -> pa.Table:
        prompts, completions = [], []
        for _ in range(n):
            user = rng.randrange(150)
            if task == "next":
                visits = "; ".join(f"{t} {text[loc]}" for t, loc in history(rng.randint(5, 20)))
                target = rng.choice(ids)
                prompts.append(f"{profile(user)} Recent visits: {visits}. At {when()}, user {user} will visit ")
                completions.append(text[target])
            elif task == "recovery":
                visits = history(rng.randint(5, 20))
                masked = rng.randrange(1, len(visits))
                shown = "; ".join(f"{t} " + ("[MASK]" if i == masked else text[loc] if rng.random() > 0.3
                                             else "[UNKNOWN]") for i, (t, loc) in enumerate(visits))
                prompts.append(f"{profile(user)} Trajectory with gaps: {shown}. The [MASK] location is ")
                completions.append(text[visits[masked][1]])
            else:
                loc = rng.choice(ids)
                description = f"a {category[loc]} at {rng.uniform(35.5, 35.8):.4f}, {rng.uniform(139.5, 139.9):.4f}"
                if rng.random() < 0.5:
                    prompts.append(f"Which location is {description}? ")
                    completions.append(text[loc])
                else:
                    prompts.append(f"Describe the location {text[loc]}: ")
                    completions.append(description)
        return pa.table({"prompt": prompts, "completion": completions})

    shares = {"next": 0.6, "recovery": 0.2, "alignment": 0.2}
    configs = {task: {"train": make(task, max(1, int(rows * share))), "validation": make(task, 64)}
               for task, share in shares.items()}
    return configs, codes


def _time_predictions(run: Path, instructions: Path, n: int) -> list[tuple[str, str]]:
    """Evaluation speed: predictions/s of constrained beam search (batch 32, 20 beams), both decoders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataset_builders.publish import load_dataset_folder
    from tokenization_mobility import rank_locations, rank_locations_cached

    split = load_dataset_folder(instructions, "next", split="train")
    prompts = split.select(range(min(n, len(split))))["prompt"]
    tok = AutoTokenizer.from_pretrained(run / "tokenizer", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    mean_len = sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts)
    out = []
    for name, fn in (("cached (default of evaluate)", rank_locations_cached), ("generate + vectorised processor",
                                                                                rank_locations)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(model, tok, prompts, num_beams=20, batch_size=32)
        out.append((f"predictions/s, {name}, {mean_len:.0f}-token prompts", f"{len(prompts) / (time.perf_counter() - t0):.1f}"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="training rows over the three tasks (default 4000)")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps to time (default 60)")
    parser.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "train" / "recipes"
                        / "qtmob_demo.yaml", help="the recipe to time (default: the demo recipe)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=64,
                        help="next-task prompts to rank for the predictions/s rows (batch 32, 20 beams; default 64)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    full = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        configs, codes = synthetic_instructions(args.rows, seed=args.seed)
        write_dataset(root / "instructions", configs)
        base = build_bpe_tokenizer([f"location {loc}" for loc in codes], vocab_size=300)
        LocationTokenizer.from_base(base, codes, codebook_size=64).save_pretrained(root / "loctok")
        t_data = time.perf_counter() - t0

        recipe = load_recipe(
            args.recipe, instructions=str(root / "instructions"), location_tokenizer=str(root / "loctok"),
            output_dir=str(root / "run"), max_steps=args.max_steps, eval_samples=0, save_steps=10**9,
            logging_steps=max(1, args.max_steps // 6), seed=args.seed,
        )
        t0 = time.perf_counter()
        out = run_sft(recipe)
        t_total = time.perf_counter() - t0
        info = json.loads((out / "run_info.json").read_text())
        eval_rows = _time_predictions(out, root / "instructions", args.eval_prompts)

    metrics = info["train_metrics"]
    runtime, tokens = metrics["train_runtime"], metrics["num_tokens"]
    steps = info["global_step"]
    batch = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    rows_total = info["train_rows"]
    steps_per_epoch = math.ceil(rows_total / batch)
    full_steps = full.max_steps if full.max_steps > 0 else int(math.ceil(full.num_train_epochs * steps_per_epoch))
    full_steps = min(full_steps, int(math.ceil(full.num_train_epochs * steps_per_epoch)))
    rows = [
        ("training rows (next/recovery/alignment)", f"{rows_total:,}"),
        ("tokens per row (mean, from num_tokens)", f"{tokens / (steps * batch):.0f}"),
        ("parameters", f"{info['parameters']:,} (vocab {info['vocab_size']:,})"),
        ("batch (per device x accumulation)", f"{batch}"),
        ("steps timed", f"{steps}"),
        ("train_runtime (s)", f"{runtime:.1f}"),
        ("training tokens/s", f"{tokens / runtime:,.0f}"),
        ("training samples/s", f"{steps * batch / runtime:,.1f}"),
        ("steps/s", f"{steps / runtime:.2f}"),
        ("set-up (data, BPE, trainer, saving) (s)", f"{t_data + t_total - runtime:.1f}"),
        (f"projected full recipe ({full_steps} steps = {full_steps / steps_per_epoch:.1f} epochs) (min)",
         f"{full_steps / (steps / runtime) / 60:.1f}"),
    ]
    rows += eval_rows
    width = max(len(k) for k, _ in rows)
    print(f"\nQT-Mob SFT, recipe {args.recipe.name}, {torch.get_num_threads()} torch threads\n")
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|------:|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
