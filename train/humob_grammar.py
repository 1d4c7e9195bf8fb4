"""Grammar-constrained decoding of Llama-3-8B-Mob answers (hf-mobility choice; the paper decodes freely).

A Q&A prompt asks a known list of (d, t) slots, so the answer has a known shape: the JSON
`{"prediction":[[d1,t1,x1,y1],[d2,t2,x2,y2],...]}` (or, in the `"spaced"` answer style, `{"prediction": [[d1, t1, x1,
y1], ...]}`) with the asked (d, t) in the asked order and only the cells `x, y` left to the model. [`AnswerGrammar`]
is a character-level automaton of that string for one prompt (cells are integers in `lo..hi` without leading zeros);
[`HumobAnswerLogitsProcessor`] makes greedy generation follow it: at every step each row takes its highest-scoring
token whose text keeps the answer on the grammar (the model's own top token almost always: it writes the scaffold the
way it learnt to tokenise it), and an end-of-sequence token once the answer is complete. The model still chooses every
cell; it can no longer skip, repeat or invent slots, write a cell off the grid or stop early, so every asked slot is
answered by the model (unless the token budget runs out first). With `cells`, the model chooses among those cells only
(e.g. the cells of the person's records in the prompt).

```python
from transformers import LogitsProcessorList
from train.humob_grammar import HumobAnswerLogitsProcessor

processor = HumobAnswerLogitsProcessor(tokenizer, asked_per_row, cell_range=(1, 200), eos_token_id=eos_ids,
                                       answer_style="compact")
model.generate(input_ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), do_sample=False)
processor.overrides  # tokens where the model's top choice left the grammar, per row
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import LogitsProcessor

from dataset_builders.instructions.humob_qa import answer_opening, answer_separators

__all__ = ["AnswerGrammar", "HumobAnswerLogitsProcessor", "TokenTexts"]

logger = logging.getLogger(__name__)

_ALPHABET = frozenset('0123456789,[]{}": prediction')  # every character an answer can hold (either style)
_DIGITS = frozenset("0123456789")
_DEEPER = 1024  # candidates read in score order before scanning every token of the answer's alphabet


class AnswerGrammar:
    """The JSON answer to one prompt, as a character automaton.

    The answer is `{"prediction":[` + `[d,t,X,Y]` per asked slot joined by `,` + `]}`, where `d, t` are the asked
    values (fixed text) and `X, Y` integer fields in `lo..hi`; in the `"spaced"` style every `,` and `:` is followed
    by a space (`{"prediction": [[d, t, X, Y], ...]}`, see `dataset_builders.instructions.humob_qa.ANSWER_STYLES`).
    A state is `(segment, position, digits, x)`: the index of the current segment (fixed text or a number field), the
    position inside fixed text, the digits written so far in a number field, and the `X` of the current slot once
    written. States are plain tuples, so a caller can keep one per sequence.

    Every token a decoder takes writes at least one character, so an answer takes at most `max_length` tokens
    (the length of the longest answer, every cell with the most digits) plus the end-of-sequence token.

    Args:
        asked (`array-like` of shape `(m, 2)`): the asked (d, t), in the asked order; at least one.
        lo (`int`): the smallest cell number (the grid's coordinate base).
        hi (`int`): the largest cell number.
        cells (`array-like` of shape `(k, 2)`, *optional*): the only `(X, Y)` cells an answer may hold (each slot
            one of them); default: every cell of `lo..hi` x `lo..hi`.
        style (`str`, *optional*, defaults to `"compact"`): the answer style the model was trained on, `"compact"`
            or `"spaced"`.

    Raises:
        `ValueError`: on an empty or malformed `asked` or `cells`, negative values, `lo > hi`, a cell outside
        `lo..hi` or an unknown style.
    """

    def __init__(self, asked: Any, lo: int, hi: int, cells: Any = None, style: str = "compact"):
        asked = np.asarray(asked, dtype=np.int64)
        if asked.ndim != 2 or asked.shape[1] != 2 or len(asked) == 0:
            raise ValueError(f"asked must be an (m, 2) array of (d, t) with m >= 1, got shape {asked.shape}")
        if (asked < 0).any():
            raise ValueError("asked (d, t) must be non-negative integers")
        lo, hi = int(lo), int(hi)
        if lo < 0 or lo > hi:
            raise ValueError(f"the cell range must satisfy 0 <= lo <= hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi
        self.style = style
        sep = answer_separators(style)[0]
        self.max_digits = len(str(hi))
        segments: list[str | None] = []  # str: fixed text; None: a cell number
        for k, (d, t) in enumerate(asked.tolist()):
            start = answer_opening(style) + "[" if k == 0 else "]" + sep + "["
            segments += [f"{start}{d}{sep}{t}{sep}", None, sep, None]
        segments.append("]]}")
        self.segments = segments
        self.start = (0, 0, "", "")
        self.cells: tuple[tuple[int, int], ...] | None = None
        if cells is not None:
            cells = np.asarray(cells, dtype=np.int64)
            if cells.ndim != 2 or cells.shape[1] != 2 or len(cells) == 0:
                raise ValueError(f"cells must be a (k, 2) array of (x, y) with k >= 1, got shape {cells.shape}")
            outside = ((cells < lo) | (cells > hi)).any(axis=1)
            if outside.any():
                raise ValueError(f"cells must lie in {lo}..{hi}, got {cells[outside][0].tolist()}")
            self.cells = tuple(sorted(set(map(tuple, cells.tolist()))))
            ys: dict[str, set[str]] = {}
            for x, y in self.cells:
                ys.setdefault(str(x), set()).add(str(y))
            self._y_done = ys
            self._x_prefix = {x[:k] for x in ys for k in range(1, len(x) + 1)}
            self._y_prefix = {x: {y[:k] for y in v for k in range(1, len(y) + 1)} for x, v in ys.items()}
        # the longest answer: every cell with the most digits
        self.max_length = sum(len(seg) for seg in segments if seg is not None) + 2 * len(asked) * self.max_digits

    def _viable(self, digits: str, seg: int, x: str) -> bool:
        """Whether a digit prefix can still become the number of field `seg` (`X` when `seg % 4 == 1`, else `Y` of
        the cell whose `X` is `x`): in `lo..hi` without leading zeros, and with `cells`, the start of an allowed one."""
        if self.cells is not None:
            return digits in (self._x_prefix if seg % 4 == 1 else self._y_prefix.get(x, ()))
        if len(digits) > self.max_digits or (len(digits) > 1 and digits[0] == "0"):
            return False
        if digits == "0":
            return self.lo == 0
        value = int(digits)
        for extra in range(self.max_digits - len(digits) + 1):
            low = value * 10**extra
            if low > self.hi:
                return False
            if low + 10**extra - 1 >= self.lo:
                return True
        return False

    def _complete(self, digits: str, seg: int, x: str) -> bool:
        """Whether `digits` is a whole number that field `seg` may hold."""
        if self.cells is not None:
            return digits in self._y_done if seg % 4 == 1 else digits in self._y_done.get(x, ())
        return bool(digits) and self.lo <= int(digits) <= self.hi

    def advance(self, state: tuple[int, int, str, str], text: str) -> tuple[int, int, str, str] | None:
        """The state after writing `text` from `state`, or `None` if `text` leaves the grammar."""
        seg, pos, digits, x = state
        segments = self.segments
        for ch in text:
            if seg >= len(segments):
                return None  # the answer is complete: nothing may follow
            fixed = segments[seg]
            if fixed is not None:
                if ch != fixed[pos]:
                    return None
                pos += 1
                if pos == len(fixed):
                    seg, pos = seg + 1, 0
                continue
            if ch in _DIGITS:
                digits += ch
                if not self._viable(digits, seg, x):
                    return None
                continue
            # a number field ends at the first character of the fixed text that follows it
            if not self._complete(digits, seg, x):
                return None
            nxt = segments[seg + 1]
            if ch != nxt[0]:
                return None
            if seg % 4 == 1:  # the X of this slot: its Y follows
                x = digits
            seg, pos, digits = seg + 1, 1, ""
            if pos == len(nxt):
                seg, pos = seg + 1, 0
        return seg, pos, digits, x

    def is_complete(self, state: tuple[int, int, str, str]) -> bool:
        """Whether the answer is complete in `state` (only an end-of-sequence token may follow)."""
        return state[0] >= len(self.segments)

    def text_of(self, cells: Any) -> str:
        """The answer with the given `(m, 2)` cells (a reference string, e.g. for tests)."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2).tolist()
        out, k = [], 0
        for seg in self.segments:
            if seg is None:
                out.append(str(cells[k // 2][k % 2]))
                k += 1
            else:
                out.append(seg)
        return "".join(out)


class TokenTexts:
    """The text of each token id of a tokenizer (`tokenizer.decode([id])`), computed on demand and kept, plus the ids
    of the tokens made only of the answer's characters (decoded once for the whole vocabulary, on first need). One
    instance serves every batch of a prediction run."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._alphabet_ids: np.ndarray | None = None
        self._longest = 0
        self._valid: dict[tuple, np.ndarray] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._texts[token_id] = text
        return text

    def alphabet(self) -> np.ndarray:
        """Ids of the tokens whose whole text is made of the answer's characters (the fallback candidates)."""
        if self._alphabet_ids is None:
            size = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            keep = [i for i, t in enumerate(texts) if t and set(t) <= _ALPHABET]
            self._texts.update({i: texts[i] for i in keep})
            self._alphabet_ids = np.asarray(keep, dtype=np.int64)
            self._longest = max((len(texts[i]) for i in keep), default=0)
        return self._alphabet_ids

    def valid_ids(self, grammar: AnswerGrammar, state: tuple[int, int, str, str]) -> np.ndarray:
        """Ids of the alphabet tokens whose text keeps `grammar` on track from `state`, cached: a token of at most
        `n` characters crosses at most `n` segments, so the answer is the same wherever the next `n + 1` segments,
        the position in the current one, the digits written so far and the allowed cells are the same (with `cells`:
        also which number field comes first and the slot's `X`), e.g. the same asked (d, t) in another user's
        answer."""
        ids = self.alphabet()
        seg, pos, digits, x = state
        limited = grammar.cells is not None  # only then do X and Y fields differ, and Y depend on the slot's X
        key = (grammar.lo, grammar.hi, grammar.cells, seg % 4 if limited else 0,
               tuple(grammar.segments[seg:seg + self._longest + 1]), pos, digits, x if limited else "")
        valid = self._valid.get(key)
        if valid is None:
            valid = np.asarray([i for i in ids.tolist() if grammar.advance(state, self.text(i)) is not None],
                               dtype=np.int64)
            self._valid[key] = valid
        return valid


class HumobAnswerLogitsProcessor(LogitsProcessor):
    """A `LogitsProcessor` for greedy `generate` that keeps each row on its [`AnswerGrammar`].

    Rows are the rows of the batch passed to `generate` (left-padded prompts); `asked[i]` is row i's asked slots.
    At each step every unfinished row keeps exactly one token: the first of its `top_k` highest-scoring tokens whose
    text keeps the answer on the grammar, else the best-scoring such token of the whole vocabulary restricted to the
    answer's characters (computed once per tokenizer), and the best-scoring end-of-sequence id once the answer is
    complete. All other scores become `-inf`, so greedy search picks that token. Finished rows are left alone
    (`generate` pads them).

    Attributes:
        overrides (`np.ndarray`): per row, the steps where the model's own top token was replaced (it left the
            grammar); the rest of its tokens are its own choices.

    Args:
        tokenizer: the model's tokenizer (token texts come from `tokenizer.decode([id])`).
        asked (`Sequence`): per row, an `(m, 2)` array of its asked (d, t).
        cell_range (`tuple[int, int]`): `(lo, hi)`, the valid cell numbers.
        eos_token_id (`int` or `Sequence[int]`): the end-of-sequence id(s).
        top_k (`int`, *optional*, defaults to 32): candidates read per row before falling back to the vocabulary.
        token_texts ([`TokenTexts`], *optional*): a token-text cache of the same tokenizer to share between the
            processors of several batches (the vocabulary is then decoded once per run, not once per batch).
        cells (`Sequence`, *optional*): per row, a `(k, 2)` array of the only cells its answer may hold, or `None`
            for every cell of `cell_range` (see [`AnswerGrammar`]).
        answer_style (`str`, *optional*, defaults to `"compact"`): the answer style the model was trained on
            (`"compact"` or `"spaced"`, see [`AnswerGrammar`]).
    """

    def __init__(self, tokenizer, asked: Sequence[Any], cell_range: tuple[int, int], eos_token_id, top_k: int = 32,
                 token_texts: TokenTexts | None = None, cells: Sequence[Any] | None = None,
                 answer_style: str = "compact"):
        eos = [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]
        if not eos:
            raise ValueError("eos_token_id must name at least one token")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        self.texts = token_texts if token_texts is not None else TokenTexts(tokenizer)
        asked = list(asked)
        cells = [None] * len(asked) if cells is None else list(cells)
        if len(cells) != len(asked):
            raise ValueError(f"cells has {len(cells)} entries for {len(asked)} rows: give one per row (None: the grid)")
        self.grammars = [AnswerGrammar(a, *cell_range, cells=c, style=answer_style) for a, c in zip(asked, cells)]
        self.eos = eos
        self.top_k = int(top_k)
        self.states: list[tuple[int, int, str, str] | None] = [g.start for g in self.grammars]
        self.overrides = np.zeros(len(self.grammars), dtype=np.int64)
        self._finished = np.zeros(len(self.grammars), dtype=bool)
        self._started = False

    def _choose(self, row: int, state, top_ids: np.ndarray, row_scores) -> int:
        grammar = self.grammars[row]
        if grammar.is_complete(state):
            eos = self.eos
            return eos[int(np.argmax(row_scores[eos].float().cpu().numpy()))] if len(eos) > 1 else eos[0]
        for rank, tid in enumerate(top_ids.tolist()):
            if tid in self.eos:
                continue
            text = self.texts.text(tid)  # an empty text (some special tokens) would not move the answer on: never taken
            if text and grammar.advance(state, text) is not None:
                if rank:
                    self.overrides[row] += 1
                return tid
        # the next candidates in score order: the first on the grammar is the best-scoring valid token (cells limited
        # to a person's records leave many states where the top few all fail; this avoids decoding the vocabulary)
        deeper = row_scores.topk(min(_DEEPER, row_scores.shape[-1])).indices.cpu().numpy()
        tried = set(top_ids.tolist())
        for tid in deeper.tolist():
            if tid in tried or tid in self.eos:
                continue
            text = self.texts.text(tid)
            if text and grammar.advance(state, text) is not None:
                self.overrides[row] += 1
                return tid
        valid_ids = self.texts.valid_ids(grammar, state)
        if len(valid_ids) == 0:
            raise RuntimeError(f"no token of the vocabulary continues the answer of row {row} (state {state}); the "
                               "tokenizer cannot write the digits and brackets of the answer one piece at a time")
        self.overrides[row] += 1
        best = int(np.argmax(row_scores[valid_ids].float().cpu().numpy()))
        return int(valid_ids[best])

    def next_tokens(self, rows: np.ndarray, scores) -> np.ndarray:
        """The token each of `rows` takes next (the same choice as `__call__`), advancing their states: for a decode
        loop that calls the model itself ([`train.greedy_decode.greedy_decode`]) and drops finished rows.

        Args:
            rows (`np.ndarray`): the processor's row indices still decoding.
            scores (`torch.FloatTensor` of shape `(len(rows), vocab)`): their next-token logits.
        """
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        if scores.shape[0] != len(rows) or (len(rows) and (rows.min() < 0 or rows.max() >= len(self.grammars))):
            raise ValueError(f"next_tokens needs one score row per row index in 0..{len(self.grammars) - 1}, got "
                             f"{len(rows)} rows and {scores.shape[0]} score rows")
        k = min(self.top_k, scores.shape[-1])
        top = torch.topk(scores, k, dim=-1).indices.cpu().numpy()
        chosen = np.empty(len(rows), dtype=np.int64)
        for j, row in enumerate(rows.tolist()):
            if self._finished[row]:
                raise ValueError(f"row {row} has already ended its answer")
            token = self._choose(row, self.states[row], top[j], scores[j])
            chosen[j] = token
            if token in self.eos:
                self._finished[row] = True
            else:
                self.states[row] = self.grammars[row].advance(self.states[row], self.texts.text(token))
        return chosen

    def __call__(self, input_ids, scores):
        import torch

        rows = scores.shape[0]
        if rows != len(self.grammars):
            raise ValueError(f"the batch has {rows} rows but the processor was built for {len(self.grammars)} "
                             "(one asked-slot list per row; beam search and num_return_sequences > 1 are not "
                             "supported)")
        if self._started:  # advance every row by the token it was given at the previous step
            last = input_ids[:, -1].cpu().numpy()
            for row in range(rows):
                if self._finished[row]:
                    continue
                tid = int(last[row])
                if tid in self.eos:
                    self._finished[row] = True
                    continue
                state = self.grammars[row].advance(self.states[row], self.texts.text(tid))
                if state is None:  # generate did not take the forced token (e.g. a custom pad): stop constraining
                    self._finished[row] = True
                    continue
                self.states[row] = state
        k = min(self.top_k, scores.shape[-1])
        top = torch.topk(scores, k, dim=-1).indices.cpu().numpy()
        chosen = np.full(rows, -1, dtype=np.int64)
        for row in range(rows):
            if not self._finished[row]:
                chosen[row] = self._choose(row, self.states[row], top[row], scores[row])
        self._started = True
        active = np.flatnonzero(chosen >= 0)
        if len(active) == 0:
            return scores
        out = scores.clone()
        index = torch.as_tensor(active, device=scores.device)
        out[index] = float("-inf")
        out[index, torch.as_tensor(chosen[active], device=scores.device)] = 0.0
        return out
