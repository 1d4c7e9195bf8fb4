"""Llama-3-8B-Mob Q&A instruction set (DESIGN §5.2): long-term trajectory prediction on a grid city as chat rows.

One row per user (and, for the train split, optionally per earlier window of the same user): the system message explains
the grid, the 30-minute slots and the record format; the user message lists the user's observed records ``d t x y`` of
the input days, one per line, followed by the asked slots of the predicted days written ``d t 999 999``; the assistant
message is JSON with one ``[d, t, x, y]`` entry per asked line, in the asked order: compact by default, or with
``json.dumps``'s default ``", "`` and ``": "`` separators (``answer_style="spaced"``; see :data:`ANSWER_STYLES`).

```text
user:      Days 0-59 observed; predict days 60-74.
           0 16 34 52
           0 17 35 52
           ...
           60 17 999 999
           60 18 999 999
assistant: {"prediction":[[60,17,101,87],[60,18,102,87]]}
```

The rows are TRL conversational prompt-completion rows (``prompt`` = system + user messages, ``completion`` = the
assistant message), so `SFTTrainer` computes the loss on the answer only with any chat template; ``messages`` holds the
whole conversation. The ``hidden`` split (HuMob users whose targets are unknown) has no assistant message.

Long prompts: with ``max_input_tokens`` and a tokenizer, the oldest input days (whole days) are dropped until the
prompt fits; the dropped days and rows are counted per split, and a sample that does not fit even without input days is
dropped and counted. The header line then starts the observed window the day after the last dropped day.

All strings are built with Arrow compute kernels inside ``datasets.Dataset.map(batched=True)``; the row selection (day
ranges, windows) is vectorised NumPy on the flat record arrays, so no Python loop runs per user or per record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..preprocess import SPLITS, PreparedGrid
from ..publish import METADATA_FILE, PreparedDataset, load_prepared, write_dataset
from ..schema import HIDDEN_CELL, RowAccount

__all__ = [
    "ANSWER_STYLES",
    "HIDDEN_MARK",
    "HUMOB_QA_CONFIG",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_TEMPLATE",
    "HumobQAConfig",
    "answer_json",
    "answer_opening",
    "answer_separators",
    "build_humob_qa",
    "built_config",
    "format_records",
    "parse_records",
    "system_prompt",
    "user_message",
]

logger = logging.getLogger(__name__)

HUMOB_QA_CONFIG = "humob-qa"  # the published config name: datasets.load_dataset(folder, "humob-qa")
HIDDEN_MARK = f"{HIDDEN_CELL} {HIDDEN_CELL}"  # the x y of an asked slot in a user message
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Our own wording. Fields: grid_size, first_cell, last_cell, slots, minutes, last_slot, last_slot_time, weekday_sentence.
SYSTEM_PROMPT_TEMPLATE = (
    "You predict where a person will be in a city. The city is a {grid_size} x {grid_size} grid of cells numbered from "
    "{first_cell} to {last_cell}: x grows to the right (east), y grows downwards (south), so cell {first_cell} "
    "{first_cell} is the top-left (north-west) corner. A day has {slots} slots of {minutes} minutes: t=0 is "
    "00:00-00:{minutes:02d}, t={last_slot} is {last_slot_time}-24:00. Days are numbered d.{weekday_sentence} Each line "
    "`d t x y` is one record: on day d during slot t the person was in cell x y. Lines `d t {hidden} {hidden}` are the "
    "slots to predict. Answer ONLY with JSON {{\"prediction\": [[d,t,x,y], ...]}}: exactly one entry per asked line, "
    "in the asked order, with its d and t."
)


def system_prompt(grid_size: int = 200, coordinate_base: int = 1, slots_per_day: int = 48,
                  day0_weekday: int | None = None) -> str:
    """The system message for a grid of ``grid_size`` cells per side whose cells are numbered from
    ``coordinate_base``, with ``slots_per_day`` slots per day; ``day0_weekday`` (0 = Monday) adds which weekday day 0
    is."""
    minutes = 1440 // int(slots_per_day)
    last_start = (int(slots_per_day) - 1) * minutes
    weekday = "" if day0_weekday is None else f" Day 0 is a {_WEEKDAYS[int(day0_weekday) % 7]}."
    return SYSTEM_PROMPT_TEMPLATE.format(
        grid_size=int(grid_size), first_cell=int(coordinate_base), last_cell=int(coordinate_base) + int(grid_size) - 1,
        slots=int(slots_per_day), minutes=minutes, last_slot=int(slots_per_day) - 1,
        last_slot_time=f"{last_start // 60:02d}:{last_start % 60:02d}", weekday_sentence=weekday, hidden=HIDDEN_CELL,
    )


SYSTEM_PROMPT = system_prompt(day0_weekday=0)  # the HuMob grid: 200 x 200 cells from 1, 48 slots, day 0 a Monday

# How the answer JSON is spaced: `(item, key)` separators. "compact" writes the fewest characters, and with tokenizers
# that split digits from spaces and punctuation (Llama-3) its cells are the same tokens as in the prompt's rows.
# "spaced" is `json.dumps`' default; with a byte-level BPE that merges a leading space into numbers (` 121`, as one
# trained on the corpus does) a cell of the answer is then the very token of the prompt's `d t x y` rows, which makes
# copying a cell from the prompt a same-token lookup (measured on the demo city in the README).
ANSWER_STYLES = {"compact": (",", ":"), "spaced": (", ", ": ")}


# ----------------------------------------------------------------------------------------------------------------------
# plain-Python reference helpers (the builder produces exactly these strings, vectorised)


def _ints(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    if len({len(a) for a in out}) > 1:
        raise ValueError(f"d, t, x, y must have the same length, got {[len(a) for a in out]}")
    return out


def format_records(d, t, x, y) -> str:
    """Records as user-message lines: one ``d t x y`` per line (asked slots: pass ``x = y = 999``)."""
    d, t, x, y = _ints(d, t, x, y)
    return "\n".join(f"{a} {b} {c} {e}" for a, b, c, e in zip(d.tolist(), t.tolist(), x.tolist(), y.tolist()))


def answer_separators(style: str = "compact") -> tuple[str, str]:
    """The ``(item, key)`` separators of an answer style, as ``json.dumps(separators=...)`` takes them."""
    try:
        return ANSWER_STYLES[style]
    except (KeyError, TypeError):
        raise ValueError(f"answer_style must be one of {sorted(ANSWER_STYLES)}, got {style!r}") from None


def answer_opening(style: str = "compact") -> str:
    """How an answer in ``style`` begins, up to its list of entries: ``{"prediction":[`` or ``{"prediction": [``."""
    return '{"prediction"' + answer_separators(style)[1] + "["


def answer_json(d, t, x, y, style: str = "compact") -> str:
    """The assistant answer: JSON ``{"prediction":[[d,t,x,y],...]}`` without spaces (``style="compact"``) or
    ``{"prediction": [[d, t, x, y], ...]}`` (``style="spaced"``)."""
    d, t, x, y = _ints(d, t, x, y)
    return json.dumps({"prediction": np.stack([d, t, x, y], axis=1).tolist()}, separators=answer_separators(style))


def _days_text(lo: int, hi: int, capital: bool) -> str:
    word = ("Day" if lo == hi else "Days") if capital else ("day" if lo == hi else "days")
    return f"{word} {lo}" if lo == hi else f"{word} {lo}-{hi}"


def _header(in_lo: int, in_hi: int, ask_lo: int, ask_hi: int) -> str:
    observed = "No days observed" if in_lo > in_hi else _days_text(in_lo, in_hi, True) + " observed"
    return f"{observed}; predict {_days_text(ask_lo, ask_hi, False)}."


def user_message(records, asked, input_days: tuple[int, int], predict_days: tuple[int, int]) -> str:
    """A user message: the header line, the ``records`` (``(n, 4)`` d t x y) and the ``asked`` slots (``(m, 2)`` d t).

    ``input_days`` is the observed window written in the header (``lo > hi``: "No days observed"), ``predict_days`` the
    asked days.
    """
    records = np.asarray(records, dtype=np.int64).reshape(-1, 4)
    asked = np.asarray(asked, dtype=np.int64).reshape(-1, 2)
    lines = [_header(int(input_days[0]), int(input_days[1]), int(predict_days[0]), int(predict_days[1]))]
    if len(records):
        lines.append(format_records(*records.T))
    if len(asked):
        hidden = np.full(len(asked), HIDDEN_CELL)
        lines.append(format_records(asked[:, 0], asked[:, 1], hidden, hidden))
    return "\n".join(lines)


_RECORD = re.compile(r"^\s*(\d+) (\d+) (\d+) (\d+)\s*$", re.MULTILINE)


def parse_records(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a user message back: ``(records, asked)``, an ``(n, 4)`` int64 array of the ``d t x y`` records and an
    ``(m, 2)`` int64 array of the asked ``d t`` slots (lines ``d t 999 999``), both in message order. Lines that are
    not four integers (the header) are ignored."""
    rows = np.array(_RECORD.findall(text), dtype=np.int64).reshape(-1, 4)
    hidden = (rows[:, 2] == HIDDEN_CELL) & (rows[:, 3] == HIDDEN_CELL)
    return rows[~hidden], rows[hidden][:, :2]


# ----------------------------------------------------------------------------------------------------------------------
# configuration


def built_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The :class:`HumobQAConfig` fields a humob-qa folder was built with (``config`` of its ``hf_mobility.json``), or
    ``None`` when the folder does not record them (not a local build of :func:`build_humob_qa`)."""
    try:
        config = json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def _day_range(name: str, value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if not m:
            raise ValueError(f"{name}={value!r} is not allowed; expected 'FIRST-LAST' (e.g. '60-74'), a single day "
                             "or a (first, last) pair")
        value = (int(m.group(1)), int(m.group(2) or m.group(1)))
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not allowed; expected a (first, last) pair of days") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}={value!r} is not allowed; expected two ints >= 0")
    if lo > hi:
        raise ValueError(f"{name}={value!r} is not allowed; the first day is after the last (ranges are inclusive)")
    return int(lo), int(hi)


def _user_ranges(value) -> dict[str, tuple[int, int]] | None:
    if value is None:
        return None
    if isinstance(value, str):  # "train=0-79999,validation=80000-89999"
        parsed = {}
        for part in (p.strip() for p in value.split(",") if p.strip()):
            split, sep, rng = part.partition("=")
            if not sep:
                raise ValueError(f"user_ranges={value!r} is not allowed; expected 'split=FIRST-LAST,...'")
            parsed[split.strip()] = rng.strip()
        value = parsed
    if not isinstance(value, dict) or not value:
        raise ValueError(f"user_ranges={value!r} is not allowed; expected a non-empty dict split -> (first uid, "
                         "last uid)")
    bad = [k for k in value if k not in SPLITS]
    if bad:
        raise ValueError(f"user_ranges has split(s) {bad}; allowed: {list(SPLITS)} (hidden users keep their split)")
    out = {split: _day_range(f"user_ranges[{split!r}]", rng) for split, rng in value.items()}
    spans = sorted((lo, hi, split) for split, (lo, hi) in out.items())
    for (lo1, hi1, s1), (lo2, _, s2) in zip(spans, spans[1:]):
        if lo2 <= hi1:
            raise ValueError(f"user_ranges of {s1!r} ({lo1}-{hi1}) and {s2!r} (from {lo2}) overlap")
    return out


@dataclass
class HumobQAConfig:
    """What :func:`build_humob_qa` builds.

    Args:
        input_days (`tuple[int, int]` or `str`, *optional*):
            Inclusive day range of the input records (``(0, 59)`` or ``"0-59"``). Default: the input days of the
            prepared dataset. Must end before ``predict_days`` starts.
        predict_days (`tuple[int, int]` or `str`, *optional*):
            Inclusive range of the target days to ask, inside the prepared target days (default: all of them).
        max_input_tokens (`int`, *optional*):
            Token budget of the prompt (system + user messages, with the tokenizer's chat template when it has one).
            Longer prompts lose their oldest input days, whole days, until they fit; a sample that does not fit
            without input days is dropped. Both are counted. Needs ``tokenizer``.
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*):
            A tokenizer object or a local folder for `AutoTokenizer.from_pretrained`. Required with
            ``max_input_tokens``; without it, only used to report prompt and answer token counts.
        user_ranges (`dict[str, tuple[int, int]]` or `str`, *optional*):
            Re-split the users of the train/validation/test splits by inclusive uid ranges, e.g. ``{"train": (0,
            79999), "validation": (80000, 89999), "test": (90000, 99999)}`` or ``"train=0-79999,..."``. Users outside
            every range are dropped and counted; hidden users keep the ``hidden`` split. Default: the prepared splits.
        windows_per_user (`int`, *optional*, defaults to 1):
            Train split only (data augmentation for small demos): up to ``windows_per_user - 1`` extra rows per user
            that ask earlier windows of the same length, sliding back by the window length (the input range slides
            with it, clipped at the first day of the data). Windows without asked or input records are skipped and
            counted.
        shifted_copies (`int`, *optional*, defaults to 0):
            Train split only (data augmentation for models trained from scratch): ``shifted_copies`` extra copies of
            every train row in which all the row's cells, its input records and its answer alike, move by one offset
            ``(shift_x, shift_y)`` drawn uniformly among those that keep every cell of the row on the grid. A model
            trained from scratch on a few hundred users otherwise learns the training users' places by heart instead
            of reading the cells of its prompt; with the copies, reading the prompt is the only way to lower the loss.
            Keep 0 for a pretrained LLM on a real city, whose absolute positions carry meaning. Measured on the demo
            city in the README.
        answer_style (`str`, *optional*, defaults to `"compact"`):
            How the answer JSON is spaced (:data:`ANSWER_STYLES`): ``"compact"`` (``{"prediction":[[60,5,121,174]]}``)
            or ``"spaced"`` (``{"prediction": [[60, 5, 121, 174]]}``). Recorded in the metadata; prediction reads it
            there and constrains the answers to the same style.
        seed (`int`, *optional*, defaults to 0):
            Seeds the draw of the ``shifted_copies`` offsets; the build is deterministic for a given seed.
        batch_size (`int`, *optional*, defaults to 1000):
            Rows per batch of ``Dataset.map``.
        num_proc (`int`, *optional*):
            Worker processes of ``Dataset.map``.
    """

    input_days: tuple[int, int] | None = None
    predict_days: tuple[int, int] | None = None
    max_input_tokens: int | None = None
    tokenizer: Any = field(default=None, repr=False)
    user_ranges: dict[str, tuple[int, int]] | None = None
    windows_per_user: int = 1
    shifted_copies: int = 0
    answer_style: str = "compact"
    seed: int = 0
    batch_size: int = 1000
    num_proc: int | None = None

    def __post_init__(self):
        self.input_days = _day_range("input_days", self.input_days)
        self.predict_days = _day_range("predict_days", self.predict_days)
        if self.input_days and self.predict_days and self.input_days[1] >= self.predict_days[0]:
            raise ValueError(f"input_days={self.input_days} overlap or follow predict_days={self.predict_days}; the "
                             "input days must end before the first predicted day")
        self.user_ranges = _user_ranges(self.user_ranges)
        answer_separators(self.answer_style)
        for name, minimum in (("windows_per_user", 1), ("shifted_copies", 0), ("seed", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name}={value!r} is not allowed; expected an int >= {minimum}")
        for name in ("max_input_tokens", "num_proc"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed; expected None or an int >= 1")
        if self.max_input_tokens is not None and self.tokenizer is None:
            raise ValueError(f"max_input_tokens={self.max_input_tokens} needs a tokenizer (an object or a local "
                             "folder for AutoTokenizer) to count prompt tokens; tokenizer is None")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            if not Path(self.tokenizer).is_dir():
                raise ValueError(f"tokenizer={str(self.tokenizer)!r} is not a folder; expected a tokenizer object or a "
                                 "local folder loadable by AutoTokenizer.from_pretrained")
        elif self.tokenizer is not None and not callable(getattr(self.tokenizer, "encode", None)):
            raise ValueError(f"tokenizer={type(self.tokenizer).__name__} is not allowed; expected a tokenizer with an "
                             "`encode` method or a local folder")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (the tokenizer as its name or path)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        tok = self.tokenizer
        if tok is not None and not isinstance(tok, (str, os.PathLike)):
            tok = getattr(tok, "name_or_path", None) or type(tok).__name__
        out["tokenizer"] = None if tok is None else str(tok)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# token counting


_SYS_MARK, _USER_MARK = "\u2063HUMOBSYSTEM\u2063", "\u2063HUMOBUSER\u2063"


class _TokenCounter:
    """Exact prompt token counts: ``prefix + user + suffix`` through the tokenizer, where prefix/suffix come from the
    chat template rendered once with placeholders (plain system + user token counts without a template)."""

    def __init__(self, tokenizer, system: str):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.prefix, self.suffix, self.offset = "", "", 0
        self.uses_template = False
        if getattr(tokenizer, "chat_template", None):
            try:
                rendered = tokenizer.apply_chat_template(
                    [{"role": "system", "content": _SYS_MARK}, {"role": "user", "content": _USER_MARK}],
                    tokenize=False, add_generation_prompt=True)
            except Exception as err:  # noqa: BLE001 - any template error: count without it
                logger.warning("the chat template failed on a system + user conversation (%s); counting the message "
                               "tokens without it", err)
                rendered = ""
            if isinstance(rendered, str) and rendered.count(_SYS_MARK) == 1 and rendered.count(_USER_MARK) == 1 and (
                    rendered.index(_SYS_MARK) < rendered.index(_USER_MARK)):
                head, self.suffix = rendered.split(_USER_MARK)
                self.prefix = head.replace(_SYS_MARK, system)
                self.uses_template = True
        if not self.uses_template:
            self.offset = int(self.count([system])[0])

    def count(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
            return np.fromiter((len(e) for e in encode(texts, add_special_tokens=False)), np.int64, len(texts))
        return np.array([len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts], dtype=np.int64)

    def prompt_tokens(self, user_texts: pa.Array) -> np.ndarray:
        if self.uses_template:
            user_texts = pc.binary_join_element_wise(self.prefix, user_texts, self.suffix, "")
        return self.count(user_texts.to_pylist()) + self.offset


# ----------------------------------------------------------------------------------------------------------------------
# vectorised helpers


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """Values (int64) and per-row lengths of a list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return values, pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])``."""
    lengths = hi - lo
    off = _offsets(lengths)
    seg = np.repeat(np.arange(len(lo)), lengths)
    return lo[seg] + (np.arange(off[-1]) - off[seg])


def _list(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths).astype(np.int32)), pa.array(values, pa.int32()))


class _Context:
    """What the batch function needs: the system text, number strings, the token counter and the budget."""

    def __init__(self, system: str, max_number: int, counter: _TokenCounter | None, budget: int | None,
                 answer_style: str = "compact"):
        self.system = system
        self.item_sep = answer_separators(answer_style)[0]
        self.opening = answer_opening(answer_style)
        self.numbers = pa.array([str(i) for i in range(max_number + 1)], pa.string())
        self.counter = counter
        self.budget = budget

    def s(self, values: np.ndarray) -> pa.Array:
        return self.numbers.take(pa.array(np.asarray(values, dtype=np.int64)))

    def days_text(self, lo: np.ndarray, hi: np.ndarray, capital: bool) -> pa.Array:
        one, many = ("Day ", "Days ") if capital else ("day ", "days ")
        single = pc.binary_join_element_wise(one, self.s(lo), "")
        multi = pc.binary_join_element_wise(many, self.s(lo), "-", self.s(hi), "")
        return pc.if_else(pa.array(lo == hi), single, multi)

    def headers(self, in_lo, in_hi, ask_lo, ask_hi) -> pa.Array:
        empty = in_lo > in_hi
        observed = pc.if_else(pa.array(empty), "No days observed",
                              pc.binary_join_element_wise(self.days_text(np.where(empty, in_hi, in_lo), in_hi, True),
                                                          " observed", ""))
        return pc.binary_join_element_wise(observed, "; predict ", self.days_text(ask_lo, ask_hi, False), ".", "")


_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_OUTPUT_SCHEMA = pa.schema([
    ("uid", pa.int64()),
    ("window", pa.int64()),
    ("copy", pa.int64()),
    ("shift_x", pa.int64()),
    ("shift_y", pa.int64()),
    ("messages", pa.list_(_MESSAGE)),
    ("prompt", pa.list_(_MESSAGE)),
    ("completion", pa.list_(_MESSAGE)),
    ("num_input_rows", pa.int64()),
    ("num_asked", pa.int64()),
    ("input_days_dropped", pa.int64()),
    ("_input_rows_dropped", pa.int64()),
    ("_over_budget", pa.bool_()),
    ("_prompt_tokens", pa.int64()),
    ("_completion_tokens", pa.int64()),
])
_PRIVATE = [name for name in _OUTPUT_SCHEMA.names if name.startswith("_")]


def _messages(roles: list[str], contents: list[pa.Array], n: int) -> pa.ListArray:
    """A list<struct<role, content>> column: row i holds the messages ``contents[j][i]`` with ``roles[j]``."""
    k = len(roles)
    if k == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], _MESSAGE))
    flat = pc.take(pa.concat_arrays([c.cast(pa.string()) for c in contents]),
                   pa.array((np.arange(n)[:, None] + np.arange(k)[None, :] * n).ravel()))
    role = pa.array(np.tile(np.array(roles, dtype=object), n), pa.string())
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                    pa.StructArray.from_arrays([role, flat], fields=list(_MESSAGE)))



def _first_guess(rows, excess, n_days, day_off, day_row, lines_in, ctx) -> np.ndarray:
    """Fewest oldest days of each sample whose own tokens cover its excess (exact when the tokenizer's pre-tokenizer
    splits at newlines, as byte-level BPEs do); all days when none does."""
    guess = n_days[rows].copy()
    has = n_days[rows] > 0
    r = rows[has]
    if not len(r):
        return guess
    nd = n_days[r]
    days = _ranges(day_off[r], day_off[r + 1])
    starts, ends = day_row[days], day_row[days + 1]
    blocks = pc.binary_join(pa.ListArray.from_arrays(
        pa.array(_offsets(ends - starts).astype(np.int32)),
        pc.binary_join_element_wise(lines_in.take(pa.array(_ranges(starts, ends))), "\n", "")), "")
    day_tokens = ctx.counter.count(blocks.to_pylist())
    seg_start = _offsets(nd)[:-1]
    cs = np.cumsum(day_tokens)
    cum = cs - np.repeat(np.where(seg_start > 0, cs[np.maximum(seg_start - 1, 0)], 0), nd)
    pos = np.arange(len(days)) - np.repeat(seg_start, nd)
    cand = np.where(cum >= np.repeat(excess[has], nd), pos + 1, np.iinfo(np.int64).max)
    guess[has] = np.minimum(np.minimum.reduceat(cand, seg_start), nd)
    return guess


def _render_batch(batch: pa.Table, ctx: _Context, answered: bool) -> pa.Table:
    """Render a batch of planned samples into chat rows, dropping the oldest input days of prompts over budget."""
    n = batch.num_rows
    col = {c: batch.column(c).to_numpy().astype(np.int64) for c in ("uid", "window", "copy", "shift_x", "shift_y",
                                                                    "in_lo", "in_hi", "ask_lo", "ask_hi")}
    in_d, in_len = _flat(batch.column("in_d"))
    in_t, _ = _flat(batch.column("in_t"))
    in_x, _ = _flat(batch.column("in_x"))
    in_y, _ = _flat(batch.column("in_y"))
    ask_d, ask_len = _flat(batch.column("ask_d"))
    ask_t, _ = _flat(batch.column("ask_t"))
    in_off, ask_off = _offsets(in_len), _offsets(ask_len)
    s = ctx.s
    lines_in = pc.binary_join_element_wise(s(in_d), s(in_t), s(in_x), s(in_y), " ")
    lines_ask = pc.binary_join_element_wise(s(ask_d), s(ask_t), HIDDEN_MARK, " ")

    # days of every sample's input: first and end row of each distinct day, oldest first (samples are contiguous, so a
    # day ends where the next day starts, whichever sample that belongs to)
    parent = np.repeat(np.arange(n), in_len)
    new_day = np.ones(len(in_d), dtype=bool)
    new_day[1:] = (in_d[1:] != in_d[:-1]) | (parent[1:] != parent[:-1])
    day_row = np.append(np.flatnonzero(new_day), len(in_d))  # + sentinel: day_row[i + 1] ends day i
    n_days = np.bincount(parent[day_row[:-1]], minlength=n).astype(np.int64)
    day_off = _offsets(n_days)
    in_d_pad = np.append(in_d, 0)

    def user_texts(rows: np.ndarray, k: np.ndarray) -> tuple[pa.Array, np.ndarray]:
        """User messages of samples ``rows`` with their ``k`` oldest input days dropped; and the kept input rows."""
        first = np.where(k < n_days[rows], day_row[day_off[rows] + np.minimum(k, n_days[rows])], in_off[rows + 1])
        last_dropped = in_d_pad[day_row[np.maximum(day_off[rows] + k - 1, 0)]]
        lo = np.where(k > 0, last_dropped + 1, col["in_lo"][rows])
        headers = ctx.headers(lo, col["in_hi"][rows], col["ask_lo"][rows], col["ask_hi"][rows])
        m = len(rows)
        n_in = in_off[rows + 1] - first
        length = 1 + n_in + ask_len[rows]
        off = _offsets(length)
        seg = np.repeat(np.arange(m), length)
        pos = np.arange(off[-1]) - off[seg]
        index = np.where(pos == 0, seg,
                         np.where(pos <= n_in[seg], m + first[seg] + pos - 1,
                                  m + len(in_d) + ask_off[rows][seg] + pos - 1 - n_in[seg]))
        pool = pa.concat_arrays([headers, lines_in.cast(pa.string()), lines_ask.cast(pa.string())])
        lists = pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pool.take(pa.array(index)))
        return pc.binary_join(lists, "\n"), n_in

    k = np.zeros(n, dtype=np.int64)
    users, n_in = user_texts(np.arange(n), k)
    tokens = np.full(n, -1, dtype=np.int64)
    over = np.zeros(n, dtype=bool)
    if ctx.counter is not None and n:
        tokens = ctx.counter.prompt_tokens(users)
    pending = np.flatnonzero(tokens > ctx.budget) if ctx.budget is not None else np.zeros(0, dtype=np.int64)
    if len(pending):
        k[pending] = _first_guess(pending, tokens[pending] - ctx.budget, n_days, day_off, day_row, lines_in, ctx)
        while len(pending):  # check exactly; one more day while still over budget
            counted = ctx.counter.prompt_tokens(user_texts(pending, k[pending])[0])
            tokens[pending] = counted
            still = counted > ctx.budget
            exhausted = still & (k[pending] >= n_days[pending])
            over[pending[exhausted]] = True
            pending = pending[still & ~exhausted]
            k[pending] += 1
        changed = np.flatnonzero((k > 0) & ~over)
        if len(changed):
            texts, kept_in = user_texts(changed, k[changed])
            take = np.arange(n)
            take[changed] = n + np.arange(len(changed))
            users = pa.concat_arrays([users, texts]).take(pa.array(take))
            n_in[changed] = kept_in

    # answers
    if answered:
        ask_x, _ = _flat(batch.column("ask_x"))
        ask_y, _ = _flat(batch.column("ask_y"))
        sep = ctx.item_sep
        items = pc.binary_join_element_wise("[", s(ask_d), sep, s(ask_t), sep, s(ask_x), sep, s(ask_y), "]", "")
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(ask_off.astype(np.int32)), items), sep)
        answers = pc.binary_join_element_wise(ctx.opening, joined, "]}", "")
    else:
        answers = pa.array([""] * n, pa.string())
    system = pa.array([ctx.system] * n, pa.string())
    completion_tokens = np.full(n, -1, dtype=np.int64)
    if ctx.counter is not None and answered and n:
        completion_tokens = ctx.counter.count(answers.to_pylist())
    roles = ["system", "user", "assistant"] if answered else ["system", "user"]
    contents = [system, users, answers] if answered else [system, users]
    return pa.table({
        "uid": pa.array(col["uid"]),
        "window": pa.array(col["window"]),
        "copy": pa.array(col["copy"]),
        "shift_x": pa.array(col["shift_x"]),
        "shift_y": pa.array(col["shift_y"]),
        "messages": _messages(roles, contents, n),
        "prompt": _messages(["system", "user"], [system, users], n),
        "completion": _messages(["assistant"], [answers], n) if answered else _messages([], [], n),
        "num_input_rows": pa.array(n_in.astype(np.int64)),
        "num_asked": pa.array(ask_len),
        "input_days_dropped": pa.array(np.where(over, 0, k)),
        "_input_rows_dropped": pa.array(np.where(over, 0, in_len - n_in)),
        "_over_budget": pa.array(over),
        "_prompt_tokens": pa.array(tokens),
        "_completion_tokens": pa.array(completion_tokens),
    }, schema=_OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------------------------------------------------
# planning: which records each sample shows and asks (vectorised over all users of a split)


@dataclass
class _Days:
    input: tuple[int, int]
    predict: tuple[int, int]
    data_start: int  # first day of the data: earlier windows never reach before it


_PLAN_USERS = 10_000  # users planned at a time (bounds the memory of the flat timeline arrays)


def _plan(table: pa.Table, days: _Days, windows: int, answered: bool) -> tuple[pa.Table, dict[str, int]]:
    """`_plan_chunk` over slices of ``_PLAN_USERS`` users: the plan table and the summed counts."""
    plans, counts = [], {}
    for start in range(0, max(table.num_rows, 1), _PLAN_USERS):
        plan, part = _plan_chunk(table.slice(start, _PLAN_USERS), days, windows, answered)
        plans.append(plan)
        for key, value in part.items():
            counts[key] = max(counts.get(key, 0), value) if key == "extra_windows_possible" else (
                counts.get(key, 0) + value)
    return pa.concat_tables(plans).combine_chunks(), counts


def _plan_chunk(table: pa.Table, days: _Days, windows: int, answered: bool) -> tuple[pa.Table, dict[str, int]]:
    """One planned row per (user, window): the day ranges, the input records and the asked records as list columns.

    Each user's timeline is its input records followed by its target records (both sorted by d, t; input days come
    before target days). Window ``w`` asks the predicted days shifted back by ``w`` window lengths; its input range
    shifts with it, clipped at the first day of the data. Input records are real cells only; asked records keep 999
    for hidden users.
    """
    n = table.num_rows
    uid = table.column("uid").to_numpy().astype(np.int64)
    tl_cols, parts = [], {}
    for prefix in ("input", "target"):
        for c in "dtxy":
            parts[prefix, c] = _flat(table.column(f"{prefix}_{c}"))
    in_len, tg_len = parts["input", "d"][1], parts["target", "d"][1]
    tl_len = in_len + tg_len
    tl_off = _offsets(tl_len)
    dest_in = np.repeat(tl_off[:-1], in_len) + (np.arange(in_len.sum()) - np.repeat(_offsets(in_len)[:-1], in_len))
    dest_tg = np.repeat(tl_off[:-1] + in_len, tg_len) + (np.arange(tg_len.sum())
                                                         - np.repeat(_offsets(tg_len)[:-1], tg_len))
    for c in "dtxy":
        values = np.empty(tl_off[-1], dtype=np.int32)
        values[dest_in] = parts["input", c][0]
        values[dest_tg] = parts["target", c][0]
        tl_cols.append(values)
    d, t, x, y = tl_cols
    key_base = np.int64(1 << 20)
    key = np.repeat(np.arange(n, dtype=np.int64), tl_len) * key_base + d
    real = np.flatnonzero((x != HIDDEN_CELL) & (y != HIDDEN_CELL))
    key_real = key[real]

    (i_lo, i_hi), (p_lo, p_hi) = days.input, days.predict
    width = p_hi - p_lo + 1
    shifts = np.array([w * width for w in range(windows) if i_hi - w * width >= days.data_start], dtype=np.int64)
    su = np.repeat(np.arange(n, dtype=np.int64), len(shifts))
    sw = np.tile(np.arange(len(shifts), dtype=np.int64), n)
    ss = shifts[sw]
    in_lo, in_hi = np.maximum(i_lo - ss, days.data_start), i_hi - ss
    ask_lo, ask_hi = p_lo - ss, p_hi - ss
    a0 = np.searchsorted(key, su * key_base + ask_lo, "left")
    a1 = np.searchsorted(key, su * key_base + ask_hi, "right")
    r0 = np.searchsorted(key_real, su * key_base + in_lo, "left")
    r1 = np.searchsorted(key_real, su * key_base + in_hi, "right")
    n_ask, n_in = a1 - a0, r1 - r0
    extra = sw > 0
    no_ask = n_ask == 0
    no_input_extra = extra & ~no_ask & (n_in == 0)
    keep = ~no_ask & ~no_input_extra
    counts = {
        "users": n,
        "real_no_asked_rows": int((no_ask & ~extra).sum()),
        "real_without_input_rows": int((~extra & ~no_ask & (n_in == 0)).sum()),
        "extra_candidates": int(extra.sum()),
        "extra_no_asked_rows": int((no_ask & extra).sum()),
        "extra_no_input_rows": int(no_input_extra.sum()),
        "extra_windows_possible": max(len(shifts) - 1, 0),
    }
    a0, a1, r0, r1 = a0[keep], a1[keep], r0[keep], r1[keep]
    asked = _ranges(a0, a1)
    shown = real[_ranges(r0, r1)]
    plan = pa.table({
        "uid": pa.array(uid[su[keep]]),
        "window": pa.array(sw[keep]),
        "copy": pa.array(np.zeros(int(keep.sum()), dtype=np.int64)),
        "shift_x": pa.array(np.zeros(int(keep.sum()), dtype=np.int64)),
        "shift_y": pa.array(np.zeros(int(keep.sum()), dtype=np.int64)),
        "in_lo": pa.array(in_lo[keep]),
        "in_hi": pa.array(in_hi[keep]),
        "ask_lo": pa.array(ask_lo[keep]),
        "ask_hi": pa.array(ask_hi[keep]),
        "in_d": _list(d[shown], r1 - r0),
        "in_t": _list(t[shown], r1 - r0),
        "in_x": _list(x[shown], r1 - r0),
        "in_y": _list(y[shown], r1 - r0),
        "ask_d": _list(d[asked], a1 - a0),
        "ask_t": _list(t[asked], a1 - a0),
        "ask_x": _list(x[asked], a1 - a0),
        "ask_y": _list(y[asked], a1 - a0),
    })
    if answered and len(asked) and bool(np.any(x[asked] == HIDDEN_CELL)):
        raise ValueError("an answered split asks hidden (999) cells; the prepared dataset mixes hidden targets into "
                         "train/validation/test")
    return plan, counts


def _shifted_copies(plan: pa.Table, copies: int, lo: int, hi: int, rng: np.random.Generator) -> pa.Table:
    """``plan`` followed by ``copies`` copies of each of its rows whose input and asked cells all move by one offset per
    copy, drawn uniformly among the offsets that keep every cell of the row within ``lo..hi`` (columns ``copy``,
    ``shift_x``, ``shift_y``). Rows without any cell are copied unmoved."""
    n = plan.num_rows
    if copies == 0 or n == 0:
        return plan
    parts = [plan]
    moved = {}
    for axis in "xy":
        cells = {}
        for kind in ("in", "ask"):
            values, lengths = _flat(plan.column(f"{kind}_{axis}"))
            cells[kind] = (values.astype(np.int64), lengths)
        both = np.concatenate([cells["in"][0], cells["ask"][0]])
        owner = np.concatenate([np.repeat(np.arange(n), cells["in"][1]), np.repeat(np.arange(n), cells["ask"][1])])
        smallest = np.full(n, hi, dtype=np.int64)
        largest = np.full(n, lo, dtype=np.int64)
        np.minimum.at(smallest, owner, both)
        np.maximum.at(largest, owner, both)
        has = np.bincount(owner, minlength=n) > 0
        first = np.where(has, lo - smallest, 0)  # the allowed offsets: first..last (0 is always one of them)
        last = np.where(has, hi - largest, 0)
        if np.any(first > 0) or np.any(last < 0):
            raise ValueError(f"shifted_copies: a train row holds a cell {axis} outside the grid {lo}..{hi}")
        moved[axis] = (cells, first, last)
    for copy in range(1, copies + 1):
        table = plan
        shifts = {}
        for axis in "xy":
            cells, first, last = moved[axis]
            shift = first + np.floor(rng.random(n) * (last - first + 1)).astype(np.int64)
            shifts[axis] = shift
            for kind in ("in", "ask"):
                values, lengths = cells[kind]
                column = f"{kind}_{axis}"
                new = _list((values + np.repeat(shift, lengths)).astype(np.int32), lengths)
                table = table.set_column(table.schema.get_field_index(column), column, new)
        for name, values in (("copy", np.full(n, copy, dtype=np.int64)), ("shift_x", shifts["x"]),
                             ("shift_y", shifts["y"])):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
        parts.append(table)
    return pa.concat_tables(parts).combine_chunks()


def _map(plan: pa.Table, ctx: _Context, answered: bool, config: HumobQAConfig, desc: str) -> pa.Table:
    if plan.num_rows == 0:  # `map` does not call the function on an empty dataset, so the columns would be missing
        return _render_batch(plan, ctx, answered)
    ds = datasets.Dataset(datasets.table.InMemoryTable(plan))
    fingerprint = f"humob-qa-{desc}-{plan.num_rows}-{time.time_ns()}".replace(" ", "-")
    out = ds.with_format("arrow").map(
        _render_batch,
        batched=True,
        batch_size=config.batch_size,
        fn_kwargs={"ctx": ctx, "answered": answered},
        remove_columns=ds.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
        num_proc=config.num_proc if config.num_proc and config.num_proc > 1 else None,
        desc=f"humob-qa {desc}",
    )
    return out.with_format(None).data.table.cast(_OUTPUT_SCHEMA)


# ----------------------------------------------------------------------------------------------------------------------
# the builder


class _InMemoryGrid:
    """The `PreparedDataset` interface over a `prepare_grid` result that was not written to disk."""

    kind = "grid"

    def __init__(self, grid: PreparedGrid):
        self.grid, self.metadata, self.path = grid, grid.metadata, Path("<in-memory prepare_grid result>")

    def splits(self, config: str) -> list[str]:
        return sorted(self.grid.samples)

    def table(self, config: str, split: str = "train") -> pa.Table:
        return self.grid.samples[split]


def _resolve_days(config: HumobQAConfig, meta: dict) -> _Days:
    if "predict_days" not in meta or "input_days" not in meta:
        raise ValueError("the prepared grid dataset has no input_days/predict_days metadata; prepare it again with "
                         "`mobility data prepare`")
    pi0, pi1 = (int(v) for v in meta["input_days"])
    pp0, pp1 = (int(v) for v in meta["predict_days"])
    predict = config.predict_days or (pp0, pp1)
    if not pp0 <= predict[0] <= predict[1] <= pp1:
        raise ValueError(f"predict_days={predict[0]}-{predict[1]} lie outside the target days {pp0}-{pp1} of the "
                         "prepared dataset")
    inputs = config.input_days or (pi0, pi1)
    if inputs[0] < pi0:
        raise ValueError(f"input_days={inputs[0]}-{inputs[1]} start before the first day of the data ({pi0})")
    if inputs[1] >= predict[0]:
        raise ValueError(f"input_days={inputs[0]}-{inputs[1]} must end before the first predicted day {predict[0]}")
    return _Days(input=inputs, predict=predict, data_start=pi0)


def _resolve_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer={str(tokenizer)!r} could not be loaded with AutoTokenizer.from_pretrained: "
                         f"{err}") from None


def _source_splits(prepared: PreparedDataset, config: HumobQAConfig, account: RowAccount) -> dict[str, pa.Table]:
    available = prepared.splits("samples")
    if config.user_ranges is None:
        order = [s for s in (*SPLITS, "hidden") if s in available] + [s for s in available if s not in (*SPLITS,
                                                                                                      "hidden")]
        return {s: prepared.table("samples", s) for s in order}
    pooled = [prepared.table("samples", s) for s in SPLITS if s in available]
    if not pooled:
        raise ValueError(f"{prepared.path} has no train/validation/test samples to re-split with user_ranges")
    table = pa.concat_tables(pooled)
    table = table.take(pa.array(np.argsort(table.column("uid").to_numpy(), kind="stable")))
    uid = table.column("uid").to_numpy()
    out, inside = {}, np.zeros(len(uid), dtype=bool)
    for split in SPLITS:
        if split in config.user_ranges:
            lo, hi = config.user_ranges[split]
            member = (uid >= lo) & (uid <= hi)
            inside |= member
            out[split] = table.filter(pa.array(member))
    account.add(f"user ranges {config.user_ranges}", len(uid), int(inside.sum()),
                {"uid_outside_user_ranges": int((~inside).sum())},
                {f"{s}_users": t.num_rows for s, t in out.items()})
    if "hidden" in available:
        out["hidden"] = prepared.table("samples", "hidden")
    return out


def _stats(values: np.ndarray) -> dict[str, float] | None:
    values = values[values >= 0]
    if not len(values):
        return None
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1), "max": int(values.max())}


def build_humob_qa(
    data_dir_or_prepared: str | os.PathLike | PreparedDataset | PreparedGrid,
    out_dir: str | os.PathLike,
    config: HumobQAConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the Llama-3-8B-Mob Q&A rows of a prepared grid dataset and publish them as config ``humob-qa``.

    Args:
        data_dir_or_prepared (`str`, `os.PathLike`, [`~dataset_builders.publish.PreparedDataset`] or `PreparedGrid`):
            A grid dataset folder written by `mobility data prepare` (YJMob100K / HuMob), its `load_prepared`, or a
            `prepare_grid` result in memory.
        out_dir (`str` or `os.PathLike`):
            The dataset folder to write (replaced atomically): Parquet shards + a README card, so
            ``datasets.load_dataset(out_dir, "humob-qa")`` loads the splits.
        config ([`HumobQAConfig`], *optional*):
            Day ranges, token budget, user ranges and windows.
        progress (`bool`, *optional*, defaults to `True`):
            Show the `datasets` progress bars.

    Returns:
        `dict`: ``rows`` and ``users`` per split, ``truncation`` per split (samples truncated, input days and rows
        dropped, samples dropped over budget), ``dropped`` (totals per reason), ``windows``, ``shifted_copies``
        (copies per row and rows added, per split), ``tokens`` (prompt and
        answer token statistics per split, with a tokenizer), the day ranges, ``seconds``, ``out_dir`` and
        ``row_account``.

    Columns: ``uid``, ``window`` (0 = the real window; train rows of earlier windows count 1, 2, ...), ``copy`` (0 = the
    row as recorded; 1, 2, ... = its shifted copies), ``shift_x`` and ``shift_y`` (the offset of a copy's cells),
    ``messages`` (system, user, assistant; no assistant message in the ``hidden`` split), ``prompt`` (system + user),
    ``completion`` (the assistant message; empty for ``hidden``), ``num_input_rows``, ``num_asked``,
    ``input_days_dropped``.

    Raises:
        ValueError: the dataset is not a grid dataset, or the day ranges do not fit it.
    """
    t0 = time.perf_counter()
    config = config or HumobQAConfig()
    prepared = data_dir_or_prepared
    if isinstance(prepared, PreparedGrid):
        prepared = _InMemoryGrid(prepared)
    elif not isinstance(prepared, PreparedDataset):
        prepared = load_prepared(prepared)
    if prepared.kind != "grid":
        raise ValueError(f"{prepared.path} is a {prepared.kind!r} dataset; humob-qa needs a grid dataset (a folder "
                         "from `mobility data prepare --format yjmob`)")
    meta = prepared.metadata
    days = _resolve_days(config, meta)
    grid_size = int(meta.get("grid_size", 200))
    base = int(meta.get("coordinate_base", 1))
    slots = int(meta.get("slots_per_day", 48))
    system = system_prompt(grid_size, base, slots, meta.get("day0_weekday"))
    tokenizer = _resolve_tokenizer(config.tokenizer)
    counter = _TokenCounter(tokenizer, system) if tokenizer is not None else None
    account = RowAccount()
    sources = _source_splits(prepared, config, account)
    max_day = max([days.predict[1], HIDDEN_CELL, grid_size + base, slots]
                  + [int(pc.max(t.column("target_d").combine_chunks().flatten()).as_py() or 0)
                     for t in sources.values() if t.num_rows])
    ctx = _Context(system, max_day, counter, config.max_input_tokens, config.answer_style)

    tables: dict[str, pa.Table] = {}
    summary: dict[str, Any] = {"rows": {}, "users": {}, "truncation": {}, "windows": {}, "tokens": {},
                               "shifted_copies": {}}
    rng = np.random.default_rng(config.seed)
    was_disabled = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        for split, table in sources.items():
            answered = split != "hidden"
            windows = config.windows_per_user if split == "train" else 1
            plan, counts = _plan(table, days, windows, answered)
            copies = config.shifted_copies if split == "train" else 0
            if copies:
                plan = _shifted_copies(plan, copies, base, grid_size + base - 1, rng)
            out = _map(plan, ctx, answered, config, split)
            over = out.column("_over_budget").to_numpy(zero_copy_only=False)
            window = out.column("window").to_numpy()
            copy = out.column("copy").to_numpy()
            kept = out.filter(pa.array(~over)) if over.any() else out
            real, extra, shifted = (window == 0) & (copy == 0), (window > 0) & (copy == 0), copy > 0
            account.add(f"humob-qa {split}: users -> rows asking days {days.predict[0]}-{days.predict[1]}",
                        counts["users"], int((real & ~over).sum()),
                        {"no_asked_rows": counts["real_no_asked_rows"],
                         "prompt_over_token_budget": int((real & over).sum())},
                        {"kept_without_input_rows": counts["real_without_input_rows"]})
            if windows > 1:
                account.add(f"humob-qa {split}: extra windows (up to {windows - 1} per user)",
                            counts["extra_candidates"], int((extra & ~over).sum()),
                            {"window_without_asked_rows": counts["extra_no_asked_rows"],
                             "window_without_input_rows": counts["extra_no_input_rows"],
                             "prompt_over_token_budget": int((extra & over).sum())},
                            {"windows_possible_per_user": counts["extra_windows_possible"]})
            if copies:
                account.add(f"humob-qa {split}: shifted copies ({copies} per row, cells moved on the grid)",
                            int(shifted.sum()), int((shifted & ~over).sum()),
                            {"prompt_over_token_budget": int((shifted & over).sum())})
            dropped_days = kept.column("input_days_dropped").to_numpy()
            summary["truncation"][split] = {
                "samples_truncated": int((dropped_days > 0).sum()),
                "input_days_dropped": int(dropped_days.sum()),
                "input_rows_dropped": int(pc.sum(kept.column("_input_rows_dropped")).as_py() or 0),
                "samples_dropped_over_budget": int(over.sum()),
            }
            if counter is not None:
                summary["tokens"][split] = {
                    "prompt": _stats(kept.column("_prompt_tokens").to_numpy()),
                    "completion": _stats(kept.column("_completion_tokens").to_numpy()),
                }
            tables[split] = kept.drop_columns(_PRIVATE)
            summary["rows"][split] = tables[split].num_rows
            summary["users"][split] = len(np.unique(tables[split].column("uid").to_numpy()))
            if windows > 1:
                summary["windows"][split] = {"requested_per_user": windows,
                                             "extra_rows": int((extra & ~over).sum())}
            if copies:
                summary["shifted_copies"][split] = {"per_row": copies, "rows": int((shifted & ~over).sum())}
    finally:
        if not progress and not was_disabled:
            datasets.enable_progress_bars()

    summary.update({
        "input_days": list(days.input),
        "predict_days": list(days.predict),
        "dropped": account.total_dropped(),
        "source": str(prepared.path),
        "prompt_tokens_counted_with": (None if counter is None else
                                       "chat template" if counter.uses_template else "system + user messages"),
    })
    metadata = {
        "kind": "humob_qa",
        "source": str(prepared.path),
        "config": config.to_dict(),
        "system_prompt": system,
        "grid_size": grid_size,
        "coordinate_base": base,
        "slots_per_day": slots,
        "day0_weekday": meta.get("day0_weekday"),
        **{k: summary[k] for k in ("rows", "users", "truncation", "windows", "shifted_copies", "tokens", "input_days",
                                   "predict_days")},
        "row_account": account.to_dict(),
    }
    empty = [split for split, table in tables.items() if table.num_rows == 0]
    if empty:  # an empty Parquet split does not load with `load_dataset` (pyarrow: "BatchSize must be greater than 0")
        logger.info("humob-qa: no rows in split(s) %s; they are left out of the dataset", empty)
        tables = {split: table for split, table in tables.items() if table.num_rows}
    if not tables:
        raise ValueError(f"no humob-qa rows in any split of {prepared.path} (row account: {account.total_dropped()})")
    summary["empty_splits"] = empty
    path = write_dataset(out_dir, {HUMOB_QA_CONFIG: tables}, card_body=_card(tables, summary, config, system, account),
                         metadata=metadata, pretty_name="HuMob Q&A instruction dataset (Llama-3-8B-Mob)")
    summary["out_dir"] = str(path)
    summary["row_account"] = account.to_dict()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("humob-qa: %s rows in %.1fs -> %s", summary["rows"], summary["seconds"], path)
    return summary


def _shorten(text: str, head: int = 6, tail: int = 3) -> str:
    lines = text.split("\n")
    if len(lines) <= head + tail + 1:
        return text
    return "\n".join([*lines[:head], f"... ({len(lines) - head - tail} more lines)", *lines[-tail:]])


def _answer_pattern(style: str) -> str:
    item = answer_separators(style)[0]
    return answer_opening(style) + "[" + item.join("dtxy") + "]" + item + "...]}"


def _card(tables: dict[str, pa.Table], summary: dict, config: HumobQAConfig, system: str,
          account: RowAccount) -> str:
    (i0, i1), (p0, p1) = summary["input_days"], summary["predict_days"]
    rows = ["| split | rows | users | truncated rows | input days dropped | input rows dropped | dropped over budget |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for split, table in tables.items():
        tr = summary["truncation"][split]
        rows.append(f"| {split} | {table.num_rows:,} | {summary['users'][split]:,} | {tr['samples_truncated']:,} | "
                    f"{tr['input_days_dropped']:,} | {tr['input_rows_dropped']:,} | "
                    f"{tr['samples_dropped_over_budget']:,} |")
    lines = [
        "# HuMob Q&A instruction dataset (Llama-3-8B-Mob)",
        "",
        f"Built by hf-mobility from the prepared grid dataset `{summary['source']}`: long-term trajectory prediction "
        "as question answering ([Llama-3-8B-Mob, arXiv 2410.23692](https://arxiv.org/abs/2410.23692)). Each row shows "
        f"a user's records of days {i0}-{i1} (`d t x y`, one per line) and asks the slots of days {p0}-{p1} "
        f"(`d t {HIDDEN_MARK}`); the answer is {config.answer_style} JSON `{_answer_pattern(config.answer_style)}` "
        "with one entry per asked line, in order.",
        "",
        f"Load with `datasets.load_dataset(path, '{HUMOB_QA_CONFIG}')`. Columns: `uid`, `window` (0 = the real window; "
        "train rows of earlier windows count 1, 2, ...), `copy` (0 = the row as recorded; 1, 2, ... = shifted copies) "
        "with its cell offset `shift_x`, `shift_y`, `messages` (system, user, assistant), `prompt` (system + user "
        "messages) and `completion` (the assistant message) as TRL conversational prompt-completion columns, "
        "`num_input_rows`, `num_asked`, `input_days_dropped`. The `hidden` split (users whose targets are unknown) has "
        "no assistant message.",
        "",
        "\n".join(rows),
        "",
    ]
    if summary["shifted_copies"]:
        for split, info in summary["shifted_copies"].items():
            lines += [f"Augmentation: the {split} split holds {info['per_row']} shifted copies of every row "
                      f"({info['rows']:,} rows): all the cells of a copy, input records and answer alike, move by one "
                      "random offset that keeps them on the grid, so that a model trained from scratch learns to read "
                      "the cells of its prompt rather than the training users' places (seed "
                      f"{config.seed}). Drop them with `.filter(lambda r: r['copy'] == 0)`.", ""]
    if config.max_input_tokens is not None:
        lines += [f"Prompts are capped at {config.max_input_tokens:,} tokens (counted with "
                  f"{summary['prompt_tokens_counted_with']}): the oldest input days are dropped, whole days, until the "
                  "prompt fits; a row that does not fit without input days is dropped.", ""]
    if summary["tokens"]:
        lines += ["Token counts (min / mean / max):", ""]
        for split, st in summary["tokens"].items():
            parts = [f"{what} {v['min']:,} / {v['mean']:,} / {v['max']:,}" for what, v in st.items() if v]
            lines.append(f"- {split}: " + ("; ".join(parts) or "no rows"))
        lines.append("")
    example = next((t for t in tables.values() if t.num_rows), None)
    if example is not None:
        messages = example.slice(0, 1).column("messages").to_pylist()[0]
        lines += ["## Example", ""]
        for message in messages:
            lines += [f"**{message['role']}**", "", "```text", _shorten(message["content"]), "```", ""]
    else:
        lines += ["## System message", "", "```text", system, "```", ""]
    lines += ["## Configuration", "", "```json", json.dumps(config.to_dict(), indent=2, default=str), "```", "",
              "## Row account", "", account.to_markdown(), ""]
    return "\n".join(lines)
