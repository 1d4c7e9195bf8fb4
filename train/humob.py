"""Llama-3-8B-Mob prediction on grid cities (DESIGN §5.2): generate Q&A answers, parse them tolerantly, answer every
asked (day, slot) exactly once, and score the result with GEO-BLEU and DTW beside the slot-mode baseline.

```python
from train.humob import evaluate_grid_predictions, predict_grid

frame, report = predict_grid(model, tokenizer, "runs/demo/data/grid_qa", split="test",
                             instructions_dir="runs/demo/humob_qa", out_csv="predictions.csv")
metrics = evaluate_grid_predictions(frame, "runs/demo/data/grid_qa", split="test", name="llamamob")
```

The pieces, usable one by one:

- [`generate_answers`]: batched greedy generation for chat prompts (left padding, prompts sorted by length, answers
  returned in input order); [`answer_token_budget`] sizes `max_new_tokens` from the number of asked rows.
- [`parse_prediction`]: reads `{"prediction": [[d, t, x, y], ...]}` from a model answer: strict JSON first, then
  textual repairs (code fences, prose, trailing commas, single quotes, a truncated list), then a scan for
  `[int, int, int, int]` groups. The info dict says which path succeeded and how many quadruples were unusable.
- [`fill_predictions`]: one row per asked (d, t), in the asked order: the first usable predicted cell of the slot,
  else the fallback cell (the per-user slot-mode baseline), with every repair counted.
- [`parse_asked_slots`]: the asked (d, t) of a prompt, from its `d t 999 999` lines.
- [`predict_grid`] and [`evaluate_grid_predictions`]: the whole split, with a report of counts and timings, and the
  metrics report in the format of [`train.evaluate.evaluate_baselines`] (so `format_results_table` prints it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dataset_builders.publish import PreparedDataset, load_dataset_folder, load_prepared
from dataset_builders.schema import HIDDEN_CELL

from .baselines import slot_mode_predictions
from .evaluate import evaluate_baselines, grid_metrics, grid_targets, write_text_atomic

__all__ = [
    "CELL_CHOICES",
    "HUMOB_CONFIG",
    "PARSE_METHODS",
    "answer_style_of",
    "answer_token_budget",
    "evaluate_grid_predictions",
    "fill_predictions",
    "generate_answers",
    "history_cells",
    "parse_asked_slots",
    "parse_prediction",
    "predict_grid",
]

logger = logging.getLogger(__name__)

HUMOB_CONFIG = "humob-qa"  # config name of the Q&A rows in an instruction dataset folder
PARSE_METHODS = ("json", "repaired", "regex", "none")
CELL_CHOICES = ("grid", "history")  # which cells a constrained answer may hold (see predict_grid)
NUM_SLOTS = 48
_MAX_VALUE = 2**31 - 1  # parsed integers above this are unusable (and would not fit the int64 arithmetic safely)
_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\r?\n?(.*?)(?:```|$)", re.DOTALL)
_QUOTED_NUM = r"""\s*["']?\s*([+-]?\d+)\s*["']?\s*"""
_QUAD = re.compile(r"\[" + ",".join([_QUOTED_NUM] * 4) + r"\]")
_SINGLE_QUOTED = re.compile(r"'([^'\"\\\n]*)'")
_TRAILING_COMMA = re.compile(r",(\s*[\]}])")
_PREDICTION_KEY = re.compile(r"""["']?predictions?["']?\s*:""", re.IGNORECASE)
_ASKED_LINE = re.compile(
    rf"^[ \t]*[\[(]?[ \t]*(\d+)[ \t]*[, \t][ \t]*(\d+)[ \t]*[, \t][ \t]*{HIDDEN_CELL}[ \t]*[, \t][ \t]*{HIDDEN_CELL}"
    r"[ \t]*[\])]?[ \t,]*$",
    re.MULTILINE,
)


# ----------------------------------------------------------------------------------------------------------------------
# Parsing model answers
# ----------------------------------------------------------------------------------------------------------------------


def _find_prediction(obj: Any, depth: int = 0) -> list | None:
    """The list under the first key named `prediction(s)` (any case) in a decoded JSON value, depth first; a bare list
    of lists counts as the prediction itself."""
    if depth > 8:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key.strip().lower() in ("prediction", "predictions") and isinstance(value, list):
                return value
        for value in obj.values():
            found = _find_prediction(value, depth + 1)
            if found is not None:
                return found
        return None
    if depth == 0 and isinstance(obj, list) and obj and all(isinstance(v, list) for v in obj):
        return obj
    return None


def _decode(text: str) -> list | None:
    """The prediction in `text` decoded as one JSON value, else in the first embedded object that has one."""
    try:
        return _find_prediction(json.loads(text))
    except ValueError:
        return _decode_embedded(text)


def _decode_embedded(text: str) -> list | None:
    """The prediction of the first JSON object embedded in `text` (prose or other objects around it) that has one."""
    decoder = json.JSONDecoder()
    end = 0
    for start in (m.start() for m in re.finditer(r"\{", text)):
        if start < end:  # inside a value already decoded (nested dicts were searched with it)
            continue
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        found = _find_prediction(obj)
        if found is not None:
            return found
    return None


def _close_truncated(text: str) -> tuple[str, bool] | None:
    """Cut a JSON value that was cut off mid-way back to its last complete element and close the open brackets.

    Returns `(text, cut)` (`cut` is true when something was removed) or `None` when no complete element exists or the
    brackets do not match. Scanning stops where the first top-level value closes.
    """
    stack: list[str] = []
    in_string = escaped = False
    last_cut: tuple[int, list[str]] | None = None
    start = None
    pairs = {"}": "{", "]": "["}
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            if stack:
                in_string = True
            continue
        if ch in "{[":
            if start is None:
                start = i
            stack.append(ch)
        elif ch in "}]":
            if not stack or stack[-1] != pairs[ch]:
                return None
            stack.pop()
            if not stack:
                return text[start : i + 1], False
            last_cut = (i + 1, list(stack))
    if start is None or last_cut is None:
        return None
    end, open_brackets = last_cut
    closers = "".join("}" if b == "{" else "]" for b in reversed(open_brackets))
    return text[start:end] + closers, True


def _repair_candidates(text: str) -> list[tuple[str, list[str]]]:
    """Repaired versions of `text` (most conservative first) with the names of the repairs applied."""
    out = []
    current, applied = text, []
    for name, pattern, repl in (("single_quotes", _SINGLE_QUOTED, r'"\1"'), ("trailing_commas", _TRAILING_COMMA, r"\1")):
        fixed = pattern.sub(repl, current)
        if fixed != current:
            current, applied = fixed, [*applied, name]
            out.append((current, list(applied)))
    closed = _close_truncated(current)
    if closed is not None and closed[1]:
        fixed = _TRAILING_COMMA.sub(r"\1", closed[0])
        out.append((fixed, [*applied, "truncated"]))
    return out


def _repair_start(text: str) -> int | None:
    """Where repairs begin: the object holding the first `prediction` key, else the first object or list, so prose and
    other objects before it do not get in the way."""
    key = _PREDICTION_KEY.search(text)
    if key is not None:
        brace = text.rfind("{", 0, key.start())
        if brace >= 0:
            return brace
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return min(starts) if starts else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    return None


def _quadruples(items: Sequence[Any], num_slots: int) -> tuple[np.ndarray, int]:
    """Valid `[d, t, x, y]` rows of `items` as an int64 `[n, 4]` array, and the number of unusable items."""
    rows, invalid = [], 0
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            invalid += 1
            continue
        values = [_as_int(v) for v in item]
        if any(v is None or v < 0 or v > _MAX_VALUE for v in values) or values[1] >= num_slots:
            invalid += 1
            continue
        rows.append(values)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4), invalid


def parse_prediction(text: str, *, num_slots: int = NUM_SLOTS) -> tuple[np.ndarray, dict[str, Any]]:
    """Read the predicted `[d, t, x, y]` rows from a model answer, tolerantly.

    The answer is expected as JSON `{"prediction": [[d, t, x, y], ...]}` (other fields such as `"reason"` are ignored).
    Three paths are tried in order, and the first that finds a prediction list wins:

    1. `"json"`: a JSON value decoded from the text as it is: the whole answer, the content of a code fence
       (```` ```json ````), or the first object embedded in prose or among several JSON objects that holds a
       `"prediction"` key (a bare list of lists as the whole answer or fence content also counts).
    2. `"repaired"`: the same after textual repairs: single-quoted strings to double-quoted, trailing commas removed,
       and an answer cut off mid-list (generation hit `max_new_tokens`) cut back to its last complete element with the
       open brackets closed, so every complete quadruple before the cut is kept.
    3. `"regex"`: every `[int, int, int, int]` group in the text (numbers may be quoted).

    Numbers written as strings (`"12"`) and integral floats are accepted. A quadruple is unusable (counted `invalid`,
    skipped) when it does not have four entries, an entry is not an integer, a value is negative or above 2**31 - 1,
    or the slot is not below `num_slots`. Cells outside the grid are *not* checked here ([`fill_predictions`] does).

    Args:
        text (`str`):
            The decoded model answer.
        num_slots (`int`, *optional*, defaults to 48):
            Time slots per day; a quadruple with `t >= num_slots` is unusable.

    Returns:
        `(np.ndarray, dict)`: the usable rows as an int64 array of shape `(n, 4)` (columns d, t, x, y, in answer
        order, duplicates kept), and an info dict with `method` (`"json"`, `"repaired"`, `"regex"` or `"none"`),
        `rows` (usable rows), `invalid` (unusable quadruples), `unparsable` (`True` when no prediction list was found
        at all: method `"none"`) and `repairs` (names of the repairs applied on the `"repaired"` path).

    Raises:
        `ValueError`: if `text` is not a string or `num_slots` is not a positive integer.

    Example:

    ```python
    >>> rows, info = parse_prediction('Sure! ```json\\n{"prediction": [[60, 1, 3, 4], [60, 2, "5", 6],]}\\n```')
    >>> rows.tolist(), info["method"]
    ([[60, 1, 3, 4], [60, 2, 5, 6]], 'repaired')
    ```
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be the decoded answer string, got {type(text).__name__}")
    if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive integer, got {num_slots!r}")

    def result(items: Sequence[Any] | None, method: str, repairs: list[str] | None = None):
        rows, invalid = _quadruples(items or [], int(num_slots))
        info = {"method": method, "rows": int(len(rows)), "invalid": int(invalid), "unparsable": method == "none",
                "repairs": repairs or []}
        return rows, info

    stripped = text.strip()
    try:
        found = _find_prediction(json.loads(stripped))
    except ValueError:
        found = None
    if found is not None:
        return result(found, "json")

    segments = [m.group(1) for m in _FENCE.finditer(stripped) if m.group(1).strip()] + [stripped]
    for segment in segments:
        found = _decode(segment)
        if found is not None:
            return result(found, "json")

    for segment in segments:
        start = _repair_start(segment)
        if start is None:
            continue
        for repaired, names in _repair_candidates(segment[start:]):
            found = _decode(repaired)
            if found is not None:
                return result(found, "repaired", names)

    quads = [[int(g) for g in m.groups()] for m in _QUAD.finditer(text)]
    if quads:
        return result(quads, "regex")
    return result(None, "none")


def _user_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """A prompt string as it is, or the text of the last `user` message of chat messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError("the prompt holds no user message with text content; expected chat messages with a "
                             "'user' message listing the records 'd t x y' and the asked slots 'd t 999 999'")
        return users[-1]
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def history_cells(prompt: str | Sequence[Mapping[str, Any]], cell_range: tuple[int, int]) -> np.ndarray:
    """The distinct cells `(x, y)` of the records `d t x y` of a Q&A prompt (its last user message) that lie in
    `cell_range`, sorted: what `cells="history"` lets a constrained answer hold. `(0, 2)` when it has none."""
    from dataset_builders.instructions.humob_qa import parse_records

    records, _ = parse_records(_user_text(prompt))
    lo, hi = (int(v) for v in cell_range)
    xy = records[:, 2:4]
    xy = xy[((xy >= lo) & (xy <= hi)).all(axis=1)]
    return np.unique(xy, axis=0).reshape(-1, 2)


def parse_asked_slots(prompt: str | Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The asked (d, t) of a Q&A prompt: its lines `d t 999 999`, in prompt order.

    Args:
        prompt (`str` or list of chat messages):
            The prompt text, or messages (`{"role", "content"}` dicts): then only the last `user` message is read, so
            examples in the system message do not count.

    Returns:
        `np.ndarray` of shape `(m, 2)`, int64: the asked (d, t) (also accepts `d,t,999,999` and bracketed rows).

    Raises:
        `ValueError`: if `prompt` is neither a string nor a list of messages, or holds no user message.
    """
    text = _user_text(prompt)
    pairs = [(int(m.group(1)), int(m.group(2))) for m in _ASKED_LINE.finditer(text)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Filling the asked slots
# ----------------------------------------------------------------------------------------------------------------------


def _int_array(value: Any, name: str, cols: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros((0, cols), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise ValueError(f"{name} must be an array of shape (n, {cols}), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def fill_predictions(
    asked_dt: Any, predicted: Any, fallback_xy: Any, grid_size: int = 200, coordinate_base: int = 1
) -> tuple[np.ndarray, dict[str, int]]:
    """Answer every asked (d, t) exactly once, in the asked order, from predicted rows and a fallback.

    Each predicted row is classified once, in this order: `not_asked` (its (d, t) is not asked: dropped),
    `out_of_grid` (x or y outside `coordinate_base..coordinate_base + grid_size - 1`: dropped), `used` (the first remaining row of its slot) or
    `duplicate` (a later row of an already answered slot: dropped). Asked slots without a used row take the fallback
    cell and are counted `filled` (this includes slots whose only predictions were out of the grid). So
    `predicted == answered + duplicate + not_asked + out_of_grid` and `asked == answered + filled`.

    Args:
        asked_dt (`array-like` of shape `(m, 2)`):
            The asked (d, t), distinct.
        predicted (`array-like` of shape `(n, 4)`):
            Predicted (d, t, x, y) rows, e.g. from [`parse_prediction`]; may be empty.
        fallback_xy (`array-like` of shape `(m, 2)`):
            The cell to use for each asked slot without a usable prediction.
        grid_size (`int`, *optional*, defaults to 200):
            Cells per side.
        coordinate_base (`int`, *optional*, defaults to 1):
            The first cell number: 1 for HuMob / YJMob100K files (cells 1..200), 0 for 0-based derived files (the
            grid reader records it in the dataset metadata).

    Returns:
        `(np.ndarray, dict)`: the rows (d, t, x, y) as int64 of shape `(m, 4)` in the asked order, and counts
        `asked`, `predicted`, `answered`, `filled`, `not_asked`, `duplicate`, `out_of_grid`.

    Raises:
        `ValueError`: on wrong shapes, non-integer values, repeated asked slots or a non-positive `grid_size`.
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    asked = _int_array(asked_dt, "asked_dt", 2)
    pred = _int_array(predicted, "predicted", 4)
    fallback = _int_array(fallback_xy, "fallback_xy", 2)
    m, n = len(asked), len(pred)
    if len(fallback) != m:
        raise ValueError(f"fallback_xy has {len(fallback)} rows but asked_dt has {m}: one fallback cell per asked slot")
    keys = np.concatenate([asked, pred[:, :2]])
    if len(keys):
        _, codes = np.unique(keys, axis=0, return_inverse=True)
        codes = codes.reshape(-1)
    else:
        codes = np.zeros(0, dtype=np.int64)
    asked_codes, pred_codes = codes[:m], codes[m:]
    if len(np.unique(asked_codes)) != m:
        dup = asked[np.flatnonzero(np.bincount(asked_codes)[asked_codes] > 1)[0]]
        raise ValueError(f"asked_dt must hold distinct (d, t); (d={dup[0]}, t={dup[1]}) is asked more than once")
    slot_of_code = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, dtype=np.int64)
    slot_of_code[asked_codes] = np.arange(m)
    pred_slot = slot_of_code[pred_codes]
    not_asked = pred_slot < 0
    if isinstance(coordinate_base, bool) or not isinstance(coordinate_base, (int, np.integer)) or coordinate_base < 0:
        raise ValueError(f"coordinate_base must be a non-negative integer, got {coordinate_base!r}")
    last = coordinate_base + grid_size - 1
    in_grid = ((pred[:, 2:] >= coordinate_base) & (pred[:, 2:] <= last)).all(axis=1)
    out_of_grid = ~not_asked & ~in_grid
    candidates = np.flatnonzero(~not_asked & in_grid)
    used_slots, first = np.unique(pred_slot[candidates], return_index=True)  # first row of each answered slot
    rows = np.empty((m, 4), dtype=np.int64)
    rows[:, :2] = asked
    rows[:, 2:] = fallback
    rows[used_slots, 2:] = pred[candidates[first], 2:]
    counts = {
        "asked": int(m),
        "predicted": int(n),
        "answered": int(len(used_slots)),
        "filled": int(m - len(used_slots)),
        "not_asked": int(not_asked.sum()),
        "duplicate": int(len(candidates) - len(used_slots)),
        "out_of_grid": int(out_of_grid.sum()),
    }
    return rows, counts


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


def answer_token_budget(
    tokenizer, num_asked: int, grid_size: int = 200, *, margin: float = 0.1, extra_tokens: int = 16,
    answer_style: str = "compact",
) -> int:
    """A `max_new_tokens` that fits a JSON answer with `num_asked` rows.

    Measures the token length of `{"prediction":[[d,t,x,y],...]}` (in `answer_style`) with `num_asked` rows of 3-digit
    days, 2-digit slots and cells with as many digits as `grid_size` (values spread over the range, since BPE splits
    numbers unevenly), then adds `margin` (a fraction) and `extra_tokens` (end of sequence, a little slack). A free-text
    `"reason"` field is not budgeted.

    Args:
        tokenizer: the model's tokenizer.
        num_asked (`int`): the number of asked rows, at least 0.
        grid_size (`int`, *optional*, defaults to 200): cells per side.
        margin (`float`, *optional*, defaults to 0.1): relative slack, at least 0.
        extra_tokens (`int`, *optional*, defaults to 16): absolute slack, at least 0.
        answer_style (`str`, *optional*, defaults to `"compact"`): `"compact"` or `"spaced"` (see
            `dataset_builders.instructions.humob_qa.ANSWER_STYLES`).

    Returns:
        `int`: the token budget.

    Raises:
        `ValueError`: on a negative or non-integer `num_asked`, a `grid_size` below 1, negative slack or an unknown
        answer style.
    """
    from dataset_builders.instructions.humob_qa import answer_json

    for name, value in (("num_asked", num_asked), ("extra_tokens", extra_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be a non-negative fraction, got {margin!r}")
    i = np.arange(int(num_asked))
    low = 10 ** (len(str(int(grid_size))) - 1)
    span = int(grid_size) - low + 1
    d = 100 + (i * 7) % 900
    t = 10 + (i * 5) % 38
    x = low + (i * 37 + 11) % span
    y = low + (i * 53 + 29) % span
    answer = answer_json(d, t, x, y, style=answer_style)
    length = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return int(np.ceil(length * (1.0 + margin))) + int(extra_tokens)


def _model_device(model):
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an eos token; generation "
                         "could not stop at the end of an answer")
    return ids


def _render(tokenizer, prompts: Sequence[Any], chunk: int = 256) -> list[np.ndarray]:
    """Token ids of each prompt (int32 arrays, compact for long prompts): chat messages through the chat template
    (with the generation prompt), strings as they are. Rendered and tokenised `chunk` prompts at a time."""
    out: list[np.ndarray] = []
    for lo in range(0, len(prompts), chunk):
        texts = []
        for i in range(lo, min(lo + chunk, len(prompts))):
            prompt = prompts[i]
            if isinstance(prompt, str):
                texts.append(prompt)
            elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
                if getattr(tokenizer, "chat_template", None) is None:
                    raise ValueError("the tokenizer has no chat template, but the prompts are chat messages; set "
                                     "tokenizer.chat_template or pass rendered prompt strings")
                texts.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
            else:
                raise ValueError(f"prompts[{i}] must be a list of chat messages or a string, got "
                                 f"{type(prompt).__name__}")
        # the template already holds any BOS the model expects: no special tokens on top
        out += [np.asarray(ids, dtype=np.int32) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return out


def _generate(
    model, tokenizer, prompts: Sequence[Any], *, batch_size: int, max_new_tokens: int | Sequence[int], progress: bool,
    asked: Sequence[Any] | None = None, cell_range: tuple[int, int] | None = None, cells: Sequence[Any] | None = None,
    answer_style: str = "compact",
) -> tuple[list[str], dict[str, Any]]:
    """[`generate_answers`] with statistics: `(answers, {"seconds", "tokens", "stopped_at_limit", "prompt_tokens",
    "overrides"})`; `overrides` (per prompt: tokens where the grammar replaced the model's top token) only with
    `asked`."""
    import torch
    from tqdm.auto import tqdm

    from .greedy_decode import CONTINUOUS_ATTENTION, continuous_greedy_decode, greedy_decode

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(prompts)
    if isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool):
        budgets = np.full(n, int(max_new_tokens), dtype=np.int64)
    else:
        try:
            budgets = np.asarray(list(max_new_tokens), dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise ValueError(f"max_new_tokens must be an int or one int per prompt, got {max_new_tokens!r}") from err
        if len(budgets) != n:
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {n} prompts: give one per prompt")
    if n and budgets.min() < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {int(budgets.min())}")
    if asked is not None:
        from .humob_grammar import HumobAnswerLogitsProcessor, TokenTexts

        token_texts = TokenTexts(tokenizer)  # one cache for every batch
        asked = list(asked)
        if len(asked) != n:
            raise ValueError(f"asked has {len(asked)} entries for {n} prompts: give the asked slots of every prompt")
        if cell_range is None or len(cell_range) != 2:
            raise ValueError(f"cell_range must be (first cell, last cell) with asked, got {cell_range!r}")
        cells = [None] * n if cells is None else list(cells)
        if len(cells) != n:
            raise ValueError(f"cells has {len(cells)} entries for {n} prompts: give one per prompt (None: the grid)")
    elif cells is not None:
        raise ValueError("cells restricts grammar-constrained decoding: pass asked (the asked slots) with it")
    stats = {"seconds": 0.0, "tokens": 0, "stopped_at_limit": 0, "prompt_tokens": 0}
    if asked is not None:
        stats["overrides"] = np.zeros(n, dtype=np.int64)
    if n == 0:
        return [], stats

    t0 = time.perf_counter()
    ids = _render(tokenizer, prompts)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f"prompts[{int(np.argmin(lengths))}] renders to no tokens; nothing to generate from")
    stats["prompt_tokens"] = int(lengths.sum())
    eos = _eos_ids(model, tokenizer)
    device = _model_device(model)
    answers: list[str] = [""] * n
    was_training = getattr(model, "training", False)
    model.eval()
    bar = tqdm(total=n, desc="generating", unit=" prompt", disable=not progress, leave=False)

    def record(i: int, gen: list[int]) -> None:
        if not gen or gen[-1] not in eos:  # each prompt keeps its own budget and stops at its own eos
            stats["stopped_at_limit"] += 1
        stats["tokens"] += len(gen)
        answers[i] = tokenizer.decode(gen, skip_special_tokens=True)

    try:
        with torch.inference_mode():
            implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
            if implementation in CONTINUOUS_ATTENTION:
                # continuous batching; longest prompts first, so that the prompts decoding together have similar
                # lengths (attention reads every slot up to the longest), then longest answers
                order = np.lexsort((-budgets, -lengths))
                grammar = None
                if asked is not None:
                    grammar = HumobAnswerLogitsProcessor(tokenizer, [asked[i] for i in order], cell_range, eos,
                                                         token_texts=token_texts, cells=[cells[i] for i in order],
                                                         answer_style=answer_style)
                generated = continuous_greedy_decode(
                    model, [ids[i] for i in order], max_new_tokens=budgets[order], eos_token_ids=eos,
                    choose=grammar.next_tokens if grammar is not None else None, max_batch=int(batch_size),
                    on_finish=lambda _: bar.update(1))
                for j, i in enumerate(order):
                    record(i, generated[j])
                if grammar is not None:
                    stats["overrides"][order] = grammar.overrides
            else:
                # static batches for attention that takes no custom mask (e.g. flash attention): longest answers
                # first, then longest prompts, so that rows of a batch stop at about the same step and pad little
                order = np.lexsort((-lengths, -budgets))
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
                for lo in range(0, n, int(batch_size)):
                    idx = order[lo : lo + int(batch_size)]
                    width = int(lengths[idx].max())
                    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                    attention = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):  # left padding: the answers of all rows start at column `width`
                        input_ids[row, width - lengths[i] :] = torch.from_numpy(ids[i]).long()
                        attention[row, width - lengths[i] :] = 1
                    choose = None
                    if asked is not None:
                        grammar = HumobAnswerLogitsProcessor(tokenizer, [asked[i] for i in idx], cell_range, eos,
                                                             token_texts=token_texts, cells=[cells[i] for i in idx],
                                                             answer_style=answer_style)
                        choose = grammar.next_tokens
                    generated = greedy_decode(model, input_ids.to(device), attention.to(device),
                                              max_new_tokens=budgets[idx], eos_token_ids=eos, choose=choose)
                    if asked is not None:
                        stats["overrides"][idx] = grammar.overrides
                    for row, i in enumerate(idx):
                        record(i, generated[row])
                    bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    stats["seconds"] = time.perf_counter() - t0
    return answers, stats


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[Any],
    *,
    batch_size: int = 16,
    max_new_tokens: int | Sequence[int] = 1024,
    progress: bool = True,
    asked: Sequence[Any] | None = None,
    cell_range: tuple[int, int] = (1, 200),
    cells: Sequence[Any] | None = None,
    answer_style: str = "compact",
) -> list[str]:
    """Greedy answers of a causal LM to chat prompts, batched.

    Each prompt is rendered with `tokenizer.apply_chat_template(..., add_generation_prompt=True)` (a string prompt is
    used as it is) and decoded greedily on the model's device under `torch.inference_mode()`, each answer ending at
    its end-of-sequence token (the tokenizer's and the model's `generation_config` eos ids) or its own budget:

    - SDPA or eager attention (the default of transformers models): continuous batching
      ([`train.greedy_decode.continuous_greedy_decode`]): up to `batch_size` prompts decode together and a finished
      prompt's place goes to the next one at once; prompts are taken longest first (then longest budget), so that
      the prompts decoding together have similar lengths.
    - other attention implementations (flash attention takes no custom mask): static batches of `batch_size`
      prompts sorted by answer budget, then token length (longest first), left-padded by hand
      ([`train.greedy_decode.greedy_decode`]).

    Prompts are prefilled one at a time (without padding) in both, the tokenizer's `padding_side` is neither read nor
    changed, and batched and unbatched answers agree. The model is put in eval mode and restored afterwards.

    Args:
        model: a causal LM (a transformers `*ForCausalLM`; any device).
        tokenizer: its tokenizer, with a chat template for message prompts; its pad token (else eos) pads static
            batches.
        prompts (`Sequence`): chat message lists (`[{"role": ..., "content": ...}, ...]`) or rendered strings.
        batch_size (`int`, *optional*, defaults to 16): prompts decoded together; 1 is unbatched.
        max_new_tokens (`int` or `Sequence[int]`, *optional*, defaults to 1024): the answer budget, one for all or
            one per prompt (see [`answer_token_budget`]).
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over the prompts (advanced as answers end).
        asked (`Sequence`, *optional*): per prompt, its asked (d, t) as an `(m, 2)` array (see
            [`parse_asked_slots`]). Given, decoding is grammar-constrained
            ([`train.humob_grammar.HumobAnswerLogitsProcessor`]): each answer is the JSON (in `answer_style`) with
            exactly the asked (d, t) in the asked order and the model's cells; without it, decoding is free.
        cell_range (`tuple[int, int]`, *optional*, defaults to `(1, 200)`): the first and last cell number, for
            constrained decoding.
        cells (`Sequence`, *optional*): with `asked`, per prompt an `(k, 2)` array of the only cells its answer may
            hold (e.g. the cells of its records), or `None` for the whole grid.
        answer_style (`str`, *optional*, defaults to `"compact"`): with `asked`, the answer style the model was
            trained on: `"compact"` or `"spaced"`.

    Returns:
        `list[str]`: the decoded answers (special tokens skipped), in the order of `prompts`.

    Raises:
        `ValueError`: on a non-positive `batch_size` or budget, a budget list of the wrong length, message prompts
        without a chat template, or no eos token.
    """
    answers, _ = _generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, asked=asked, cell_range=cell_range if asked is not None else None,
                           cells=cells, answer_style=answer_style)
    return answers


# ----------------------------------------------------------------------------------------------------------------------
# A whole split
# ----------------------------------------------------------------------------------------------------------------------


def _load_grid(data_dir) -> PreparedDataset:
    data = data_dir if isinstance(data_dir, PreparedDataset) else load_prepared(data_dir)
    if data.kind != "grid":
        raise ValueError(f"{data.path} is a {data.kind!r} dataset; Llama-3-8B-Mob predicts grid (HuMob) data")
    return data


def _few(values, k: int = 5) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:k]) + (", ..." if len(values) > k else "")


def answer_style_of(answer: str) -> str | None:
    """The answer style (`"compact"` or `"spaced"`) a model answer or training answer is written in, from how it opens
    (`{"prediction":[` or `{"prediction": [`); `None` for anything else."""
    from dataset_builders.instructions.humob_qa import ANSWER_STYLES, answer_opening

    text = answer.lstrip() if isinstance(answer, str) else ""
    for style in ANSWER_STYLES:
        if text.startswith(answer_opening(style)):
            return style
    return None


def _instruction_answer_style(instructions, rows) -> tuple[str | None, str]:
    """The answer style of an instruction dataset and where it was read: the first answer of its loaded rows (a
    `completion` column), else the `answer_style` its builder recorded in `hf_mobility.json` (a local folder)."""
    if "completion" in rows.column_names:
        for completion in rows.select(range(min(len(rows), 8)))["completion"]:
            for message in completion or []:
                style = answer_style_of(message.get("content")) if isinstance(message, Mapping) else None
                if style is not None:
                    return style, "its answers"
    if isinstance(instructions, (str, os.PathLike)):
        from dataset_builders.instructions.humob_qa import built_config

        style = (built_config(instructions) or {}).get("answer_style")
        if style is not None:
            return str(style), "the config it was built with"
    return None, ""


def _load_instruction_prompts(instructions, split: str) -> tuple[dict[int, Any], str | None]:
    """`{uid: prompt}` of the `split` rows of an instruction dataset (a folder / Hub id, or a `datasets.Dataset`), and
    the answer style it was built with (`None` when neither its rows nor its metadata say)."""
    import datasets

    if isinstance(instructions, datasets.Dataset):
        rows = instructions
        where = "the instruction dataset"
    else:
        where = str(instructions)
        names = datasets.get_dataset_config_names(where)
        if HUMOB_CONFIG in names:
            config = HUMOB_CONFIG
        elif len(names) == 1:
            config = names[0]
        else:
            raise ValueError(f"{where} has no {HUMOB_CONFIG!r} config and several others ({', '.join(names)}); "
                             "build the Q&A rows with `mobility data instructions --task humob-qa`")
        try:
            rows = load_dataset_folder(where, config, split=split)
        except ValueError as err:
            raise ValueError(f"{where} (config {config!r}) has no split {split!r}: {err}") from None
        where = f"{where} (config {config!r}, split {split!r})"
    missing = {"uid", "prompt"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{where} lacks the column(s) {sorted(missing)}; expected `uid` and `prompt` (chat messages)")
    uids = [int(u) for u in rows["uid"]]
    counts = Counter(uids)
    repeated = [u for u, c in counts.items() if c > 1]
    if repeated:
        raise ValueError(f"{where} has several rows for {len(repeated)} uid(s) ({_few(repeated)}); prediction needs "
                         "exactly one prompt per user of the split")
    style, source = _instruction_answer_style(instructions, rows)
    if style is not None:
        logger.info("answer style %r (from %s of %s)", style, source, where)
    return dict(zip(uids, rows["prompt"])), style


def _fallback_cells(samples: pa.Table, asked: list[np.ndarray], day0_weekday: int) -> list[np.ndarray]:
    """The slot-mode cell of every asked (d, t) of every user of `samples` (same order), as `(m_i, 2)` arrays."""
    lens = np.array([len(a) for a in asked], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    flat = np.concatenate(asked) if len(asked) else np.zeros((0, 2), dtype=np.int64)
    hidden = pa.array(np.full(len(flat), HIDDEN_CELL, dtype=np.int64))
    table = samples.select(["uid", "input_d", "input_t", "input_x", "input_y"])
    for name, values in (("target_d", pa.array(flat[:, 0])), ("target_t", pa.array(flat[:, 1])),
                         ("target_x", hidden), ("target_y", hidden)):
        table = table.append_column(name, pa.ListArray.from_arrays(offsets, values))
    pred = slot_mode_predictions(table, day0_weekday=day0_weekday)
    keys = pd.DataFrame({"uid": np.repeat(samples.column("uid").to_numpy(), lens), "d": flat[:, 0], "t": flat[:, 1]})
    pred = pred.astype({"uid": np.int64, "d": np.int64, "t": np.int64})
    merged = keys.merge(pred, on=["uid", "d", "t"], how="left", validate="one_to_one")
    xy = merged[["x", "y"]].to_numpy(dtype=np.int64)
    return np.split(xy, np.cumsum(lens)[:-1])


def predict_grid(
    model,
    tokenizer,
    data_dir: str | os.PathLike | PreparedDataset,
    split: str = "test",
    prompts: Mapping[Any, Any] | None = None,
    *,
    instructions_dir: Any = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    max_users: int | None = None,
    on_missing_prompt: str = "error",
    constrained: bool = True,
    cells: str = "grid",
    answer_style: str | None = None,
    progress: bool = True,
    out_csv: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predict every asked (d, t) of the users of a split with a Q&A model, falling back to the slot-mode baseline.

    For each user of `split` (in the split's order): its prompt, the asked (d, t) from the prompt's `d t 999 999`
    lines ([`parse_asked_slots`]), a greedy answer ([`generate_answers`]), the parsed rows ([`parse_prediction`]) and
    one row per asked slot ([`fill_predictions`], the fallback being the per-user slot-mode cell of that slot on the
    same day type, fitted on the user's input days).

    Args:
        model: the causal LM (its device is used).
        tokenizer: its tokenizer, with a chat template.
        data_dir (`str`, `os.PathLike` or `PreparedDataset`): the prepared grid dataset the prompts were built from.
        split (`str`, *optional*, defaults to `"test"`): the split to predict (`hidden` works too: no reference needed).
        prompts (`Mapping`, *optional*): `{uid: chat messages}` (or a rendered string) for the users of the split.
        instructions_dir (*optional*): used when `prompts` is None: an instruction dataset folder or Hub id (the
            `humob-qa` config, else its only config; rows `uid`, `prompt`; the split named `split`), or a
            `datasets.Dataset` with those columns.
        batch_size (`int`, *optional*, defaults to 16): prompts per generation batch; 1 is unbatched.
        max_new_tokens (`int`, *optional*): the answer budget; default: constrained, the character length of the
            user's longest possible answer plus one (always enough: every token writes a character), free,
            [`answer_token_budget`] of the user's number of asked slots.
        max_users (`int`, *optional*): only the first users of the split.
        on_missing_prompt (`str`, *optional*, defaults to `"error"`): what to do with users of the split without a
            prompt (e.g. dropped by the instruction builder's token budget): `"error"`, or `"fallback"` to answer their
            target slots with the slot-mode cells (counted in `users_without_prompt` and `filled`).
        constrained (`bool`, *optional*, defaults to `True`): grammar-constrained decoding (hf-mobility choice; see
            [`train.humob_grammar`]): the model writes only the cells of the asked slots, in the asked order, on the
            grid; `False` decodes freely as the paper does, and the tolerant parser and the fallback repair the answers.
        cells (`str`, *optional*, defaults to `"grid"`): which cells a constrained answer may hold: `"grid"`, any
            cell of the grid; `"history"`, only the cells of the user's records in its prompt ([`history_cells`];
            people mostly return to places they have been: a prior for models that read their history poorly, at
            the cost of never predicting a new place). A prompt without records keeps the grid (counted in
            `prompts_without_records`).
        answer_style (`str`, *optional*): the answer style the model was trained on, `"compact"` or `"spaced"` (see
            `dataset_builders.instructions.humob_qa.ANSWER_STYLES`): constrained answers are written in it. Default:
            the style of `instructions_dir` (its answers, else the `answer_style` in its `hf_mobility.json`), else
            `"compact"`.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        out_csv (`str` or `os.PathLike`, *optional*): also write the predictions there as `uid,d,t,x,y` (atomically).

    Returns:
        `(pd.DataFrame, dict)`: the predictions (columns `uid, d, t, x, y`, int64, one row per asked slot, users in the
        split's order, slots in the asked order) and the report: `split`, `data`, `users`, `users_without_prompt`,
        `asked_slots`,
        `predicted_rows`, `answered`, `filled`, `not_asked`, `duplicate`, `out_of_grid`, `invalid` (unusable
        quadruples), `unparsable` (answers with no prediction at all), `parse_methods` (histogram),
        `stopped_at_limit` (answers that hit the token budget), `decoding` (`constrained` or `free`),
        `grammar_overrides` (constrained: tokens where the model's own top token left the answer grammar and the
        best token on it was taken instead), `cells`, `prompts_without_records` (with `cells="history"`),
        `asked_differs_from_targets` (users whose asked slots
        are not the split's target slots), `unused_prompts`, `generation_seconds`, `total_seconds`, `prompt_tokens`,
        `tokens_generated`, `tokens_per_second`, `users_per_second`, `batch_size`, `answer_style`,
        `unparsable_examples` (the first few unparsable answers, shortened).

    Raises:
        `ValueError`: if the data is not a grid dataset, the split does not exist, neither `prompts` nor
        `instructions_dir` is given, a user of the split has no prompt and `on_missing_prompt="error"` (the message
        names how many and the first uids), a prompt asks no slot or repeats one, or an argument is out of range.
    """
    t_start = time.perf_counter()
    data = _load_grid(data_dir)
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    if max_users is not None and (isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1):
        raise ValueError(f"max_users must be a positive integer or None, got {max_users!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
    samples = data.table("samples", split)
    if max_users is not None:
        samples = samples.slice(0, max_users)
    if samples.num_rows == 0:
        raise ValueError(f"{data.path}: split {split!r} has no users")
    if on_missing_prompt not in ("error", "fallback"):
        raise ValueError(f"on_missing_prompt must be 'error' or 'fallback', got {on_missing_prompt!r}")
    if cells not in CELL_CHOICES:
        raise ValueError(f"cells must be one of {CELL_CHOICES}, got {cells!r}")
    if answer_style is not None:
        from dataset_builders.instructions.humob_qa import answer_separators

        answer_separators(answer_style)  # a clear error for an unknown style before any work
    if cells != "grid" and not constrained:
        raise ValueError(f"cells={cells!r} restricts grammar-constrained decoding; free decoding writes any text")
    if prompts is None:
        if instructions_dir is None:
            raise ValueError("pass `prompts` ({uid: chat messages}) or `instructions_dir` (the humob-qa instruction "
                             "dataset) to say what to ask the model")
        by_uid, found_style = _load_instruction_prompts(instructions_dir, split)
        if answer_style is None:
            answer_style = found_style
    else:
        if not isinstance(prompts, Mapping):
            raise ValueError(f"prompts must be a mapping {{uid: chat messages}}, got {type(prompts).__name__}")
        try:
            by_uid = {int(k): v for k, v in prompts.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"prompts keys must be the integer uids of the split: {err}") from None
    uids = samples.column("uid").to_numpy().astype(np.int64)
    has_prompt = np.array([int(u) in by_uid for u in uids], dtype=bool)
    if not has_prompt.all():
        missing = uids[~has_prompt].tolist()
        message = f"{len(missing)} of the {len(uids)} users of split {split!r} have no prompt (uids {_few(missing)})"
        if on_missing_prompt == "error":
            raise ValueError(message + "; pass on_missing_prompt='fallback' to give them the slot-mode cells")
        logger.warning("%s: their target slots get the slot-mode cells", message)
    unused = len(set(by_uid) - set(uids.tolist()))
    targets_d = samples.column("target_d").to_pylist()
    targets_t = samples.column("target_t").to_pylist()

    asked = []
    for u, ok, td, tt in zip(uids, has_prompt, targets_d, targets_t):
        if not ok:  # no prompt: the split's target slots, all from the fallback
            asked.append(np.column_stack([td, tt]).astype(np.int64).reshape(-1, 2))
            continue
        a = parse_asked_slots(by_uid[int(u)])
        if len(a) == 0:
            raise ValueError(f"the prompt of uid {u} asks no slot (no 'd t {HIDDEN_CELL} {HIDDEN_CELL}' line in its "
                             "last user message)")
        if len(np.unique(a, axis=0)) != len(a):
            raise ValueError(f"the prompt of uid {u} asks some (d, t) more than once")
        asked.append(a)
    differs = sum(
        set(map(tuple, a.tolist())) != set(zip(td, tt)) for a, td, tt in zip(asked, targets_d, targets_t)
    )
    if differs:
        logger.warning("%d of %d users are asked other (d, t) than the target slots of split %r; their predictions "
                       "answer the prompts", differs, len(uids), split)
    day0 = int(data.metadata.get("day0_weekday", 0))
    grid_size = int(data.metadata.get("grid_size") or 200)
    base = int(data.metadata.get("coordinate_base", 1))
    fallbacks = _fallback_cells(samples, asked, day0)

    answer_style = answer_style or "compact"
    prompted = np.flatnonzero(has_prompt)
    if max_new_tokens is None and constrained:
        from .humob_grammar import AnswerGrammar

        # every constrained token writes at least one character: the longest answer in characters always fits
        budgets = [AnswerGrammar(asked[i], base, base + grid_size - 1, style=answer_style).max_length + 1
                   for i in prompted]
    elif max_new_tokens is None:
        cache: dict[int, int] = {}
        budgets = []
        for i in prompted:
            m = len(asked[i])
            if m not in cache:
                cache[m] = answer_token_budget(tokenizer, m, grid_size, answer_style=answer_style)
            budgets.append(cache[m])
    else:
        budgets = [max_new_tokens] * len(prompted)
    cell_range = (base, base + grid_size - 1)
    allowed, without_records = None, None
    if cells == "history":
        allowed = [history_cells(by_uid[int(uids[i])], cell_range) for i in prompted]
        without_records = sum(len(a) == 0 for a in allowed)
        allowed = [a if len(a) else None for a in allowed]
    generated, gen_stats = _generate(
        model, tokenizer, [by_uid[int(uids[i])] for i in prompted], batch_size=batch_size, max_new_tokens=budgets,
        progress=progress, asked=[asked[i] for i in prompted] if constrained else None, cell_range=cell_range,
        cells=allowed, answer_style=answer_style,
    )
    answers: list[str | None] = [None] * len(uids)
    for i, answer in zip(prompted, generated):
        answers[i] = answer

    totals = Counter()
    methods = Counter({m: 0 for m in PARSE_METHODS})
    unparsable_examples = []
    parts = []
    for u, a, fb, answer in zip(uids, asked, fallbacks, answers):
        if answer is None:
            rows = np.zeros((0, 4), dtype=np.int64)
        else:
            rows, info = parse_prediction(answer)
            methods[info["method"]] += 1
            totals["invalid"] += info["invalid"]
            if info["unparsable"]:
                totals["unparsable"] += 1
                if len(unparsable_examples) < 3:
                    unparsable_examples.append({"uid": int(u), "answer": answer[:200]})
        try:
            filled, counts = fill_predictions(a, rows, fb, grid_size=grid_size, coordinate_base=base)
        except ValueError as err:
            raise ValueError(f"uid {u}: {err}") from None
        totals.update(counts)
        parts.append(np.column_stack([np.full(len(filled), u, dtype=np.int64), filled]))
    frame = pd.DataFrame(np.concatenate(parts), columns=["uid", "d", "t", "x", "y"]).astype(np.int64)

    seconds = gen_stats["seconds"]
    report = {
        "data": str(data.path),
        "split": split,
        "users": int(len(uids)),
        "users_without_prompt": int((~has_prompt).sum()),
        "asked_slots": int(totals["asked"]),
        "predicted_rows": int(totals["predicted"]),
        "answered": int(totals["answered"]),
        "filled": int(totals["filled"]),
        "not_asked": int(totals["not_asked"]),
        "duplicate": int(totals["duplicate"]),
        "out_of_grid": int(totals["out_of_grid"]),
        "invalid": int(totals["invalid"]),
        "unparsable": int(totals["unparsable"]),
        "parse_methods": dict(methods),
        "stopped_at_limit": int(gen_stats["stopped_at_limit"]),
        "asked_differs_from_targets": int(differs),
        "unused_prompts": int(unused),
        "batch_size": int(batch_size),
        "decoding": "constrained" if constrained else "free",
        "grammar_overrides": int(gen_stats["overrides"].sum()) if constrained else None,
        "cells": cells,
        "answer_style": answer_style,
        "prompts_without_records": without_records,
        "prompt_tokens": int(gen_stats["prompt_tokens"]),
        "tokens_generated": int(gen_stats["tokens"]),
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(gen_stats["tokens"] / seconds, 2) if seconds > 0 else None,
        "users_per_second": round(len(uids) / seconds, 3) if seconds > 0 else None,
        "unparsable_examples": unparsable_examples,
    }
    if out_csv is not None:
        write_text_atomic(frame.to_csv(index=False, lineterminator="\n"), out_csv)
        report["predictions"] = str(out_csv)
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    logger.info(
        "%s: %d users, %d asked slots, %d answered by the model, %d filled from slot-mode; %d unparsable answers; "
        "%d tokens in %.1fs (%.1f tokens/s)", split, report["users"], report["asked_slots"], report["answered"],
        report["filled"], report["unparsable"], report["tokens_generated"], seconds, report["tokens_per_second"] or 0,
    )
    return frame, report


def _read_predictions(predictions) -> pd.DataFrame:
    if isinstance(predictions, pd.DataFrame):
        frame = predictions
    elif isinstance(predictions, (str, os.PathLike)):
        path = Path(predictions)
        if not path.is_file():
            raise FileNotFoundError(f"no predictions file {path}; write one with `mobility predict`")
        frame = pd.read_csv(path)
    else:
        raise ValueError(f"predictions must be a DataFrame or a CSV path, got {type(predictions).__name__}")
    cols = ["uid", "d", "t", "x", "y"]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ValueError(f"predictions lack the column(s) {missing}; expected {cols}")
    return frame[cols]


def _check_same_slots(predictions: pd.DataFrame, reference: pd.DataFrame, split: str) -> None:
    """Raise a counted error when the predictions of the split's users do not hold exactly the target (uid, d, t)."""
    try:
        pred = pd.MultiIndex.from_frame(predictions[["uid", "d", "t"]].astype(np.int64))
    except (TypeError, ValueError):
        return  # non-integer keys: the metrics name the problem
    ref = pd.MultiIndex.from_frame(reference[["uid", "d", "t"]].astype(np.int64))
    missing = ref[~ref.isin(pred)]
    extra = pred[~pred.isin(ref)]
    if len(missing) or len(extra):
        first = missing[0] if len(missing) else extra[0]
        raise ValueError(
            f"the predictions of split {split!r} miss {len(missing)} of its {len(ref)} target slots and hold "
            f"{len(extra)} slots that are not targets (first: uid={first[0]}, d={first[1]}, t={first[2]}); every "
            "target (d, t) must be predicted once (were the prompts built with other predict days than the data?)"
        )


def evaluate_grid_predictions(
    predictions: pd.DataFrame | str | os.PathLike,
    data_dir: str | os.PathLike | PreparedDataset,
    split: str = "test",
    *,
    name: str = "model",
    input_days: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """GEO-BLEU (N = 5 and N = 3) and DTW of grid predictions against a split's targets, with slot-mode beside them.

    Args:
        predictions (`pd.DataFrame` or path): rows `uid, d, t, x, y` (a DataFrame or a CSV with that header).
        data_dir (`str`, `os.PathLike` or `PreparedDataset`): the prepared grid dataset.
        split (`str`, *optional*, defaults to `"test"`): the split to score (not `hidden`: it has no reference).
        name (`str`, *optional*, defaults to `"model"`): the results key of the predictions.
        input_days (`tuple[int, int]`, *optional*): the input days `(first, last)` the model saw (a Q&A prompt's
            window). When the split's input rows reach outside them, the results also hold
            `"slot-mode (days first-last)"`: slot-mode fitted on those days only, what copying the window's most
            frequent cell per slot would score (the `"slot-mode"` row uses every input day).

    Returns:
        `dict`: `{"data", "split", "kind": "grid", "results": {name: metrics, "slot-mode": metrics, ...}, "predictions":
        {...}}` where metrics are `geobleu@5`, `geobleu@3`, `dtw`, `num_users`, `num_points` (the format of
        [`train.evaluate.evaluate_baselines`], printable with `format_results_table`), and `predictions` counts the
        rows read and the users and rows outside the split that were dropped (`extra_users_dropped`,
        `extra_rows_dropped`).

    Raises:
        `ValueError`: if the data is not a grid dataset, the split does not exist or is `hidden`, users of the split
        are missing from the predictions (the message names how many and the first uids), the predictions of the
        split's users do not hold exactly the target (d, t) of each user (the message counts the missing and extra
        slots and names the first), or a slot is predicted twice.
    """
    data = _load_grid(data_dir)
    if split == "hidden":
        raise ValueError("the hidden split has no reference cells (its targets are 999): there is nothing to score")
    if split not in data.splits("samples"):
        raise ValueError(f"{data.path}: no split {split!r}; available: {data.splits('samples')}")
    if name == "slot-mode":
        raise ValueError("name 'slot-mode' is taken by the baseline in the report; choose another name")
    frame = _read_predictions(predictions)
    reference = grid_targets(data, split)
    split_uids = data.table("samples", split).column("uid").to_numpy().astype(np.int64)
    pred_uids = frame["uid"].to_numpy()
    missing = np.setdiff1d(split_uids, pred_uids)
    if missing.size:
        raise ValueError(f"the predictions miss {missing.size} of the {len(split_uids)} users of split {split!r} "
                         f"(uids {_few(missing.tolist())}); predict every user of the split")
    keep = np.isin(pred_uids, split_uids)
    extra_users = np.unique(pred_uids[~keep])
    if extra_users.size:
        logger.warning("dropping the predictions of %d users outside split %r (%d rows)", extra_users.size, split,
                       int((~keep).sum()))
    scored = frame.loc[keep]
    _check_same_slots(scored, reference, split)
    res = grid_metrics(scored, reference, len(split_uids))
    logger.info("%s on %s: geobleu@5 %.4f, geobleu@3 %.4f, dtw %.2f over %d users", name, split, res["geobleu@5"],
                res["geobleu@3"], res["dtw"], res["num_users"])
    baseline = evaluate_baselines(data, "slot-mode", split=split)["results"]
    if input_days is not None:
        samples = data.table("samples", split)
        days = pc.list_flatten(samples.column("input_d"))
        first, last = (int(v) for v in input_days)
        if len(days) and (pc.min(days).as_py() < first or pc.max(days).as_py() > last):
            window = f"slot-mode (days {first}-{last})"
            if name == window:
                raise ValueError(f"name {window!r} is taken by the baseline in the report; choose another name")
            pred = slot_mode_predictions(samples, day0_weekday=int(data.metadata.get("day0_weekday", 0)),
                                         input_days=(first, last))
            baseline[window] = grid_metrics(pred, reference, len(split_uids))
    return {
        "data": str(data.path),
        "split": split,
        "kind": "grid",
        "results": {name: res, **baseline},
        "predictions": {
            "rows": int(len(frame)),
            "extra_users_dropped": int(extra_users.size),
            "extra_rows_dropped": int((~keep).sum()),
        },
    }
