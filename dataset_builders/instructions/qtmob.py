"""QT-Mob instruction sets (DESIGN §5.1 step 5): TRL prompt-completion pairs built from a prepared check-in dataset.

Tasks (one published config each):

- ``next``: the user's profile and recent visits (the last ``max_history`` of the prepared history, each rendered as
  ``"At Mon 08:15, user u0003 visited POI <a_3><b_17><c_0><d_5>."``) -> the POI of the target visit. One pair per
  prepared sample of every split, so the validation/test pairs are exactly the prepared samples that every other model
  is scored on.
- ``recovery``: a trajectory (history + target) with 20-50% of its positions hidden (never the first); the queried
  position is written ``[MASK]``, the other hidden ones ``[UNKNOWN]`` -> the POI of the ``[MASK]`` visit. Train: any
  position but the first may be queried (trajectories shorter than 3 visits are dropped and counted). Validation/test:
  one pair per prepared sample, the queried position is always the prepared target (the last visit), so the evaluated
  targets are the same ones as for ``next``; further ``[UNKNOWN]`` positions are drawn with the seed.
- ``alignment``: both directions per location, train split only: codes -> description and description -> codes.
  Held-out locations (``heldout`` column of the locations table) are left out so the inductive test stays honest.
- ``translation`` (optional): a trajectory described with place names and categories -> the code sequence
  (codes of each visit separated by single spaces). Train split only.

Completion convention (constrained decoding relies on it): whenever the answer is one location, the prompt ends with
the answer prefix (``"... At Fri 18:30, user u0003 will visit POI "``) and the completion is exactly
``tokenizer.location_to_text(target)``, so ``tokenizer.text_to_locations(completion) == [target]``. With
``format="chat"`` the rows are TRL conversational prompt-completion rows: ``prompt`` = ``[system, user]`` messages
(the user message is the plain prompt without the system text, trailing whitespace removed) and ``completion`` =
``[{"role": "assistant", "content": codes}]``.

All strings are built with Arrow compute kernels inside ``datasets.Dataset.map(batched=True)`` on Arrow batches; the
random draws (template per row, recovery masks) are made once per split with a seeded NumPy generator before the map,
so the output does not depend on the batch size or on ``num_proc``.
"""

from __future__ import annotations

import json
import logging
import os
import string
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..preprocess import local_time_features
from ..publish import PreparedDataset, load_prepared, write_dataset
from ..schema import RowAccount

__all__ = [
    "QTMOB_TASKS",
    "QTMOB_TEMPLATES",
    "QTMobInstructionConfig",
    "QTMobInstructions",
    "build_qtmob_instructions",
    "run_instructions_cli",
    "write_qtmob_instructions",
]

logger = logging.getLogger(__name__)

QTMOB_TASKS = ("next", "recovery", "alignment", "translation")
FORMATS = ("prompt_completion", "chat")
DEFAULT_SYSTEM_PROMPT = (
    "You are an assistant that predicts human mobility in a city. Every POI is written as a short sequence of code "
    "tokens, one per level, that encodes where the place is and what kind of place it is."
)
ID_SYSTEM_PROMPT = (
    "You are an assistant that predicts human mobility in a city. Every POI is written as one ID token, like <loc_12>."
)
LOCATION_FORMATS = ("semantic", "id")
TOKENIZER_DIR = "location_tokenizer"  # where an instruction dataset keeps the LocationTokenizer its prompts use
MASK, UNKNOWN = "[MASK]", "[UNKNOWN]"

# Templates (our own wording). Fields: {profile} (empty or one line ending in "\n"), {user}, {history}/{trajectory}
# (one visit per line), {time} (e.g. "Fri 18:30"), {codes}, {description}. Template 0 is the evaluation template.
QTMOB_TEMPLATES: dict[str, list[str]] = {
    "next": [
        "{profile}Here is the recent trajectory of user {user}, one visit per line.\n{history}\n"
        "Given this trajectory, which POI will user {user} visit at {time}?\nAt {time}, user {user} will visit POI ",
        "{profile}Recent visits of user {user}:\n{history}\n"
        "Predict the POI that user {user} goes to next, at {time}.\nAt {time}, user {user} will visit POI ",
        "{profile}The check-ins below belong to user {user} and are sorted by time.\n{history}\n"
        "Where will user {user} be at {time}? Answer with a POI code.\nAt {time}, user {user} will visit POI ",
        "{profile}User {user} has made these visits:\n{history}\n"
        "Using the visits and the profile, name the POI of the next visit at {time}.\n"
        "At {time}, user {user} will visit POI ",
    ],
    "recovery": [
        "Some visits in this trajectory of user {user} are hidden: {mask} marks the visit to recover and {unknown} "
        "marks other hidden visits.\n{trajectory}\nWhich POI did user {user} visit at {time}?\n"
        "At {time}, user {user} visited POI ",
        "Below is a trajectory of user {user} with gaps ({mask} is the gap asked for, {unknown} the others).\n"
        "{trajectory}\nRecover the POI of the {mask} visit.\nAt {time}, user {user} visited POI ",
        "Fill in the blank in the visits of user {user}. The blank is {mask}; visits shown as {unknown} are not "
        "asked for.\n{trajectory}\nAt {time}, user {user} visited POI ",
    ],
    "alignment_code_to_description": [
        "What do you know about POI {codes}?\n",
        "Describe the place with the POI code {codes}, including what lies around it.\n",
        "Tell me about POI {codes}: what kind of place it is, where it is and what is nearby.\n",
    ],
    "alignment_description_to_code": [
        "{description}\nWhich POI code belongs to the place described above?\nThe place is POI ",
        "Here is the description of a place.\n{description}\nGive its POI code.\nThe place is POI ",
        "Find the POI code of this place:\n{description}\nThe place is POI ",
    ],
    "translation": [
        "Here is a description of the trajectory of user {user}:\n{trajectory}\n"
        "Rewrite it as the sequence of POI codes, in order.\nPOI codes: ",
        "User {user} made these visits:\n{trajectory}\nTranslate each visit into its POI code.\nPOI codes: ",
        "Convert the visits of user {user} below into POI codes, one per visit.\n{trajectory}\nPOI codes: ",
    ],
}
_ALIGNMENT_KINDS = ("alignment_code_to_description", "alignment_description_to_code")

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# "Mon 08:15" for every (weekday, minute of day): index weekday * 1440 + minute
_TIME_LABELS = pa.array([f"{d} {m // 60:02d}:{m % 60:02d}" for d in _DAY_NAMES for m in range(1440)])


@dataclass
class QTMobInstructionConfig:
    """What :func:`build_qtmob_instructions` builds.

    Args:
        tasks (`tuple[str, ...]`, *optional*, defaults to `("next", "recovery", "alignment")`):
            Tasks to build, from ``"next"``, ``"recovery"``, ``"alignment"`` and ``"translation"``.
        max_history (`int`, *optional*, defaults to 20):
            Only the most recent ``max_history`` visits of a history are shown (QT-Mob's ``max_his_len``).
        recovery_mask_range (`tuple[float, float]`, *optional*, defaults to `(0.2, 0.5)`):
            Fraction of the trajectory positions hidden in a recovery pair (drawn per row; at least one, never the
            first position).
        num_templates (`int`, *optional*):
            Use only the first ``num_templates`` templates of every task (default: all). Train rows draw a template
            per row with the seed; validation/test rows always use template 0.
        seed (`int`, *optional*, defaults to 0):
            Seed of the template choice and of the recovery masks.
        format (`str`, *optional*, defaults to `"prompt_completion"`):
            ``"prompt_completion"`` (plain strings) or ``"chat"`` (TRL conversational prompt-completion messages).
        location_format (`str`, *optional*, defaults to `"semantic"`):
            ``"semantic"``: locations are written with the tokenizer's semantic codes (``<a_3><b_17>...``); ``"id"``:
            QT-Mob's ablation, one plain ID token per location of the same tokenizer (``<loc_123>``, see
            `LocationTokenizer.id_codes`), with a system prompt that says so.
        system_prompt (`str`, *optional*):
            First chat message, or text put before every plain prompt (followed by a blank line). Empty: none.
        profile_top_k (`int`, *optional*, defaults to 3):
            How many top visit hours, locations and categories the user profile of ``next`` lists (0: no profile).
        batch_size (`int`, *optional*, defaults to 10000):
            Rows per batch of ``Dataset.map``.
        num_proc (`int`, *optional*):
            Worker processes of ``Dataset.map``.
    """

    tasks: tuple[str, ...] = ("next", "recovery", "alignment")
    max_history: int = 20
    recovery_mask_range: tuple[float, float] = (0.2, 0.5)
    num_templates: int | None = None
    seed: int = 0
    format: str = "prompt_completion"
    location_format: str = "semantic"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    profile_top_k: int = 3
    batch_size: int = 10_000
    num_proc: int | None = None

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in QTMOB_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks={list(self.tasks)!r} is not allowed; choose one or more of {list(QTMOB_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks={list(self.tasks)!r} repeats a task")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not allowed; choose one of {list(FORMATS)}")
        if self.location_format not in LOCATION_FORMATS:
            raise ValueError(
                f"location_format={self.location_format!r} is not allowed; choose one of {list(LOCATION_FORMATS)}"
            )
        if self.location_format == "id" and self.system_prompt == DEFAULT_SYSTEM_PROMPT:
            self.system_prompt = ID_SYSTEM_PROMPT
        for name, minimum in (("max_history", 1), ("profile_top_k", 0), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name}={value!r} is not allowed; expected an int >= {minimum}")
        if self.num_templates is not None and (
            isinstance(self.num_templates, bool) or not isinstance(self.num_templates, int) or self.num_templates < 1
        ):
            raise ValueError(f"num_templates={self.num_templates!r} is not allowed; expected None or an int >= 1")
        lo, hi = (float(x) for x in self.recovery_mask_range)
        if not 0 < lo <= hi < 1:
            raise ValueError(
                f"recovery_mask_range={self.recovery_mask_range!r} is not allowed; expected (low, high) with "
                "0 < low <= high < 1"
            )
        self.recovery_mask_range = (lo, hi)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt={self.system_prompt!r} is not allowed; expected a string or None")

    def templates(self, kind: str) -> list[str]:
        """The templates of ``kind`` (a task, or one of the two alignment directions) in use."""
        return QTMOB_TEMPLATES[kind][: self.num_templates]


@dataclass
class QTMobInstructions:
    """The output of :func:`build_qtmob_instructions`.

    Attributes:
        datasets (`dict[str, datasets.DatasetDict]`): one `DatasetDict` per task (``alignment`` and ``translation``
            have a ``train`` split only).
        account (`RowAccount`): per task and split, samples (or locations) in, pairs kept, rows dropped per reason.
        config (`QTMobInstructionConfig`): the configuration used.
        metadata (`dict`): source dataset, tokenizer and counts, written beside the published card.
        tokenizer (`LocationTokenizer`, *optional*): the tokenizer the locations were written with (the plain-ID
            re-coding for ``location_format="id"``); published in ``location_tokenizer/`` of the dataset folder.
    """

    datasets: dict[str, datasets.DatasetDict]
    account: RowAccount
    config: QTMobInstructionConfig = field(default_factory=QTMobInstructionConfig)
    metadata: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# vectorised helpers


def _template_pieces(template: str) -> list[tuple[str, str | None]]:
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


def _fill(templates: list[str], template_id: np.ndarray, fields: dict[str, pa.Array | str]) -> pa.Array:
    """Fill per-row templates from field arrays (or constant strings) with Arrow kernels."""
    n = len(template_id)
    order = np.argsort(template_id, kind="stable")
    parts = []
    for t in np.unique(template_id):
        rows = order[np.searchsorted(template_id[order], t) : np.searchsorted(template_id[order], t, side="right")]
        take = pa.array(rows)
        args: list[Any] = []
        for literal, name in _template_pieces(templates[int(t)]):
            if literal:
                args.append(literal)
            if name is not None:
                value = fields[name]
                args.append(value if isinstance(value, str) else value.take(take).cast(pa.string()))
        if all(isinstance(a, str) for a in args):
            parts.append(pa.array(["".join(args)] * len(rows), pa.string()))
        else:
            parts.append(pc.binary_join_element_wise(*args, ""))
    if not parts:
        return pa.array([], pa.string())
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    return pa.concat_arrays([p.cast(pa.string()) for p in parts]).take(pa.array(inverse))


def _join_lists(values: pa.Array, lengths: np.ndarray, sep: str) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), values), sep)


def _flat(column) -> tuple[pa.Array, np.ndarray]:
    """Values and per-row lengths of a list column (chunked or sliced)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten(), pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _last_k(lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices of the last ``k`` items of every row, their row, and the new lengths."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    parent = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(offsets[-1]) - offsets[parent]
    keep = pos >= (lengths - k)[parent]
    return np.flatnonzero(keep), parent[keep], np.minimum(lengths, k)


def _col(batch: pa.Table, name: str) -> pa.Array:
    column = batch.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _np(column) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False)


class _Context:
    """Lookup tables shared by the batch functions: codes, time labels, profiles, place texts."""

    def __init__(self, tokenizer, day0_weekday: int, config: QTMobInstructionConfig):
        ids = list(tokenizer.location_ids)
        self.location_ids = pa.array(ids, pa.string())
        self.codes = pa.array([tokenizer.location_to_text(i) for i in ids], pa.string())
        self.day0_weekday = int(day0_weekday)
        self.config = config
        self.profile_users = pa.array([], pa.string())
        self.profile_texts = pa.array([], pa.string())
        self.place_ids = pa.array([], pa.string())
        self.place_texts = pa.array([], pa.string())

    def code_index(self, values: pa.Array) -> pa.Array:
        return pc.index_in(values, value_set=self.location_ids)

    def codes_of(self, values: pa.Array) -> pa.Array:
        return self.codes.take(self.code_index(values))

    def time_labels(self, ts, tz) -> pa.Array:
        _, _, minute, weekday = local_time_features(ts, tz, self.day0_weekday)
        return _TIME_LABELS.take(pa.array(weekday * 1440 + minute))

    def profiles_of(self, users: pa.Array) -> pa.Array:
        idx = pc.index_in(users, value_set=self.profile_users)
        return pc.fill_null(self.profile_texts.take(idx), "")

    def places_of(self, values: pa.Array) -> pa.Array:
        return pc.fill_null(self.place_texts.take(pc.index_in(values, value_set=self.place_ids)), "an unnamed place")

    def finish(self, batch: pa.Table, task: str, prompt: pa.Array, completion: pa.Array, template_id,
               target: pa.Array) -> pa.Table:
        n = len(prompt)
        prompt, completion, target = (a.cast(pa.string()) for a in (prompt, completion, target))
        system = self.config.system_prompt or ""
        if self.config.format == "chat":
            user_text = pc.utf8_rtrim_whitespace(prompt)
            roles = ["system", "user"] if system else ["user"]
            contents = [pa.array([system] * n, pa.string()), user_text] if system else [user_text]
            k = len(roles)
            # interleave the messages of every row: row i holds positions [k*i, k*i + k)
            flat_content = pc.take(pa.concat_arrays(contents),
                                   pa.array((np.arange(n)[:, None] + np.arange(k)[None, :] * n).ravel()))
            flat_role = pa.array(np.tile(np.array(roles, dtype=object), n), pa.string())
            messages = pa.StructArray.from_arrays([flat_role, flat_content], ["role", "content"])
            prompt = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), messages)
            answer = pa.StructArray.from_arrays([pa.array(["assistant"] * n, pa.string()), completion],
                                                ["role", "content"])
            completion = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), answer)
        elif system:
            prompt = pc.binary_join_element_wise(system + "\n\n", prompt, "")
        return pa.table({
            "prompt": prompt,
            "completion": completion,
            "task": pa.array([task] * n, pa.string()),
            "template_id": pa.array(np.asarray(template_id, dtype=np.int64)),
            "user_id": _col(batch, "user_id").cast(pa.string()) if "user_id" in batch.column_names else pa.array([""] * n, pa.string()),
            "sample_id": (_col(batch, "sample_id").cast(pa.int64()) if "sample_id" in batch.column_names
                          else pa.array(np.full(n, -1, dtype=np.int64))),
            "target_location_id": target,
        })


def _visit_lines(ctx: _Context, users: pa.Array, parent: np.ndarray, ts, tz, what: pa.Array, verb: str) -> pa.Array:
    return pc.binary_join_element_wise(
        "At ", ctx.time_labels(ts, tz), ", user ", users.take(pa.array(parent)), f" {verb} ", what, ".", ""
    )


# ----------------------------------------------------------------------------------------------------------------------
# batch functions (run inside Dataset.map on Arrow batches)


def _next_batch(batch: pa.Table, ctx: _Context) -> pa.Table:
    users = _col(batch, "user_id")
    locs, lengths = _flat(batch.column("history_location_ids"))
    ts, _ = _flat(batch.column("history_timestamps"))
    tz, _ = _flat(batch.column("history_tz_offset_min"))
    keep, parent, capped = _last_k(lengths, ctx.config.max_history)
    keep_arr = pa.array(keep)
    lines = _visit_lines(ctx, users, parent, _np(ts)[keep], _np(tz)[keep],
                         pc.binary_join_element_wise("POI ", ctx.codes_of(locs.take(keep_arr)), ""), "visited")
    target = _col(batch, "target_location_id")
    fields = {
        "profile": ctx.profiles_of(users),
        "user": users,
        "history": _join_lists(lines, capped, "\n"),
        "time": ctx.time_labels(_np(batch.column("target_timestamp")), _np(batch.column("target_tz_offset_min"))),
    }
    template_id = _np(batch.column("_template_id"))
    prompt = _fill(ctx.config.templates("next"), template_id, fields)
    return ctx.finish(batch, "next", prompt, ctx.codes_of(target), template_id, target)


def _trajectory(batch: pa.Table):
    """The flat visits of the rows' trajectories: users, locations, lengths, timestamps, offsets, row of each visit."""
    locs, lengths = _flat(batch.column("_traj_locations"))
    ts, _ = _flat(batch.column("_traj_timestamps"))
    tz, _ = _flat(batch.column("_traj_tz"))
    parent = np.repeat(np.arange(len(lengths)), lengths)
    return _col(batch, "user_id"), locs, lengths, ts, tz, parent


def _recovery_batch(batch: pa.Table, ctx: _Context) -> pa.Table:
    users, locs, lengths, ts, tz, parent = _trajectory(batch)
    state, _ = _flat(batch.column("_traj_state"))  # 0 shown, 1 queried, 2 hidden
    state = _np(state)
    codes = pc.binary_join_element_wise("POI ", ctx.codes_of(locs), "")
    what = pc.if_else(pa.array(state == 1), "POI " + MASK, pc.if_else(pa.array(state == 2), "POI " + UNKNOWN, codes))
    ts_np, tz_np = _np(ts), _np(tz)
    lines = _visit_lines(ctx, users, parent, ts_np, tz_np, what, "visited")
    query = np.flatnonzero(state == 1)  # exactly one per row, in row order
    target = locs.take(pa.array(query))
    fields = {
        "user": users,
        "trajectory": _join_lists(lines, lengths, "\n"),
        "time": ctx.time_labels(ts_np[query], tz_np[query]),
        "mask": MASK,
        "unknown": UNKNOWN,
    }
    template_id = _np(batch.column("_template_id"))
    prompt = _fill(ctx.config.templates("recovery"), template_id, fields)
    return ctx.finish(batch, "recovery", prompt, ctx.codes_of(target), template_id, target)


def _translation_batch(batch: pa.Table, ctx: _Context) -> pa.Table:
    users, locs, lengths, ts, tz, parent = _trajectory(batch)
    lines = _visit_lines(ctx, users, parent, _np(ts), _np(tz), ctx.places_of(locs), "visited")
    fields = {"user": users, "trajectory": _join_lists(lines, lengths, "\n")}
    template_id = _np(batch.column("_template_id"))
    prompt = _fill(ctx.config.templates("translation"), template_id, fields)
    completion = _join_lists(ctx.codes_of(locs), lengths, " ")
    return ctx.finish(batch, "translation", prompt, completion, template_id, pa.array([""] * len(users), pa.string()))


def _alignment_batch(batch: pa.Table, ctx: _Context, kind: str) -> pa.Table:
    locs = _col(batch, "location_id")
    descriptions = _col(batch, "description")
    codes = ctx.codes_of(locs)
    template_id = _np(batch.column("_template_id"))
    prompt = _fill(ctx.config.templates(kind), template_id, {"codes": codes, "description": descriptions})
    if kind == "alignment_code_to_description":
        return ctx.finish(batch, kind, prompt, descriptions, template_id, pa.array([""] * len(locs), pa.string()))
    return ctx.finish(batch, kind, prompt, codes, template_id, locs)


# ----------------------------------------------------------------------------------------------------------------------
# per-split preparation (filters, random draws) and the map


def _rng(seed: int, kind: str, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()), zlib.crc32(split.encode())])


def _template_ids(config: QTMobInstructionConfig, kind: str, split: str, n: int) -> np.ndarray:
    if split != "train":
        return np.zeros(n, dtype=np.int64)
    return _rng(config.seed, kind, split).integers(0, len(config.templates(kind)), n)


def _has_code_mask(table: pa.Table, ctx: _Context, max_history: int) -> np.ndarray:
    """Rows whose target and shown history locations all have codes."""
    ok = pc.is_valid(ctx.code_index(_col(table, "target_location_id"))).to_numpy(zero_copy_only=False)
    locs, lengths = _flat(table.column("history_location_ids"))
    keep, parent, _ = _last_k(lengths, max_history)
    missing = ~pc.is_valid(ctx.code_index(locs.take(pa.array(keep)))).to_numpy(zero_copy_only=False)
    bad = np.bincount(parent[missing], minlength=table.num_rows) > 0
    return ok & ~bad


def _map(table: pa.Table, fn, ctx: _Context, desc: str, **kwargs) -> datasets.Dataset:
    ds = datasets.Dataset(datasets.table.InMemoryTable(table))
    fingerprint = f"qtmob-{desc}-{ctx.config.seed}-{table.num_rows}".replace(" ", "-").replace("/", "-")
    out = ds.with_format("arrow").map(
        fn,
        batched=True,
        batch_size=ctx.config.batch_size,
        fn_kwargs={"ctx": ctx, **kwargs},
        remove_columns=ds.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
        num_proc=ctx.config.num_proc,
        desc=f"QT-Mob {desc}",
    )
    return out.with_format(None)


def _trajectories(table: pa.Table, max_history: int) -> tuple[pa.Table, np.ndarray]:
    """Append the target to the last ``max_history`` history visits: list columns ``_traj_*`` and their lengths."""
    n = table.num_rows
    locs, lengths = _flat(table.column("history_location_ids"))
    ts, _ = _flat(table.column("history_timestamps"))
    tz, _ = _flat(table.column("history_tz_offset_min"))
    keep, parent, capped = _last_k(lengths, max_history)
    traj_len = capped + 1
    offsets = np.concatenate([[0], np.cumsum(traj_len)])
    hist_offsets = np.concatenate([[0], np.cumsum(capped)])
    hist_pos = offsets[parent] + (np.arange(len(keep)) - hist_offsets[parent])
    last = offsets[1:] - 1
    order = np.empty(offsets[-1], dtype=np.int64)  # position in concat([history, targets])
    order[hist_pos] = np.arange(len(keep))
    order[last] = len(keep) + np.arange(n)
    take = pa.array(order)

    def build(values: pa.Array, targets, dtype) -> pa.ListArray:
        merged = pa.concat_arrays([values.take(pa.array(keep)).cast(dtype), pa.array(_np(targets)).cast(dtype)])
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), merged.take(take))

    out = table.select(["sample_id", "user_id"])
    out = out.append_column("_traj_locations", build(locs, table.column("target_location_id"), pa.string()))
    out = out.append_column("_traj_timestamps", build(ts, table.column("target_timestamp"), pa.int64()))
    out = out.append_column("_traj_tz", build(tz, table.column("target_tz_offset_min"), pa.int32()))
    return out, traj_len


def _recovery_states(lengths: np.ndarray, rng: np.random.Generator, mask_range: tuple[float, float],
                     query_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per flat position: 0 shown, 1 queried ([MASK]), 2 hidden ([UNKNOWN]); and rows with a valid mask count."""
    lo, hi = mask_range
    m_min = np.maximum(1, np.ceil(lo * lengths - 1e-9)).astype(np.int64)
    m_max = np.minimum(lengths - 1, np.floor(hi * lengths + 1e-9)).astype(np.int64)
    valid = m_min <= m_max
    m = rng.integers(m_min, np.maximum(m_min, m_max) + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    parent = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(offsets[-1]) - offsets[parent]
    keys = rng.random(offsets[-1])
    keys[pos == 0] = 2.0  # the first visit is never hidden
    if query_last:
        keys[offsets[1:] - 1] = -1.0  # the prepared target is the queried position
    order = np.lexsort((keys, parent))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - offsets[parent[order]]
    state = np.where(rank == 0, 1, np.where(rank < m[parent], 2, 0)).astype(np.int8)
    return state, valid


# ----------------------------------------------------------------------------------------------------------------------
# profiles, places, descriptions


def _enumerate(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _top_k(frame: pd.DataFrame, column: str, k: int) -> pd.Series:
    counts = frame.groupby(["user_id", column], observed=True).size().reset_index(name="n")
    counts = counts.sort_values(["user_id", "n", column], ascending=[True, False, True], kind="stable")
    return counts.groupby("user_id", observed=True).head(k).groupby("user_id", observed=True)[column].agg(list)


def _profiles(checkins: pa.Table, locations: pd.DataFrame, ctx: _Context, k: int) -> tuple[pa.Array, pa.Array]:
    """One profile line per user from the training check-ins: top visit hours, top locations, top categories."""
    frame = checkins.select(["user_id", "location_id", "timestamp", "tz_offset_min"]).to_pandas()
    if k == 0 or frame.empty:
        return pa.array([], pa.string()), pa.array([], pa.string())
    _, hour, _, _ = local_time_features(frame["timestamp"].to_numpy(), frame["tz_offset_min"].to_numpy(),
                                        ctx.day0_weekday)
    frame["hour"] = hour
    hours = _top_k(frame, "hour", k)
    coded = pc.is_valid(ctx.code_index(pa.array(frame["location_id"], pa.string()))).to_numpy(zero_copy_only=False)
    top_locs = _top_k(frame[coded], "location_id", k)
    cats = pd.Series(dtype=object)
    if "category" in locations.columns:
        category = locations.set_index("location_id")["category"]
        frame["category"] = frame["location_id"].map(category)
        named = frame["category"].notna() & (frame["category"].astype(str).str.strip() != "")
        cats = _top_k(frame[named], "category", k)
    code_of = dict(zip(ctx.location_ids.to_pylist(), ctx.codes.to_pylist()))
    users = hours.index.tolist()
    texts = []
    for user in users:  # one line per user (not per sample)
        parts = ["usually active around " + _enumerate([f"{int(h):02d}:00" for h in hours[user]])]
        if user in top_locs.index:
            parts.append("most visited POIs: " + _enumerate([code_of[x] for x in top_locs[user]]))
        if user in cats.index:
            parts.append("favourite categories: " + _enumerate([str(c).strip() for c in cats[user]]))
        texts.append(f"Profile of user {user}: " + "; ".join(parts) + ".\n")
    return pa.array(users, pa.string()), pa.array(texts, pa.string())


def _place_texts(locations: pd.DataFrame) -> tuple[pa.Array, pa.Array]:
    def text(column: str) -> pd.Series:
        if column not in locations.columns:
            return pd.Series([""] * len(locations), index=locations.index)
        return locations[column].fillna("").astype(str).str.strip()

    name, category = text("name"), text("category").str.split(">").str[-1].str.strip()
    place = np.where(name != "", name + np.where(category != "", " (" + category + ")", ""),
                     np.where(category != "", "a " + category, "an unnamed place"))
    return pa.array(locations["location_id"].astype(str), pa.string()), pa.array(place, pa.string())


# ----------------------------------------------------------------------------------------------------------------------
# builders


def _build_next(prepared, splits, ctx, account) -> datasets.DatasetDict:
    out = {}
    for split in splits:
        table = prepared.table("samples", split)
        ok = _has_code_mask(table, ctx, ctx.config.max_history)
        kept = table.filter(pa.array(ok))
        kept = kept.append_column("_template_id", pa.array(_template_ids(ctx.config, "next", split, kept.num_rows)))
        out[split] = _map(kept, _next_batch, ctx, f"next {split}")
        account.add(f"next {split}", table.num_rows, kept.num_rows, {"location_without_code": int((~ok).sum())})
    return datasets.DatasetDict(out)


def _build_recovery(prepared, splits, ctx, account) -> datasets.DatasetDict:
    out = {}
    for split in splits:
        table = prepared.table("samples", split)
        ok = _has_code_mask(table, ctx, ctx.config.max_history)
        traj, lengths = _trajectories(table, ctx.config.max_history)
        short = (lengths < 3) & ok if split == "train" else np.zeros(len(lengths), dtype=bool)
        rng = _rng(ctx.config.seed, "recovery", split)
        state, valid = _recovery_states(lengths, rng, ctx.config.recovery_mask_range, query_last=split != "train")
        no_count = ok & ~short & ~valid
        keep = ok & ~short & valid
        traj = traj.append_column("_traj_state", pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), pa.array(state)))
        traj = traj.filter(pa.array(keep))
        traj = traj.append_column(
            "_template_id", pa.array(_template_ids(ctx.config, "recovery", split, traj.num_rows)))
        out[split] = _map(traj, _recovery_batch, ctx, f"recovery {split}")
        account.add(f"recovery {split}", table.num_rows, traj.num_rows, {
            "location_without_code": int((~ok).sum()),
            "history_too_short_for_recovery": int(short.sum()),
            "no_mask_count_in_range": int(no_count.sum()),
        })
    return datasets.DatasetDict(out)


def _build_translation(prepared, ctx, account) -> datasets.DatasetDict:
    table = prepared.table("samples", "train")
    ok = _has_code_mask(table, ctx, ctx.config.max_history)
    traj, _ = _trajectories(table.filter(pa.array(ok)), ctx.config.max_history)
    traj = traj.append_column(
        "_template_id", pa.array(_template_ids(ctx.config, "translation", "train", traj.num_rows)))
    ds = _map(traj, _translation_batch, ctx, "translation train")
    account.add("translation train", table.num_rows, traj.num_rows, {"location_without_code": int((~ok).sum())})
    return datasets.DatasetDict({"train": ds})


def _build_alignment(locations: pd.DataFrame, descriptions: pd.DataFrame, ctx, account) -> datasets.DatasetDict:
    ids = locations["location_id"].astype(str)
    heldout = locations["heldout"].fillna(False).astype(bool).to_numpy() if "heldout" in locations else None
    heldout = np.zeros(len(ids), dtype=bool) if heldout is None else heldout
    coded = pc.is_valid(ctx.code_index(pa.array(ids, pa.string()))).to_numpy(zero_copy_only=False)
    text = ids.map(descriptions.set_index(descriptions["location_id"].astype(str))["description"])
    text = text.fillna("").astype(str).str.strip()
    described = (text != "").to_numpy()
    keep = ~heldout & coded & described
    table = pa.table({"location_id": pa.array(ids[keep], pa.string()), "description": pa.array(text[keep])})
    parts = []
    for kind in _ALIGNMENT_KINDS:
        t = table.append_column("_template_id", pa.array(_template_ids(ctx.config, kind, "train", table.num_rows)))
        parts.append(_map(t, _alignment_batch, ctx, f"{kind} train", kind=kind))
    account.add("alignment train (locations)", len(ids), int(keep.sum()), {
        "heldout_location": int(heldout.sum()),
        "location_without_code": int((~heldout & ~coded).sum()),
        "missing_description": int((~heldout & coded & ~described).sum()),
    }, notes={"pairs": 2 * int(keep.sum())})
    return datasets.DatasetDict({"train": datasets.concatenate_datasets(parts)})


def build_qtmob_instructions(
    data: str | os.PathLike | PreparedDataset,
    tokenizer,
    config: QTMobInstructionConfig | None = None,
    *,
    descriptions: pd.DataFrame | None = None,
) -> QTMobInstructions:
    """Build the QT-Mob instruction sets of a prepared check-in dataset.

    Args:
        data (`str`, `os.PathLike` or [`~dataset_builders.publish.PreparedDataset`]):
            A folder written by `mobility data prepare` (check-ins), or the result of `load_prepared`.
        tokenizer ([`~tokenization_mobility.LocationTokenizer`]):
            Gives the code string of every location (`location_to_text`). Samples that show a location without a code
            are dropped and counted (`location_without_code`).
        config ([`QTMobInstructionConfig`], *optional*):
            Tasks, history cap, masking, templates, seed and output format.
        descriptions (`pd.DataFrame`, *optional*):
            ``location_id`` and ``description`` columns for the alignment task, e.g. the ``descriptions.parquet`` the
            codes were learned from. Defaults to `build_descriptions` of the locations table.

    Returns:
        [`QTMobInstructions`]: one `DatasetDict` per task with the columns ``prompt``, ``completion``, ``task``,
        ``template_id``, ``user_id``, ``sample_id`` and ``target_location_id``, and the row account.

    Raises:
        ValueError: the dataset is not a check-in dataset, or the tokenizer has no location codes.
    """
    config = config or QTMobInstructionConfig()
    prepared = data if isinstance(data, PreparedDataset) else load_prepared(data)
    if prepared.kind != "checkins":
        raise ValueError(f"data={str(prepared.path)!r} is a {prepared.kind!r} dataset; QT-Mob instructions need "
                         "kind 'checkins' (a folder from `mobility data prepare --format foursquare|gowalla|csv`)")
    if not hasattr(tokenizer, "location_to_text") or not list(getattr(tokenizer, "location_ids", [])):
        raise ValueError(f"tokenizer={type(tokenizer).__name__} is not allowed; expected a LocationTokenizer with "
                         "location codes")
    if config.location_format == "id":
        from tokenization_mobility.tokenization_location import ID_PREFIX

        tokenizer = type(tokenizer).from_base(
            tokenizer, tokenizer.id_codes(tokenizer.location_ids), level_prefixes=[ID_PREFIX]
        )
    ctx = _Context(tokenizer, prepared.metadata.get("day0_weekday", 3), config)
    splits = [s for s in ("train", "validation", "test") if s in prepared.splits("samples")]
    splits += [s for s in prepared.splits("samples") if s not in splits]
    locations = prepared.table("locations").to_pandas()
    account = RowAccount()
    result: dict[str, datasets.DatasetDict] = {}
    for task in config.tasks:
        if task == "next":
            if config.profile_top_k and "train" in prepared.splits("checkins"):
                ctx.profile_users, ctx.profile_texts = _profiles(
                    prepared.table("checkins", "train"), locations, ctx, config.profile_top_k)
            result[task] = _build_next(prepared, splits, ctx, account)
        elif task == "recovery":
            result[task] = _build_recovery(prepared, splits, ctx, account)
        elif task == "translation":
            ctx.place_ids, ctx.place_texts = _place_texts(locations)
            result[task] = _build_translation(prepared, ctx, account)
        else:
            if descriptions is None:
                from ..descriptions import build_descriptions

                descriptions = build_descriptions(locations)
            missing = {"location_id", "description"} - set(descriptions.columns)
            if missing:
                raise ValueError(f"descriptions is missing column(s) {sorted(missing)}; allowed input has "
                                 "'location_id' and 'description'")
            result[task] = _build_alignment(locations, descriptions, ctx, account)
    metadata = {
        "kind": "qtmob_instructions",
        "source": str(prepared.path),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "location_format": config.location_format,
        "num_locations_with_codes": len(ctx.location_ids),
        "day0_weekday": ctx.day0_weekday,
        "rows": {task: {split: ds.num_rows for split, ds in dd.items()} for task, dd in result.items()},
    }
    return QTMobInstructions(datasets=result, account=account, config=config, metadata=metadata, tokenizer=tokenizer)


def _card(result: QTMobInstructions) -> str:
    cfg = result.config
    rows = ["| task | split | pairs |", "|---|---|---:|"]
    for task, dd in result.datasets.items():
        rows += [f"| {task} | {split} | {ds.num_rows:,} |" for split, ds in dd.items()]
    lines = [
        "# QT-Mob instruction dataset",
        "",
        f"Built by hf-mobility (`mobility data instructions`) from `{result.metadata.get('source', '')}` with the "
        f"location tokenizer `{result.metadata.get('tokenizer', '')}`: TRL "
        + ("conversational prompt-completion rows (`prompt` = system + user messages, `completion` = assistant)."
           if cfg.format == "chat" else "prompt-completion rows (`prompt`, `completion` strings)."),
        "",
        ("Locations are written as plain ID tokens (`<loc_N>`, QT-Mob's ablation). " if cfg.location_format == "id"
         else "Locations are written as semantic code tokens (`<a_3><b_17>...`). ")
        + f"The LocationTokenizer that writes and parses them is in `{TOKENIZER_DIR}/` "
        f"(`AutoTokenizer.from_pretrained(path + '/{TOKENIZER_DIR}', trust_remote_code=True)`).",
        "",
        "Load a task with `datasets.load_dataset(path, '<task>')`. Columns: `prompt`, `completion`, `task`, "
        "`template_id`, `user_id`, `sample_id` (the prepared sample; -1 for alignment), `target_location_id` (the "
        "location whose codes the completion holds; empty for code -> description and translation).",
        "",
        "Whenever the answer is one location, the prompt ends with the answer prefix and the completion is exactly "
        "the location's code tokens. Train rows draw a template per row with the seed; validation/test rows always "
        "use template 0 and hold one pair per prepared sample. Recovery: 20-50% of the positions are hidden (never "
        "the first); train queries any hidden position, validation/test always query the prepared target (last "
        "position).",
        "",
        "\n".join(rows),
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(asdict(cfg), indent=2, default=str),
        "```",
        "",
        "## Templates",
        "",
    ]
    kinds = [k for t in cfg.tasks for k in (_ALIGNMENT_KINDS if t == "alignment" else (t,))]
    for kind in kinds:
        lines += [f"### {kind}", ""]
        for i, template in enumerate(cfg.templates(kind)):
            lines += [f"Template {i}:", "", "```text", template, "```", ""]
    lines += ["## Row account", "", result.account.to_markdown(), ""]
    return "\n".join(lines)


def write_qtmob_instructions(result: QTMobInstructions, out_dir: str | os.PathLike) -> Path:
    """Publish the instruction sets as a dataset folder, one config per task (``load_dataset(out, "next")``), with a
    card holding the row account, the templates and the configuration."""
    configs = {
        task: {split: ds.with_format("arrow")[:] for split, ds in dd.items()} for task, dd in result.datasets.items()
    }
    metadata = {
        **result.metadata,
        "config": asdict(result.config),
        "templates": {k: result.config.templates(k) for k in QTMOB_TEMPLATES},
        "row_account": result.account.to_dict(),
    }

    def save_tokenizer(folder: Path) -> None:
        if result.tokenizer is not None and hasattr(result.tokenizer, "save_pretrained"):
            result.tokenizer.save_pretrained(folder / TOKENIZER_DIR)

    return write_dataset(out_dir, configs, card_body=_card(result), metadata=metadata,
                         pretty_name="QT-Mob instruction dataset", extras=save_tokenizer)


def run_instructions_cli(
    data_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    tasks: list[str],
    out_dir: str | os.PathLike,
    fmt: str = "prompt_completion",
    max_history: int = 20,
    seed: int = 0,
    location_format: str = "semantic",
) -> QTMobInstructions:
    """Entry point of `mobility data instructions`: load the LocationTokenizer, build the tasks and publish them.

    When a ``descriptions.parquet`` (written by `mobility train location-tokenizer`) lies in ``tokenizer_dir`` or
    its parent folder, the alignment task uses those descriptions, the ones the codes were learned from.
    """
    from tokenization_mobility import LocationTokenizer

    tokenizer = LocationTokenizer.from_pretrained(str(tokenizer_dir))
    config = QTMobInstructionConfig(tasks=tuple(tasks), format=fmt, max_history=max_history, seed=seed,
                                    location_format=location_format)
    descriptions = None
    for candidate in (Path(tokenizer_dir) / "descriptions.parquet", Path(tokenizer_dir).parent / "descriptions.parquet"):
        if "alignment" in config.tasks and candidate.exists():
            descriptions = pd.read_parquet(candidate, columns=["location_id", "description"])
            logger.info("alignment descriptions from %s", candidate)
            break
    result = build_qtmob_instructions(data_dir, tokenizer, config, descriptions=descriptions)
    write_qtmob_instructions(result, out_dir)
    return result
