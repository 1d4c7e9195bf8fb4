"""Benchmark of constrained beam search over location codes (`tokenization_mobility.constrained`).

A tiny randomly initialised causal LM (`LlamaConfig`: 4 layers, hidden 128) over a byte-level BPE vocabulary plus the
code tokens of a random code table (default: 1,000 locations x 4 levels x 64 codes) decodes a batch of 32 prompts of
about 32 tokens with 10 beams and `max_new_tokens = num_levels + 1`, three ways:

- unconstrained beam search (the floor);
- `prefix_allowed_tokens_fn` walking the code trie once per beam and step (transformers'
  `PrefixConstrainedLogitsProcessor`);
- the vectorised `LocationCodeLogitsProcessor`.

Each variant runs `--repeats` times, interleaved; the median and the best wall time are reported with the overhead over
the unconstrained search (target for the vectorised processor: <= 20%). The constrained variants are checked to return
identical beams, and each logits processor is also timed alone on the inputs recorded from one generate call. On a
shared machine the best times are the stable figures (other load only adds time), so the verdict uses them.

Usage:

    python benchmarks/bench_constrained.py [--locations 1000 --levels 4 --codebook-size 64 --batch-size 32 \
        --num-beams 10 --prompt-tokens 32 --repeats 15 --threads 2 --seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenization_mobility import (  # noqa: E402
    LocationCodeLogitsProcessor,
    LocationTokenizer,
    build_bpe_tokenizer,
    make_prefix_allowed_tokens_fn,
)
from train.sft import tiny_llama  # noqa: E402

WORDS = "user visited the cafe museum park station office gym school bakery bar at then will visit near".split()


def make_tokenizer(locations: int, levels: int, codebook_size: int, seed: int) -> LocationTokenizer:
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(20)) + f" {rng.randrange(1000)}" for _ in range(2000)]
    base = build_bpe_tokenizer(corpus, vocab_size=1000)
    codes: set[tuple[int, ...]] = set()
    while len(codes) < locations:
        codes.add(tuple(rng.randrange(codebook_size) for _ in range(levels)))
    table = {f"loc{i}": c for i, c in enumerate(sorted(codes))}
    return LocationTokenizer.from_base(base, table, codebook_size=codebook_size)


def make_prompts(tokenizer: LocationTokenizer, batch_size: int, prompt_tokens: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    ids = list(tokenizer.location_codes)
    prompts = []
    for i in range(batch_size):
        words = [rng.choice(WORDS) for _ in range(prompt_tokens)]
        text = " ".join(words) + f" {tokenizer.location_to_text(rng.choice(ids))} user {i} will visit"
        tokens = tokenizer(text)["input_ids"]
        # trim to about prompt_tokens (+-3) so that the batch has prompts of different lengths
        keep = prompt_tokens - (i % 4)
        prompts.append(tokenizer.decode(tokens[-keep:]))
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


class _Recorder(LogitsProcessor):
    """Keeps the (input_ids, scores) pairs a generate call shows its processors, for the isolated timing."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locations", type=int, default=1000)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = make_tokenizer(args.locations, args.levels, args.codebook_size, args.seed)
    batch = make_prompts(tokenizer, args.batch_size, args.prompt_tokens, args.seed)
    prompt_length = batch["input_ids"].shape[1]
    torch.manual_seed(args.seed)
    model = tiny_llama(tokenizer, max_position_embeddings=256).eval()  # the demo recipe's tiny Llama
    common = dict(
        num_beams=args.num_beams,
        num_return_sequences=args.num_beams,
        do_sample=False,
        max_new_tokens=args.levels + 1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    start = time.perf_counter()
    processor = LocationCodeLogitsProcessor(tokenizer, num_beams=args.num_beams)
    build_seconds = time.perf_counter() - start

    def run(variant: str):
        kwargs = dict(common)
        if variant == "prefix_allowed_tokens_fn":
            kwargs["prefix_allowed_tokens_fn"] = make_prefix_allowed_tokens_fn(tokenizer, prompt_length)
        elif variant == "vectorised processor":
            kwargs["logits_processor"] = LogitsProcessorList([processor])
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            return time.perf_counter() - start, out

    variants = ["unconstrained", "prefix_allowed_tokens_fn", "vectorised processor"]
    for variant in variants:  # warm-up
        run(variant)
    times = {variant: [] for variant in variants}
    outputs = {}
    for _ in range(args.repeats):
        for variant in variants:
            seconds, outputs[variant] = run(variant)
            times[variant].append(seconds)
    a, b = outputs["prefix_allowed_tokens_fn"], outputs["vectorised processor"]
    identical = torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences_scores, b.sequences_scores)
    valid = all(
        len(found := tokenizer.ids_to_locations(row[prompt_length:])) == 1 and found[0] is not None
        for row in b.sequences
    )

    # Isolated per-call cost of each processor on the inputs that one generate call shows them.
    recorder = _Recorder()
    with torch.no_grad():
        model.generate(**batch, **common, logits_processor=LogitsProcessorList([recorder]))
    prefix_processor = PrefixConstrainedLogitsProcessor(
        make_prefix_allowed_tokens_fn(tokenizer, prompt_length), args.num_beams
    )
    isolated = {}
    for name, proc in (("prefix_allowed_tokens_fn", prefix_processor), ("vectorised processor", processor)):
        per_generate = []
        for _ in range(args.repeats):
            processor.reset()
            start = time.perf_counter()
            for input_ids, scores in recorder.calls:
                proc(input_ids, scores)
            per_generate.append(time.perf_counter() - start)
        isolated[name] = min(per_generate)

    medians = {variant: statistics.median(values) for variant, values in times.items()}
    floor = medians["unconstrained"]
    print(
        f"{args.batch_size} prompts x {args.num_beams} beams, prompt length {prompt_length} (left-padded), "
        f"{args.locations:,} locations x {args.levels} levels x {args.codebook_size} codes, vocab {len(tokenizer):,}, "
        f"max_new_tokens {args.levels + 1}, {args.threads} threads, median of {args.repeats}"
    )
    floor_min = min(times["unconstrained"])
    print(
        f"{'variant':<28}{'median s':>10}{'overhead':>10}{'min s':>9}{'overhead':>10}"
        f"{'processor s/generate':>22}{'= % of unconstrained':>22}"
    )
    for variant in variants:
        proc_time = isolated.get(variant)
        proc_text = f"{proc_time:.4f}" if proc_time is not None else "-"
        share = f"{proc_time / floor_min:.1%}" if proc_time is not None else "-"
        print(
            f"{variant:<28}{medians[variant]:>10.3f}{medians[variant] / floor - 1:>+10.1%}"
            f"{min(times[variant]):>9.3f}{min(times[variant]) / floor_min - 1:>+10.1%}{proc_text:>22}{share:>22}"
        )
    print(
        f"processor tables: {processor.num_prefix_nodes:,} prefix nodes, built in {build_seconds:.3f} s; "
        "'processor s/generate' times each logits processor alone on the inputs of one generate call"
    )
    overhead = min(times["vectorised processor"]) / floor_min - 1.0
    share = isolated["vectorised processor"] / floor_min
    print(f"identical beams (prefix fn vs processor): {identical}; every beam a real location: {valid}")
    print(
        f"vectorised processor overhead vs unconstrained: {overhead:+.1%} end to end (best of {args.repeats}; the "
        f"median is {medians['vectorised processor'] / floor - 1:+.1%}), {share:.1%} as timed alone; target <= 20%: "
        f"{'OK' if max(overhead, share) <= 0.20 else 'ABOVE TARGET'}"
    )
    return {"medians": medians, "isolated": isolated, "identical": identical, "valid": valid, "overhead": overhead}


if __name__ == "__main__":
    main()
