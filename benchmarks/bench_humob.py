"""Benchmark of Llama-3-8B-Mob prediction (train/humob.py): prompt sizes of the humob-qa rows and the speed of batched
greedy generation with the demo model, batching on and off.

Data: the default synthetic grid city (`synthesize_grid(seed=--seed)`: 200 users x 75 days), written as YJMob CSV and
read back with the `yjmob` reader, then prepared twice:
- the paper horizon: `prepare_grid` with predict days 60-74 and `build_humob_qa` asking days 60-74 from input days 0-59;
- the demo horizon: exactly as `mobility demo` does (`train.demo._prepare_qa_city`: `LLAMAMOB_INPUT_DAYS` in,
  `LLAMAMOB_PREDICT_DAYS` asked, `LLAMAMOB_WINDOWS` training windows per user with `LLAMAMOB_SHIFTED_COPIES`
  shifted copies each, answers in `LLAMAMOB_ANSWER_STYLE`, 20% test users).

The demo model: `--run RUN_DIR` (a run folder of `train/sft.py` on humob-qa rows, e.g. `runs/demo/sft/llamamob`, loaded
with `train.llamamob._load`), or `--model NAME` (a pretrained causal LM as it is, e.g. the offline
`smollm2-135m-instruct`: a model whose weights, not its KV cache, dominate a decoding step, as Llama-3-8B's do), else
one trained here with the demo recipe (`train/recipes/llamamob_demo.yaml`: a tiny
Llama from scratch, BPE trained on the rows, ChatML template) cut to `--train-steps` steps, on the demo-horizon rows.
A short training is enough for timing: constrained answers always have the full length (every asked slot, in order),
whatever the weights.

1. Prompt size, per horizon, over the real window (window 0) of every user that has a row (train, validation and test
   splits), with the run's tokenizer: prompt tokens per user (system + user messages through the chat template with
   the generation prompt, tokenised as `generate_answers` does), the fixed part of it (the system message and the
   template around an empty user message), prompt tokens per observed user-day (a day with at least one input record),
   answer tokens (the assistant JSON, without the end-of-turn token) per user and per asked row, the free-decoding
   generation budget `answer_token_budget` per user, and characters per record line (`d t x y`, without the newline).
2. Prediction speed on the demo-horizon prompts of the first `--users` test users (in the split's order): `predict_grid`
   itself (the path of `mobility predict`: prompts rendered with the chat template, batches of similar answer and
   prompt lengths, left padding, greedy decoding to EOS, parsing, filling) with grammar-constrained decoding (the
   default) for each `--batch-sizes` value (1 = batching off), once with `cells="history"` (each answer's cells
   limited to the user's records in its prompt) and once with free decoding at the default batch size
   for reference (a weak model's free answers stop early or run to the budget, so their time says little about the
   decoder). Seconds are the report's `generation_seconds` (rendering, tokenising and generating); users/s is users
   over that; best of `--repeats`, after one warm-up call on two users. The last line says whether batching is at least 3x faster
   per user than batch size 1 (the issue's target).
3. Training step time by batch layout (`--layout-steps` steps each, 0 skips it), on the demo-horizon rows with the demo
   recipe: its own layout (8 micro-batches of 1 row per optimiser step, no padding), one padded batch of 8 rows, and 8
   rows grouped by length (`group_by_length`). Seconds per step come from Trainer's `train_runtime`; padded tokens are
   the share of pad tokens in the batches the layout feeds the model; the training loss (the mean over the steps)
   shows whether two layouts take the same optimiser steps.

OpenMP waiting: the script runs with the environment's `OMP_WAIT_POLICY` (unset: OpenMP's default, what `mobility
predict` gets), or `PASSIVE` with `--omp-passive` (set before torch is imported). On an idle machine the default is
the faster: on 2 cores with 2 threads, passive waiting made every parallel region wake its threads, and unbatched
decoding of the demo model ran ~3x slower (21.4 s vs 7.7 s for 39 users). On a machine that another process keeps
busy, the default spinning stalls every parallel region behind a descheduled thread (the demo model decoded ~30x
slower with 2 threads than with 1 beside a training process, 28 vs 890 tokens/s); there pass `--omp-passive` or
`--threads 1`. The policy in effect is printed with the load average.

Wall times depend on the machine and on what else runs on it; nothing here asserts on them.

Usage:

    python benchmarks/bench_humob.py [--run RUN_DIR | --model smollm2-135m-instruct | --train-steps 60]
                                     [--users 0 --batch-sizes 1,4,8,16 --repeats 3 --threads 0 --omp-passive --seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

if "--omp-passive" in sys.argv[1:]:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads OpenMP (see the module docstring)

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tables import print_table  # noqa: E402
from dataset_builders.instructions.humob_qa import HumobQAConfig, build_humob_qa, parse_records  # noqa: E402
from dataset_builders.preprocess import GridPreprocessConfig, prepare_grid  # noqa: E402
from dataset_builders.publish import load_dataset_folder, load_prepared  # noqa: E402
from dataset_builders.readers import read_dataset  # noqa: E402
from dataset_builders.synthetic import synthesize_grid, write_yjmob  # noqa: E402
from train.demo import (  # noqa: E402
    LLAMAMOB_INPUT_DAYS,
    LLAMAMOB_PREDICT_DAYS,
    LLAMAMOB_RECIPE,
    LLAMAMOB_SHIFTED_COPIES,
    LLAMAMOB_WINDOWS,
)
from train.humob import answer_style_of, answer_token_budget, predict_grid  # noqa: E402

PAPER_INPUT_DAYS = (0, 59)
PAPER_PREDICT_DAYS = (60, 74)
TARGET_SPEEDUP = 3.0  # the issue: batching at least 3x faster per user than unbatched
DEFAULT_BATCH = 16  # generate_answers / predict_grid default


def build_data(root: Path, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """`{horizon: (prepared grid folder, humob-qa folder)}` for the paper and the demo horizons (module docstring)."""
    from dataset_builders.publish import write_prepared
    from train.demo import _prepare_qa_city

    csv = write_yjmob(synthesize_grid(seed=seed), root / "raw" / "grid.csv")
    loaded = read_dataset("yjmob", csv)
    out = {"demo": _prepare_qa_city(loaded, root, "grid_qa", seed, "bench_humob: demo horizon", LLAMAMOB_WINDOWS,
                                    LLAMAMOB_SHIFTED_COPIES)}
    paper = write_prepared(prepare_grid(loaded, GridPreprocessConfig(predict_days=PAPER_PREDICT_DAYS, seed=seed)),
                           root / "data" / "grid_paper", title="bench_humob: paper horizon")
    build_humob_qa(paper, root / "humob_qa_paper", HumobQAConfig(input_days=PAPER_INPUT_DAYS,
                                                                 predict_days=PAPER_PREDICT_DAYS, seed=seed),
                   progress=False)
    out["paper"] = (paper, root / "humob_qa_paper")
    return out


def load_rows(qa: Path, split: str | None = None) -> list[dict]:
    """The real-window (window 0), unshifted (copy 0) rows of a humob-qa folder: one split, or all splits in order."""
    ds = load_dataset_folder(qa, "humob-qa")
    rows = []
    for name in [split] if split else list(ds):
        rows += [r for r in ds[name] if int(r["window"]) == 0 and int(r.get("copy", 0)) == 0]
    return rows


def render_ids(tokenizer, prompts) -> list[np.ndarray]:
    """Prompt token ids as `generate_answers` makes them: chat template with the generation prompt, no extra specials."""
    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fmt_stats(values: np.ndarray) -> str:
    return f"{values.mean():,.0f} / {np.percentile(values, 95):,.0f} / {values.max():,}"


def bench_prompts(tokenizer, qa_dirs: dict[str, Path]) -> None:
    rows = []
    for horizon, (input_days, predict_days) in (("paper", (PAPER_INPUT_DAYS, PAPER_PREDICT_DAYS)),
                                               ("demo", (LLAMAMOB_INPUT_DAYS, LLAMAMOB_PREDICT_DAYS))):
        qa_rows = load_rows(qa_dirs[horizon])
        prompts = [r["prompt"] for r in qa_rows]
        prompt_tokens = np.array([len(x) for x in render_ids(tokenizer, prompts)])
        system = next(m["content"] for m in prompts[0] if m["role"] == "system")
        fixed = len(render_ids(tokenizer, [[{"role": "system", "content": system},
                                            {"role": "user", "content": ""}]])[0])
        users_text = [next(m["content"] for m in p if m["role"] == "user") for p in prompts]
        observed_days, record_chars, num_asked = [], [], []
        for text in users_text:
            records, asked = parse_records(text)
            observed_days.append(len(np.unique(records[:, 0])))
            num_asked.append(len(asked))
            record_chars += [len(line) for line in text.split("\n")[1:] if not line.endswith(" 999 999")]
        observed_days = np.array(observed_days)
        num_asked = np.array(num_asked)
        answers = [r["completion"][0]["content"] for r in qa_rows]
        answer_tokens = np.array([len(x) for x in tokenizer(answers, add_special_tokens=False)["input_ids"]])
        style = answer_style_of(answers[0]) or "compact"
        budget_of = {m: answer_token_budget(tokenizer, int(m), answer_style=style) for m in np.unique(num_asked)}
        budgets = np.array([budget_of[m] for m in num_asked])
        seen = observed_days > 0
        rows.append([
            f"{horizon}: days {input_days[0]}-{input_days[1]} in, {predict_days[0]}-{predict_days[1]} asked",
            f"{len(qa_rows)}",
            f"{observed_days.mean():.1f}",
            _fmt_stats(prompt_tokens),
            f"{fixed:,}",
            f"{(prompt_tokens[seen] / observed_days[seen]).mean():,.0f}",
            f"{num_asked.mean():.0f}",
            _fmt_stats(answer_tokens),
            f"{answer_tokens.sum() / num_asked.sum():.1f}",
            f"{budgets.mean():,.0f}",
            f"{np.mean(record_chars):.1f}",
        ])
    header = ["horizon", "users", "observed days / user", "prompt tokens / user (mean / p95 / max)",
              "fixed part (system + template)", "prompt tokens / observed user-day", "asked rows / user",
              "answer tokens / user (mean / p95 / max)", "answer tokens / asked row", "budget / user",
              "chars / record line"]
    title = (f"Prompt size of the humob-qa rows (real window of every user with a row, all splits), tokenizer of the "
             f"run (vocab {len(tokenizer):,}); 'budget' = answer_token_budget(num_asked), the max_new_tokens of "
             "predict_grid")
    print_table(title, header, rows, "l" + "r" * (len(header) - 1))


def bench_generation(args, model, tokenizer, data_dir: Path, qa: Path, batch_sizes: list[int]) -> None:
    data = load_prepared(data_dir)
    split_uids = data.table("samples", "test").column("uid").to_pylist()
    test_rows = load_rows(qa, "test")
    by_uid = {int(r["uid"]): r["prompt"] for r in test_rows}
    style = answer_style_of(test_rows[0]["completion"][0]["content"]) or "compact"  # the answers the model learnt
    chosen = [u for u in split_uids[: args.users or None] if u in by_uid]
    prompts = dict(zip(chosen, (by_uid[u] for u in chosen)))
    prompt_tokens = np.array([len(x) for x in render_ids(tokenizer, list(prompts.values()))])

    def predict(batch_size: int, constrained: bool = True, users: int | None = None, cells: str = "grid") -> dict:
        _, report = predict_grid(model, tokenizer, data, split="test", prompts=prompts, batch_size=batch_size,
                                 max_users=users or args.users or None, on_missing_prompt="fallback",
                                 constrained=constrained, cells=cells, answer_style=style, progress=False)
        return report

    predict(1, users=2)  # warm-up (first-call allocations, the grammar's token texts)
    rows, per_user, answers = [], {}, {}
    modes = [(bs, True, "grid") for bs in batch_sizes] + [(DEFAULT_BATCH, True, "history"),
                                                           (DEFAULT_BATCH, False, "grid")]
    for bs, constrained, cells in modes:
        best = None
        for _ in range(args.repeats):
            report = predict(bs, constrained, cells=cells)
            if best is None or report["generation_seconds"] < best["generation_seconds"]:
                best = report
        seconds = best["generation_seconds"]
        grid = constrained and cells == "grid"
        if grid:
            per_user[bs] = len(prompts) / seconds
            answers[bs] = best["tokens_generated"]
        mode = ("constrained" + (" (batching off)" if bs == 1 else "") if grid else
                "constrained, --cells history" if constrained else "free (the paper's decoding)")
        speedup = (f"{len(prompts) / seconds / per_user[1]:.2f}x" if constrained and batch_sizes[0] == 1 else "-")
        rows.append([mode, f"{bs}", f"{len(prompts)}", f"{best['tokens_generated']:,}", f"{seconds:.1f}",
                     f"{best['tokens_generated'] / seconds:,.0f}", f"{len(prompts) / seconds:.2f}", speedup,
                     f"{best['answered']:,} / {best['asked_slots']:,}", f"{best['stopped_at_limit']}"])
    header = ["decoding", "batch size", "users", "generated tokens", "seconds", "generated tokens/s", "users/s",
              "speed-up per user vs batch 1", "asked slots answered by the model", "answers at the token budget"]
    title = (f"Prediction (predict_grid, the path of `mobility predict`), demo horizon (days {LLAMAMOB_INPUT_DAYS[0]}-"
             f"{LLAMAMOB_INPUT_DAYS[1]} in, {LLAMAMOB_PREDICT_DAYS[0]}-{LLAMAMOB_PREDICT_DAYS[1]} asked), first "
             f"{len(prompts)} test users: prompts {prompt_tokens.mean():,.0f} tokens (max {prompt_tokens.max():,}); "
             f"{torch.get_num_threads()} torch thread(s), {next(model.parameters()).device}, best of {args.repeats}; "
             "seconds = generation time including rendering and tokenising the prompts")
    print_table(title, header, rows, "l" + "r" * (len(header) - 1))
    if len(set(answers.values())) > 1:
        print(f"\nnote: the constrained answers differ in length across batch sizes ({answers}); left padding changes "
              "the float rounding of a few greedy choices")

    if batch_sizes[0] != 1 or len(batch_sizes) < 2:
        print("\nno verdict on batching: --batch-sizes must start with 1 and list a larger size")
        return
    best_bs = max(batch_sizes[1:], key=lambda b: per_user[b])
    speedup = per_user[best_bs] / per_user[1]
    at_default = (f"; at the default batch size {DEFAULT_BATCH}: {per_user[DEFAULT_BATCH] / per_user[1]:.2f}x"
                  if DEFAULT_BATCH in per_user else "")
    verdict = "yes" if speedup >= TARGET_SPEEDUP else "no"
    print(f"\nbatching at least {TARGET_SPEEDUP:.0f}x faster per user than batch size 1 (the issue's target): "
          f"{verdict} (best: batch size {best_bs}, {speedup:.2f}x users/s{at_default})")


def bench_training_layouts(qa: Path, steps: int, seed: int) -> None:
    """Section 3: seconds per training step of the demo recipe in three batch layouts (module docstring)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    from train.sft import load_recipe, run_sft

    layouts = [("8 micro-batches of 1 (the recipe)", {"per_device_train_batch_size": 1,
                                                      "gradient_accumulation_steps": 8}),
               ("1 batch of 8, padded", {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}),
               ("1 batch of 8, grouped by length", {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                                    "group_by_length": True})]
    print(f"\n3. Training steps by batch layout ({steps} optimiser steps of 8 rows each, demo recipe, demo-horizon "
          "rows)\n")
    print("| layout | s/step | padded tokens | training loss (mean of the steps) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_layouts_") as tmp:
        for i, (name, layout) in enumerate(layouts):
            recipe = load_recipe(LLAMAMOB_RECIPE, instructions=str(qa), output_dir=str(Path(tmp) / str(i)),
                                 max_steps=steps, seed=seed, eval_samples=0, save_steps=10**9,
                                 logging_steps=steps, progress=False, **layout)
            fed = {"real": 0, "all": 0}
            original = LlamaModel.forward

            def counted(self, input_ids=None, attention_mask=None, *args, _original=original, _fed=fed, **kwargs):
                if self.training and input_ids is not None:  # the batches the layout feeds the model
                    _fed["all"] += input_ids.numel()
                    _fed["real"] += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
                return _original(self, input_ids, attention_mask, *args, **kwargs)

            LlamaModel.forward = counted
            try:
                run = run_sft(recipe)
            finally:
                LlamaModel.forward = original
            state = json.loads((run / "trainer_state.json").read_text())
            runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
            loss = next(e["train_loss"] for e in state["log_history"] if "train_loss" in e)
            padded = 1 - fed["real"] / fed["all"] if fed["all"] else float("nan")
            print(f"| {name} | {runtime / steps:.2f} | {padded:.0%} | {loss:.4f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None,
                        help="an existing humob-qa run folder (model/, tokenizer/), e.g. runs/demo/sft/llamamob; "
                             "default: train the demo recipe for --train-steps steps in a temporary folder")
    parser.add_argument("--model", default=None,
                        help="time a pretrained causal LM as it is instead (no training): an offline alias such as "
                             "smollm2-135m-instruct, a folder or a Hub id, with its own tokenizer and chat template; "
                             "constrained answers have the full length whatever the weights")
    parser.add_argument("--train-steps", type=int, default=60,
                        help="max_steps of the demo recipe when no --run is given (default 60)")
    parser.add_argument("--users", type=int, default=0,
                        help="the first test users whose prompts are generated (default 0: all of them, 39 in the "
                             "default city, as `mobility predict` does a whole split; prediction batches "
                             "continuously, so a few users leave the batch half-empty for much of the run and "
                             "understate batching)")
    parser.add_argument("--batch-sizes", default="1,4,8,16",
                        help="comma-separated generation batch sizes; 1 (first) is batching off (default 1,4,8,16)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per batch size; best is reported (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE (for a machine that other work keeps busy; slower when idle)")
    parser.add_argument("--layout-steps", type=int, default=60,
                        help="optimiser steps timed per training batch layout in section 3 (default 60; 0 skips it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic city, the split and the training")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must list positive integers, got {args.batch_sizes!r}")
    if args.users < 0 or args.repeats < 1 or args.train_steps < 1 or args.threads < 0 or args.layout_steps < 0:
        parser.error("--repeats and --train-steps must be positive, --users, --threads and --layout-steps "
                     "non-negative")
    if args.run is not None and not (args.run / "model").is_dir():
        parser.error(f"--run {args.run} has no model/ folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("transformers", "train", "dataset_builders"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    policy = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP's default)"
    print(f"{os.cpu_count()} CPUs, load average {load} at start (other work on the cores slows every timing); "
          f"{torch.get_num_threads()} torch thread(s), OMP_WAIT_POLICY={policy}")

    from train.llamamob import _load

    with tempfile.TemporaryDirectory(prefix="bench_humob_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dirs = build_data(root, seed=args.seed)
        t_data = time.perf_counter() - t0
        if args.model is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from train.pretrained import resolve_model

            path = resolve_model(args.model)
            run, how = None, f"{args.model} as it is (pretrained, not trained on humob-qa)"
        elif args.run is not None:
            run, how = args.run, f"run {args.run}"
        else:
            from train.sft import load_recipe, run_sft

            recipe = load_recipe(LLAMAMOB_RECIPE, instructions=str(dirs["demo"][1]), output_dir=str(root / "run"),
                                 max_steps=args.train_steps, seed=args.seed, eval_samples=0, save_steps=10**9,
                                 logging_steps=max(1, args.train_steps // 3))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines, not between the tables
                run = run_sft(recipe)
            how = (f"trained here: {LLAMAMOB_RECIPE.name} cut to {args.train_steps} steps on the demo-horizon rows "
                   f"({time.perf_counter() - t0:.0f} s); constrained answers have the full length whatever the "
                   "weights, so the speed of constrained prediction hardly depends on how well the model is trained")
        if run is None:
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            model, tokenizer = _load(Path(run))
        params = sum(p.numel() for p in model.parameters())
        print(f"\nset-up: data (synthetic city, both horizons, humob-qa rows) {t_data:.1f} s; model {how}; "
              f"{params:,} parameters, vocab {len(tokenizer):,}")
        bench_prompts(tokenizer, {h: qa for h, (_, qa) in dirs.items()})
        bench_generation(args, model, tokenizer, *dirs["demo"], batch_sizes)
        if args.layout_steps:
            bench_training_layouts(dirs["demo"][1], args.layout_steps, args.seed)


if __name__ == "__main__":
    main()
