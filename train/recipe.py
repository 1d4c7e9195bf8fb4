"""YAML recipes shared by the training scripts (`train/sft.py`, `train/calliper.py`, `train/mhsa.py`).

A recipe is a dataclass whose fields are the keys of a YAML file; command-line overrides (`--key value`) arrive as
strings. :func:`coerce_field` converts a value to the field's annotated type with one clear error, and
:func:`read_recipe` loads a file, applies overrides and refuses unknown keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["add_recipe_arguments", "coerce_field", "coerce_fields", "epoch_training_arguments", "parse_recipe_args",
           "read_recipe"]

_NULLS = ("null", "none", "~", "")
_TRUE = ("true", "yes", "1", "y")
_FALSE = ("false", "no", "0", "n")
R = TypeVar("R")


def coerce_field(f: dataclasses.Field, value: Any) -> Any:
    """Convert a YAML or command-line value to the type annotated on `f` (`str`, `int`, `float`, `bool`, `list[...]`,
    each optionally `| None`): `"2e-4"` -> 0.0002, `"1e3"` -> 1000 for an int, `"true"` -> True, `"null"` -> None.

    Raises:
        ValueError: naming the key, its type and the value, when the value does not convert (or is null for a
            non-optional key).
    """
    kind = str(f.type)
    nullable = "None" in kind
    base = kind.split("|")[0].strip()
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in _NULLS):
        if nullable:
            return None
        raise ValueError(f"recipe key `{f.name}` must be of type {kind}, got None")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base.startswith("list"):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if base == "str":
            if isinstance(value, (bool, list, dict)):
                raise ValueError
            return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"recipe key `{f.name}` must be of type {kind}, got {value!r}") from None
    return value


def coerce_fields(recipe: Any) -> None:
    """Apply :func:`coerce_field` to every field of a recipe dataclass instance, in place (for `__post_init__`)."""
    for f in dataclasses.fields(recipe):
        setattr(recipe, f.name, coerce_field(f, getattr(recipe, f.name)))


def read_recipe(cls: type[R], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> R:
    """Load a YAML recipe (optional), apply `overrides` and build `cls`; unknown keys raise a `ValueError` that lists
    the allowed ones."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe {path} does not exist (or is not a file)")
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping of recipe keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"unknown recipe keys {unknown}{where}; allowed keys: {', '.join(allowed)}")
    return cls(**values)


def add_recipe_arguments(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str] | None = None) -> None:
    """Add `--config RECIPE.yaml` and one `--key value` option per field of the recipe dataclass `cls` (spelled with
    dashes or underscores) to `parser`; options left out do not appear in the parsed namespace (`SUPPRESS`), so the
    recipe file's values stand. `helps` gives the help text of some fields (default: the field's type)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe (e.g. train/recipes/*_demo.yaml)")
    defaults = cls()
    helps = helps or {}
    for f in dataclasses.fields(cls):
        names = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        parser.add_argument(*sorted(names, key=lambda n: "_" in n), dest=f.name, default=argparse.SUPPRESS,
                            metavar=f.name.upper(),
                            help=f"{helps.get(f.name, f.type)} (default: {getattr(defaults, f.name)})")


def parse_recipe_args(parser: argparse.ArgumentParser, cls: type[R], argv: list[str] | None = None,
                      required: dict[str, str] | None = None) -> R:
    """Parse `argv` with a parser of [`add_recipe_arguments`] into a `cls` recipe (the YAML recipe first, then the
    command-line overrides); `required` maps recipe keys that must be set to what the error says they are."""
    values = vars(parser.parse_args(argv))
    config = values.pop("config")
    recipe = read_recipe(cls, config, values)
    for key, what in (required or {}).items():
        if not getattr(recipe, key):
            raise ValueError(f"--{key.replace('_', '-')} ({what}) is required")
    return recipe


def epoch_training_arguments(output_dir: str | os.PathLike, recipe: Any, *, warmup_steps: int,
                             save_total_limit: int = 1, **overrides: Any):
    """`transformers.TrainingArguments` of the epoch-based recipes (MHSA, NextLocMoE, M3ob): evaluate, save and log
    once per epoch, keep the checkpoint with the lowest validation loss and restore it at the end, loss-only
    evaluation on the `labels` column, CPU unless CUDA is there, seeded batch order, a progress bar unless
    `recipe.progress` is false.

    `recipe` needs `max_epochs`, `batch_size`, `eval_batch_size`, `learning_rate`, `weight_decay`,
    `lr_scheduler_type`, `max_grad_norm`, `seed` and `progress`; `overrides` replace or add arguments (e.g.
    `gradient_accumulation_steps`, `bf16`, `dataloader_drop_last`). `constant_with_warmup` without warmup steps
    becomes `constant`.
    """
    import torch
    from transformers import TrainingArguments

    scheduler = recipe.lr_scheduler_type
    if warmup_steps == 0 and scheduler == "constant_with_warmup":
        scheduler = "constant"
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": recipe.max_epochs,
        "per_device_train_batch_size": recipe.batch_size,
        "per_device_eval_batch_size": recipe.eval_batch_size,
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "lr_scheduler_type": scheduler,
        "warmup_steps": warmup_steps,
        "max_grad_norm": recipe.max_grad_norm,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "logging_strategy": "epoch",
        "save_total_limit": save_total_limit,
        "save_only_model": True,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "prediction_loss_only": True,
        "label_names": ["labels"],
        "remove_unused_columns": False,
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "seed": recipe.seed,
        "data_seed": recipe.seed,
        "disable_tqdm": not recipe.progress,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
