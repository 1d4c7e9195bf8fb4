"""QT-Mob instruction tuning: supervised fine-tuning of a causal LM that writes locations as code tokens (DESIGN §5.1.6).

```bash
# the demo: a tiny Llama trained from scratch (all parameters) on the instruction sets, minutes on a laptop CPU
mobility train sft --config train/recipes/qtmob_demo.yaml \\
    --instructions runs/demo/instructions --location_tokenizer runs/demo/loctok --output_dir runs/demo/sft

# the same script as a module, with overrides (`--key value`, any field of `SFTRecipe`)
python -m train.sft --config train/recipes/qtmob_demo.yaml --tasks next --max_steps 200 --learning_rate 3e-3

# the paper's recipe (Llama-3.2-1B-Instruct, LoRA r=128), one or several GPUs
accelerate launch -m train.sft --config train/recipes/qtmob_paper.yaml \\
    --instructions data/instructions --location_tokenizer runs/loctok --output_dir runs/qtmob

# resume from the newest checkpoint of the output folder (or pass a checkpoint folder)
python -m train.sft --config train/recipes/qtmob_demo.yaml --resume_from_checkpoint last
```

Training goes through TRL's `SFTTrainer` (prompt-completion data, completion-only loss), so checkpoints, logging,
progress bars, mixed precision and `accelerate launch` (DDP, FSDP, DeepSpeed) come from `transformers.Trainer`; there
is no distributed code here. Two set-ups:

- `base_model: tiny-llama` builds a tiny `LlamaConfig` in code (hidden 128, 4 layers) and trains every parameter from
  scratch; its tokenizer is a byte-level BPE trained on the instruction corpus, extended with the code tokens.
- any other `base_model` (a local folder, an offline alias such as `smollm2-135m-instruct`, or a Hub id; see
  `train.pretrained.resolve_model`) is fine-tuned with LoRA on q/k/v/o/gate/up/down; its tokenizer is
  extended with the code tokens, the embeddings are untied and resized (`mean_resizing`), the new input rows train
  through `trainable_token_indices` and the whole `lm_head` through `modules_to_save`. The resized base is saved
  before the adapter is attached (`RUN/base_model/`) so the adapter always reloads onto the same weights.

The run folder (`output_dir`) holds `model/` (the merged model, safetensors), `tokenizer/` (the `LocationTokenizer`,
`AutoTokenizer.from_pretrained(RUN/tokenizer, trust_remote_code=True)`), `trainer_state.json` (log history),
`training_curve.png`, `recipe.yaml` (the resolved recipe), `run_info.json` and the `checkpoint-*` folders; LoRA runs
also keep `adapter/` and `base_model/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .evaluate import write_json_atomic, write_text_atomic
from .pretrained import resolve_model
from .recipe import coerce_fields, read_recipe

__all__ = [
    "tiny_llama",
    "TINY_LLAMA",
    "SFTRecipe",
    "build_parser",
    "load_recipe",
    "main",
    "parse_recipe",
    "run_sft",
]

logger = logging.getLogger(__name__)

TINY_LLAMA = "tiny-llama"
TINY_LLAMA_HEADS = 4
QTMOB_TASKS = ("next", "recovery", "alignment", "translation")
HUMOB_TASK = "humob-qa"  # Llama-3-8B-Mob's Q&A rows (`mobility data instructions --task humob-qa`)
TASKS = (*QTMOB_TASKS, HUMOB_TASK)
# ChatML-style template of the tokenizer trained for tiny-llama on chat rows (real bases bring their own template)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIAL_TOKENS = ("<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>")  # pad, bos, eos, unk, extra
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CODE_TOKEN = re.compile(r"<[a-z][a-z0-9]*_\d+>")


@dataclass
class SFTRecipe:
    r"""
    Everything a QT-Mob fine-tuning run needs, loaded from a YAML recipe and overridden on the command line.

    Args:
        instructions (`str`):
            Folder of the instruction dataset (`mobility data instructions`), one config per task with
            `prompt`/`completion` columns and train/validation/test splits.
        tasks (`list[str]`, *optional*, defaults to `["next", "recovery", "alignment"]`):
            Task configs whose train splits are concatenated (and shuffled with `seed`).
        location_tokenizer (`str`, *optional*):
            Folder of the `LocationTokenizer` (or the output folder of `mobility train location-tokenizer`, which holds
            it in `tokenizer/`); gives the location -> code table. Defaults to the tokenizer the instruction dataset
            was written with (`INSTRUCTIONS/location_tokenizer/`, semantic codes or plain IDs).
        base_model (`str`, *optional*, defaults to `"tiny-llama"`):
            `"tiny-llama"` for a tiny Llama built in code and trained from scratch, else a local model folder, an
            offline alias (`smollm2-135m-instruct`, prepared on first use) or a Hub id, resolved in that order.
        base_tokenizer (`str`, *optional*):
            Tokenizer extended with the code tokens. `None`: a byte-level BPE trained on the instruction corpus
            (tiny-llama) or the base model's tokenizer.
        bpe_vocab_size (`int`, *optional*, defaults to 1000):
            Vocabulary of the BPE trained for tiny-llama (before the code tokens are added).
        bpe_split_numbers (`bool`, *optional*, defaults to `False`):
            The BPE trained for tiny-llama cuts numbers apart from spaces and punctuation, as Llama-3's tokenizer does
            (`build_bpe_tokenizer(split_numbers=True)`): a cell number is the same token in the prompt rows (`52 121`)
            and in the JSON answer (`[52,121]`).
        num_key_value_heads (`int`, *optional*):
            tiny-llama only: key/value heads of its attention (grouped-query attention, as Llama-3 has: 8 for 32
            query heads); must divide its 4 heads. `None`: 4 (plain multi-head attention). Fewer heads shrink the
            KV cache, which bounds batched generation on long prompts.
        output_dir (`str`, *optional*, defaults to `"runs/sft"`):
            The run folder (checkpoints and final artefacts).
        full_finetune (`bool`, *optional*):
            Train every parameter instead of LoRA. `None`: true for tiny-llama, false for pretrained models.
        lora_r (`int`, *optional*, defaults to 16), lora_alpha (`int`, *optional*, defaults to 32),
        lora_dropout (`float`, *optional*, defaults to 0.05), lora_target_modules (`list[str]`, *optional*):
            The LoRA adapter (default targets: q/k/v/o/gate/up/down projections).
        model_dtype (`str`, *optional*, defaults to `"float32"`):
            Weights dtype of a pretrained base (`float32`, `bfloat16`, `float16` or `auto`); mixed precision comes from
            `bf16`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to `from_pretrained` of the base model and tokenizer.
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            Loss on the completion tokens only (QT-Mob's instruction tuning). `False` trains on the whole text, which
            for a model trained from scratch is language modelling of the trajectories: every visit line of a prompt
            is then a next-visit example too, about 20x more supervision per row (the demo recipe does this).
        max_train_samples (`int`, *optional*), eval_samples (`int`, *optional*, defaults to 256):
            Cap on the training rows (after shuffling; with `max_steps` > 0 the rows those steps can consume are a cap
            too, so no row is tokenised for nothing) and size of the evaluation slice of the validation split of
            "next" (or of the first task); `eval_samples=0` turns evaluation off.
        learning_rate ... bf16:
            The `SFTConfig`/`TrainingArguments` fields of the same names (`warmup_ratio` becomes a fractional
            `warmup_steps`; `eval_steps=None` evaluates every `logging_steps`).
        group_by_length (`bool`, *optional*, defaults to `False`):
            Batch rows of similar length together (`LengthGroupedSampler`: random groups of 50 batches, sorted by
            length within each), so that a batch is padded to about its rows' own length rather than to the longest
            of random rows; attention costs grow with the square of the padded length. Batches of alike rows learn
            less per step, though: on the Llama-3-8B-Mob demo it was 1.4x faster per step but scored lower at equal
            time; there, micro-batches of one row (`per_device_train_batch_size: 1` with `gradient_accumulation_steps`)
            take the same steps as random batches, unpadded (`benchmarks/bench_humob.py`, section 3).
        max_length (`int`, *optional*, defaults to 1024):
            Longest row in tokens (prompt and answer). Longer rows are dropped, counted in `run_info.json`
            (`rows_over_max_length`) and logged, not truncated: truncation would cut their answers off. `None`: no
            limit.
        resume_from_checkpoint (`str`, *optional*):
            A checkpoint folder, or `"last"`/`"true"` for the newest checkpoint in `output_dir`.
        progress (`bool`, *optional*, defaults to `True`):
            Show the Trainer's progress bar; `false` (`mobility -q train sft`) shows neither the bar nor the loss
            lines Trainer would print in its place (the log history is still in `trainer_state.json`).
    """

    instructions: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["next", "recovery", "alignment"])
    location_tokenizer: str | None = None
    base_model: str = TINY_LLAMA
    base_tokenizer: str | None = None
    bpe_vocab_size: int = 1000
    bpe_split_numbers: bool = False
    num_key_value_heads: int | None = None
    output_dir: str = "runs/sft"
    full_finetune: bool | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    model_dtype: str = "float32"
    trust_remote_code: bool = False
    completion_only_loss: bool = True
    max_train_samples: int | None = None
    eval_samples: int = 256
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_length: int | None = 1024
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 0
    bf16: bool = False
    resume_from_checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self):
        coerce_fields(self)
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = [t.strip() for task in self.tasks for t in str(task).split(",") if t.strip()]
        if not self.tasks:
            raise ValueError(f"`tasks` must name at least one of {list(TASKS)}, got an empty list")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"`tasks` holds unknown tasks {bad}; allowed: {list(TASKS)}")
        if HUMOB_TASK in self.tasks and len(self.tasks) > 1:
            raise ValueError(f"`tasks` {self.tasks}: {HUMOB_TASK!r} (grid Q&A, no location codes) cannot be mixed "
                             "with the QT-Mob tasks")
        if self.model_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(
                f"`model_dtype` must be one of float32, bfloat16, float16, auto; got {self.model_dtype!r}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if self.num_key_value_heads is not None:
            if not self.is_tiny:
                raise ValueError("`num_key_value_heads` sets the attention of tiny-llama; a pretrained base keeps its "
                                 f"own (base_model={self.base_model!r})")
            if self.num_key_value_heads < 1 or TINY_LLAMA_HEADS % self.num_key_value_heads:
                raise ValueError(f"`num_key_value_heads` must divide tiny-llama's {TINY_LLAMA_HEADS} attention heads, "
                                 f"got {self.num_key_value_heads}")
        for name in ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "bpe_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")

    @property
    def is_tiny(self) -> bool:
        return self.base_model == TINY_LLAMA

    @property
    def is_humob(self) -> bool:
        """Llama-3-8B-Mob Q&A rows: a plain (chat) tokenizer, no location code tokens."""
        return self.tasks == [HUMOB_TASK]

    @property
    def use_peft(self) -> bool:
        """LoRA unless `full_finetune` says otherwise (default: full for tiny-llama, LoRA for pretrained models)."""
        full = self.is_tiny if self.full_finetune is None else self.full_finetune
        return not full

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | os.PathLike | None = None, **overrides) -> SFTRecipe:
    """Load a YAML recipe (optional) and apply keyword overrides; unknown keys raise a `ValueError`."""
    return read_recipe(SFTRecipe, path, overrides)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: `--config RECIPE.yaml` plus `--key value` for every field of [`SFTRecipe`].

    Values are kept as strings and converted with the field types when the recipe is built, so YAML values and
    command-line overrides go through the same checks.
    """
    parser = argparse.ArgumentParser(
        prog=prog or "mobility train sft",
        description="QT-Mob instruction tuning with TRL's SFTTrainer: a tiny Llama from scratch or LoRA on a "
        "pretrained causal LM, with location code tokens. Any recipe key can be overridden with --key value.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe (e.g. train/recipes/qtmob_demo.yaml)")
    for f in dataclasses.fields(SFTRecipe):
        is_list = str(f.type).startswith("list")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parser.add_argument(
            f"--{f.name}", dest=f.name, nargs="+" if is_list else None, default=argparse.SUPPRESS,
            metavar=f.name.upper(), help=f"{f.type} (default: {default})",
        )
    return parser


def parse_recipe(argv: list[str] | None = None) -> SFTRecipe:
    """Parse `--config` and `--key value` overrides into an [`SFTRecipe`]; unknown options raise a `ValueError`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        allowed = ", ".join(f"--{f.name}" for f in dataclasses.fields(SFTRecipe))
        raise ValueError(f"unknown recipe options {unknown}; allowed: --config, {allowed}")
    values = vars(args)
    config = values.pop("config")
    return load_recipe(config, **values)


# ----------------------------------------------------------------------------------------------------------------------
# data, tokenizer and model


def _load_instructions(recipe: SFTRecipe, num_processes: int = 1):
    from datasets import concatenate_datasets

    from dataset_builders.publish import load_dataset_folder

    if not recipe.instructions:
        raise ValueError("`instructions` (the instruction dataset folder) must be set, got None")
    parts, counts = [], {}
    for task in recipe.tasks:
        try:
            ds = load_dataset_folder(recipe.instructions, task)
        except ValueError as err:
            raise ValueError(f"`instructions` {recipe.instructions} has no task config {task!r}: {err}") from None
        if "train" not in ds:
            raise ValueError(f"task {task!r} of {recipe.instructions} has no train split (splits: {list(ds)})")
        missing = {"prompt", "completion"} - set(ds["train"].column_names)
        if missing:
            raise ValueError(
                f"task {task!r} of {recipe.instructions} lacks the columns {sorted(missing)} (prompt-completion data)"
            )
        parts.append(ds["train"].select_columns(["prompt", "completion"]))
        counts[task] = ds["train"].num_rows
    train = concatenate_datasets(parts).shuffle(seed=recipe.seed)
    cap = recipe.max_train_samples
    if recipe.max_steps > 0:  # rows beyond what max_steps can consume would only be tokenised for nothing
        needed = (recipe.max_steps * recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
                  * num_processes)
        cap = needed if cap is None else min(cap, needed)
    if cap is not None and cap < train.num_rows:
        logger.info("using the first %d of %d shuffled training rows (max_train_samples/max_steps)", cap,
                    train.num_rows)
        train = train.select(range(cap))

    eval_ds = None
    if recipe.eval_samples > 0:
        eval_task = "next" if "next" in recipe.tasks else recipe.tasks[0]
        ds = load_dataset_folder(recipe.instructions, eval_task)
        if "validation" in ds:
            val = ds["validation"].select_columns(["prompt", "completion"]).shuffle(seed=recipe.seed)
            eval_ds = val.select(range(min(recipe.eval_samples, val.num_rows)))
        else:
            logger.warning("task %r has no validation split; training without evaluation", eval_task)
    return train, eval_ds, counts


def _location_tokenizer_dir(path: str | None, instructions: str | None = None) -> Path:
    from dataset_builders.instructions.qtmob import TOKENIZER_DIR
    from tokenization_mobility.tokenization_location import LOCATION_CODES_FILE

    if not path:
        if instructions and (Path(instructions) / TOKENIZER_DIR / LOCATION_CODES_FILE).is_file():
            return Path(instructions) / TOKENIZER_DIR
        raise ValueError(
            "`location_tokenizer` is not set and the instruction dataset holds no location_tokenizer/ folder; pass "
            "the folder of the LocationTokenizer the instructions were written with"
        )
    folder = Path(path)
    for candidate in (folder, folder / "tokenizer"):
        if (candidate / LOCATION_CODES_FILE).is_file():
            return candidate
    raise ValueError(
        f"`location_tokenizer` {path} holds no {LOCATION_CODES_FILE} (expected a LocationTokenizer folder or the "
        "output folder of `mobility train location-tokenizer`)"
    )


def _message_texts(value) -> list[str]:
    """The texts of a prompt or completion cell: a string, or the contents of a list of chat messages."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return [json.dumps(value)]


def _build_chat_tokenizer(recipe: SFTRecipe, train_dataset):
    """The run's tokenizer for chat rows without location codes (Llama-3-8B-Mob): the base model's (or
    `base_tokenizer`), or for tiny-llama a byte-level BPE trained on the message texts with a ChatML template."""
    from transformers import AutoTokenizer

    from tokenization_mobility import build_bpe_tokenizer

    if recipe.base_tokenizer or not recipe.is_tiny:
        name = recipe.base_tokenizer or recipe.base_model
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=recipe.trust_remote_code)
        if tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {name} has no chat template; the {HUMOB_TASK} rows are chat messages "
                             "(use an instruct model or set `base_tokenizer` to one with a template)")
    else:
        def corpus():
            for batch in train_dataset.iter(batch_size=1000):
                for cell in batch["prompt"] + batch["completion"]:
                    yield from _message_texts(cell)

        tokenizer = build_bpe_tokenizer(corpus(), vocab_size=recipe.bpe_vocab_size,
                                        special_tokens=CHAT_SPECIAL_TOKENS, split_numbers=recipe.bpe_split_numbers)
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _build_tokenizer(recipe: SFTRecipe, train_dataset):
    """The run's `LocationTokenizer`: the base tokenizer (trained BPE or the model's) plus the code tokens."""
    from transformers import AutoTokenizer

    if recipe.is_humob:
        return _build_chat_tokenizer(recipe, train_dataset)

    from tokenization_mobility import LocationTokenizer, build_bpe_tokenizer

    codes_dir = _location_tokenizer_dir(recipe.location_tokenizer, recipe.instructions)
    codes = LocationTokenizer.from_pretrained(str(codes_dir))
    from dataset_builders.instructions.qtmob import TOKENIZER_DIR

    written_dir = Path(recipe.instructions) / TOKENIZER_DIR
    if written_dir.is_dir() and written_dir.resolve() != codes_dir.resolve():
        written = LocationTokenizer.from_pretrained(str(written_dir))
        if written.level_prefixes != codes.level_prefixes or dict(written.location_codes) != dict(codes.location_codes):
            raise ValueError(
                f"`location_tokenizer` {codes_dir} does not hold the location codes the instructions were written with "
                f"({written_dir}, tokens like {written.location_to_text(written.location_ids[0])}); leave "
                "`location_tokenizer` unset to use those"
            )
    if recipe.base_tokenizer:
        base = AutoTokenizer.from_pretrained(resolve_model(recipe.base_tokenizer),
                                             trust_remote_code=recipe.trust_remote_code)
    elif recipe.is_tiny:
        # code tokens are added tokens (matched before BPE), so they are kept out of the BPE training corpus
        def corpus():
            for batch in train_dataset.iter(batch_size=1000):
                for text in batch["prompt"] + batch["completion"]:
                    yield _CODE_TOKEN.sub(" ", text) if isinstance(text, str) else json.dumps(text)

        base = build_bpe_tokenizer(corpus(), vocab_size=recipe.bpe_vocab_size, split_numbers=recipe.bpe_split_numbers)
    else:
        base = AutoTokenizer.from_pretrained(resolve_model(recipe.base_model),
                                             trust_remote_code=recipe.trust_remote_code)
    tokenizer = LocationTokenizer.from_base(base, dict(codes.location_codes), codebook_size=codes.codebook_size,
                                            level_prefixes=codes.level_prefixes)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(tokenizer, max_length: int | None = None, **config_overrides):
    """The demo's tiny `LlamaForCausalLM` (hidden 128, 4 layers, 4 heads, untied head) sized to `tokenizer`, built
    in code; `config_overrides` change any `LlamaConfig` field (tests use smaller ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=TINY_LLAMA_HEADS,
        num_key_value_heads=TINY_LLAMA_HEADS,
        max_position_embeddings=max(1024, max_length or 0),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(config_overrides)
    return LlamaForCausalLM(LlamaConfig(**fields))


def _untie_embeddings(model) -> bool:
    """Give `lm_head` its own copy of the input embeddings (tied heads break PEFT token training with TRL's fused
    head, and a merged model saved with `tie_word_embeddings=True` would lose the trained head)."""
    import torch

    text_config = model.config.get_text_config()
    if not getattr(text_config, "tie_word_embeddings", False):
        return False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    text_config.tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    return True


def _pretrained_base(recipe: SFTRecipe, tokenizer):
    """Load a pretrained causal LM, untie its embeddings and resize them to the tokenizer (mean resizing)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if recipe.model_dtype == "auto" else getattr(torch, recipe.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(recipe.base_model), dtype=dtype, trust_remote_code=recipe.trust_remote_code
    )
    if _untie_embeddings(model):
        logger.info("untied the input and output embeddings of %s", recipe.base_model)
    old_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_vocab:  # never shrink: some models pad their embedding matrix beyond the tokenizer
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None and getattr(model.config, name, None) is None:
            setattr(model.config, name, value)
    return model


def _lora_config(recipe: SFTRecipe, tokenizer, base_vocab: int):
    from peft import LoraConfig

    if recipe.is_humob:  # no new tokens: the adapter alone
        return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                          target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM")

    new_ids = sorted({i for ids in tokenizer.code_token_ids for i in ids} | set(range(base_vocab, len(tokenizer))))
    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.lora_target_modules),
        task_type="CAUSAL_LM",
        # the new code-token rows of the input embeddings train; the output layer trains as a full copy (TRL's fused
        # head reads `lm_head.weight` directly, so `trainable_token_indices` on lm_head does not work)
        trainable_token_indices={"embed_tokens": new_ids},
        modules_to_save=["lm_head"],
    )


def _resolve_checkpoint(recipe: SFTRecipe) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    value = recipe.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() in ("true", "last", "latest", "yes"):
        last = get_last_checkpoint(recipe.output_dir) if os.path.isdir(recipe.output_dir) else None
        if last is None:
            raise ValueError(
                f"`resume_from_checkpoint`={value!r} but {recipe.output_dir} holds no checkpoint-* folder"
            )
        return last
    if not os.path.isdir(value):
        raise ValueError(f"`resume_from_checkpoint` {value!r} is not a checkpoint folder")
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
# run folder


def _plot_training_curve(log_history: list[dict], path: Path, completion_only: bool = True, title: str = "") -> None:
    from .plots import pyplot, save_figure

    plt = pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss (validation slice)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)" if completion_only else "loss (all tokens)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"SFT{': ' + title if title else ''}")
    if train or evals:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a hard link costs nothing and cannot drift: the files are written once, never modified
    except OSError:
        shutil.copy2(src, dst)


def _copy_folder(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src`` (hard links where possible), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _find_rqvae(recipe: SFTRecipe, loctok_dir: Path) -> Path | None:
    """The RQ-VAE that produced the semantic codes: beside the location tokenizer (`mobility train location-tokenizer`
    writes OUT/tokenizer and OUT/rqvae) or beside the tokenizer the instruction dataset names."""
    from dataset_builders.publish import METADATA_FILE

    candidates = [loctok_dir, loctok_dir.parent]
    meta_file = Path(recipe.instructions) / METADATA_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("location_format") == "id":
            return None
        if meta.get("tokenizer"):
            candidates += [Path(meta["tokenizer"]), Path(meta["tokenizer"]).parent]
    for folder in candidates:
        if (folder / "rqvae" / "config.json").is_file():
            return folder / "rqvae"
    return None


def _collect_artifacts(recipe: SFTRecipe, out: Path, info: dict) -> None:
    """Make the run folder self-contained: its instruction dataset, the RQ-VAE and a model card."""
    from .push import build_model_card

    _copy_folder(Path(recipe.instructions), out / "instructions")
    recipe_text = (out / "recipe.yaml").read_text(encoding="utf-8")
    if recipe.is_humob:
        from .llamamob import build_model_card as build_llamamob_card

        write_text_atomic(build_llamamob_card(info, recipe=recipe_text, run_dir=out), out / "README.md")
        return
    rqvae = None if info.get("location_format") == "id" else _find_rqvae(recipe, Path(info["location_tokenizer"]))
    if rqvae is not None:
        _copy_folder(rqvae, out / "rqvae")
    elif info.get("location_format") != "id":
        logger.warning("no RQ-VAE found beside the location tokenizer %s; the run folder will lack rqvae/",
                       info["location_tokenizer"])
    write_text_atomic(build_model_card(info, recipe=recipe_text, has_rqvae=rqvae is not None, run_dir=out),
                      out / "README.md")


def _save_merged_model(recipe: SFTRecipe, trainer, out: Path) -> None:
    """Write `out/model` (safetensors): the trained model, or base + adapter merged for LoRA runs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = out / "model"
    if not recipe.use_peft:
        trainer.save_model(str(model_dir))  # gathers FSDP/DeepSpeed shards; writes on the main process only
        if trainer.is_world_process_zero():
            for stale in model_dir.glob("training_args.bin"):
                stale.unlink()
        return
    trainer.save_model(str(out / "adapter"))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    base = AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    merged.config.tie_word_embeddings = False
    merged.config.get_text_config().tie_word_embeddings = False
    if model_dir.exists():
        shutil.rmtree(model_dir)
    merged.save_pretrained(model_dir, safe_serialization=True)
    for stale in (out / "adapter").glob("training_args.bin"):
        stale.unlink()


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _checkpointing_kwargs(config_class, enabled: bool) -> dict[str, bool]:
    """Newer transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _drop_rows_over_max_length(dataset, max_length: int, what: str, humob: bool):
    """`(dataset, dropped)`: the tokenised rows of at most `max_length` tokens, and how many were longer.

    Truncation keeps a row's start, so a row over the limit would lose its answer (the location code, the JSON of
    the predicted days) and train on a prompt alone; such rows are dropped, counted and logged instead.
    """
    before = len(dataset)
    kept = dataset.filter(lambda ids: [len(x) <= max_length for x in ids], input_columns="input_ids", batched=True,
                          desc=f"Dropping {what} rows over max_length")
    dropped = before - len(kept)
    shorter = ("fewer days in the rows (`mobility data instructions --input-days`, `--predict-days`), or "
               "`--max-input-tokens N --tokenizer TOKENIZER` (drops the oldest input days)" if humob else
               "shorter histories (`mobility data instructions --max-history`)")
    if dropped == before:
        raise ValueError(f"all {before:,} {what} rows are longer than max_length={max_length} tokens: raise "
                         f"`max_length`, or build the instructions with {shorter}")
    if dropped:
        logger.warning("dropped %d of %d %s rows longer than max_length=%d tokens (truncation would cut their "
                       "answers off); raise `max_length`, or build the instructions with %s",
                       dropped, before, what, max_length, shorter)
    return kept, dropped


def run_sft(recipe: SFTRecipe) -> Path:
    """Fine-tune a causal LM on the instruction sets of `recipe` and write the run folder (see the module docstring).

    Args:
        recipe ([`SFTRecipe`]): the resolved recipe.

    Returns:
        `Path`: the run folder (`recipe.output_dir`).
    """
    from accelerate import PartialState
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from tokenization_mobility import LocationTokenizer
    from tokenization_mobility.tokenization_location import ID_PREFIX

    state = PartialState()
    out = Path(recipe.output_dir)
    checkpoint = _resolve_checkpoint(recipe)
    set_seed(recipe.seed)
    train_ds, eval_ds, counts = _load_instructions(recipe, state.num_processes)
    logger.info("training rows per task: %s (total %d)", counts, train_ds.num_rows)

    # The main process builds the tokenizer (and the resized base) and saves them; the other processes load the saved
    # files, so every process and every resumed run uses identical vocabularies and initial weights.
    tok_dir, base_dir = out / "tokenizer", out / "base_model"
    with state.main_process_first():
        if state.is_main_process and not (checkpoint and tok_dir.is_dir()):
            tokenizer = _build_tokenizer(recipe, train_ds)
            tokenizer.save_pretrained(tok_dir)
        if recipe.is_humob:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        else:
            tokenizer = LocationTokenizer.from_pretrained(str(tok_dir))

    peft_config = None
    if recipe.is_tiny:
        if recipe.use_peft:
            raise ValueError("`full_finetune`=False with base_model='tiny-llama': a model trained from scratch needs "
                             "all parameters (set full_finetune to true or null)")
        overrides = {} if recipe.num_key_value_heads is None else {"num_key_value_heads": recipe.num_key_value_heads}
        model = tiny_llama(tokenizer, recipe.max_length, **overrides)
    else:
        with state.main_process_first():
            if state.is_main_process and not (checkpoint and base_dir.is_dir()) and recipe.use_peft:
                model = _pretrained_base(recipe, tokenizer)
                model.save_pretrained(base_dir, safe_serialization=True)
            if recipe.use_peft:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
            else:
                model = _pretrained_base(recipe, tokenizer)
        if recipe.use_peft:
            base_vocab = len(tokenizer) - sum(len(ids) for ids in getattr(tokenizer, "code_token_ids", ()))
            peft_config = _lora_config(recipe, tokenizer, base_vocab)

    do_eval = eval_ds is not None and eval_ds.num_rows > 0
    args = SFTConfig(
        output_dir=str(out),
        max_length=None,  # rows over recipe.max_length are dropped and counted below, not cut (TRL keeps the start)
        completion_only_loss=recipe.completion_only_loss,
        packing=False,
        loss_type="nll",
        report_to="none",
        learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.per_device_eval_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        **_checkpointing_kwargs(SFTConfig, recipe.gradient_checkpointing),
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # a value < 1 is a fraction of the training steps
        weight_decay=recipe.weight_decay,
        logging_steps=recipe.logging_steps,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=(recipe.eval_steps or recipe.logging_steps) if do_eval else None,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        bf16=recipe.bf16,  # on a CPU: bfloat16 autocast (fast on CPUs with AVX512-BF16 / AMX)
        fp16=False,
        use_cpu=not _has_accelerator(),  # without it, transformers refuses bf16 on a machine without a GPU
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_accelerator(),  # pinning without a GPU only warns
        disable_tqdm=not recipe.progress,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if do_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if not recipe.progress:
        trainer.remove_callback(PrinterCallback)  # without the bar, Trainer would print every log dict instead
    over_max_length = {}
    if recipe.max_length is not None:
        trainer.train_dataset, over_max_length["train"] = _drop_rows_over_max_length(
            trainer.train_dataset, recipe.max_length, "training", recipe.is_humob)
        if do_eval:
            trainer.eval_dataset, over_max_length["eval"] = _drop_rows_over_max_length(
                trainer.eval_dataset, recipe.max_length, "evaluation", recipe.is_humob)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()  # trainer_state.json (log history) in the run folder, main process only
    _save_merged_model(recipe, trainer, out)

    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        _plot_training_curve(trainer.state.log_history, out / "training_curve.png", recipe.completion_only_loss,
                             title=out.resolve().name)
        num_tokens = max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)
        info = {
            "method": "llamamob-sft" if recipe.is_humob else "qtmob-sft",
            "name": out.resolve().name,  # the model's name in metric tables and cards
            "tasks": list(recipe.tasks),
            "instructions": str(Path(recipe.instructions).resolve()),
        }
        if not recipe.is_humob:
            loctok_dir = _location_tokenizer_dir(recipe.location_tokenizer, recipe.instructions)
            info["location_tokenizer"] = str(loctok_dir.resolve())
            info["location_format"] = "id" if tokenizer.level_prefixes == [ID_PREFIX] else "semantic"
        info.update({
            "base_model": recipe.base_model,
            "peft": "lora" if recipe.use_peft else None,
            "train_rows_per_task": counts,
            "train_rows": len(trainer.train_dataset),
            "eval_rows": len(trainer.eval_dataset) if do_eval else 0,
            "rows_over_max_length": over_max_length,
            "vocab_size": len(tokenizer),
            "trainable_parameters": trainable,
            "parameters": total,
            "global_step": trainer.state.global_step,
            "resumed_from": checkpoint,
            "train_metrics": {**result.metrics, "num_tokens": num_tokens},
            "metrics": {},  # filled by `mobility evaluate`
        })
        write_json_atomic(info, out / "run_info.json")
        _collect_artifacts(recipe, out, info)
        logger.info("wrote run folder %s", out)
    state.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv` (`--config RECIPE.yaml --key value ...`), train, and print where the run folder is."""
    recipe = parse_recipe(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = run_sft(recipe)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"wrote {out}: model/, tokenizer/, trainer_state.json, training_curve.png, recipe.yaml, run_info.json")
        print(f"load with: AutoModelForCausalLM.from_pretrained('{out / 'model'}') and "
              f"AutoTokenizer.from_pretrained('{out / 'tokenizer'}', trust_remote_code=True)")
    return out


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"sft: error: {err}", file=sys.stderr)
        sys.exit(2)
