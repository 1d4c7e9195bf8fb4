# Copyright 2026 The hf-mobility developers. Licensed under the Apache License, Version 2.0.
"""Location tokenizer of QT-Mob: semantic location code tokens on top of any Hugging Face fast tokenizer.

Every location of a city is identified by a short tuple of discrete codes (one per level of a residual quantizer,
see `modeling_mobility/rqvae`). [`LocationTokenizer`] wraps a stock fast tokenizer and adds one token per
(level, code) pair, `<a_0> ... <a_{K-1}>`, `<b_0> ...`, one letter per level, so that the location with codes
`(3, 17, 0, 5)` is written `<a_3><b_17><c_0><d_5>` and is always exactly `num_levels` tokens. The tokenizer also holds
the location <-> code table and saves it as `location_codes.json` beside the usual tokenizer files.

This file is self-contained (standard library, `tokenizers` and `transformers` only) so that it can be copied next to
a saved tokenizer and loaded with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import operator
import os
import re
import string
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

LOCATION_CODES_FILE = "location_codes.json"
LEVEL_PREFIXES = string.ascii_lowercase  # default prefixes, one letter per code level: a, b, c, ..., z
MAX_LEVELS = len(LEVEL_PREFIXES)
ID_PREFIX = "loc"  # the one-level "plain ID" format of QT-Mob's ablation: <loc_0>, <loc_1>, ...
_PREFIX = re.compile(r"^[a-z][a-z0-9]*$")
_FORMAT_VERSION = 1

__all__ = ["ID_PREFIX", "LOCATION_CODES_FILE", "LocationTokenizer", "build_bpe_tokenizer"]


def _code_token(level: int, code: int, prefixes: Sequence[str] = LEVEL_PREFIXES) -> str:
    return f"<{prefixes[level]}_{code}>"


def _normalize_prefixes(level_prefixes: Sequence[str] | None, num_levels: int) -> list[str]:
    """One token prefix per level: the given ones (checked) or the default letters a, b, c, ..."""
    if level_prefixes is None:
        return list(LEVEL_PREFIXES[:num_levels])
    if isinstance(level_prefixes, str) or not isinstance(level_prefixes, Sequence):
        raise ValueError(f"`level_prefixes` must be a list of {num_levels} strings, got {level_prefixes!r}")
    prefixes = list(level_prefixes)
    if len(prefixes) != num_levels:
        raise ValueError(
            f"`level_prefixes` has {len(prefixes)} entries but the codes have {num_levels} levels: {prefixes}"
        )
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ValueError(
                f"every level prefix must be lower-case letters/digits starting with a letter (e.g. 'a', 'loc'), "
                f"got {prefix!r}"
            )
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"`level_prefixes` must be distinct, got {prefixes}")
    return prefixes


def _normalize_codebook_size(codebook_size: int | Sequence[int], num_levels: int) -> list[int]:
    """Return one codebook size per level, validating `codebook_size`."""
    if isinstance(codebook_size, bool):
        raise ValueError(
            f"`codebook_size` must be a positive int or a list of {num_levels} ints, got {codebook_size!r}"
        )
    try:
        size = operator.index(codebook_size)
    except TypeError:
        size = None
    if size is not None:
        if size < 1:
            raise ValueError(f"`codebook_size` must be >= 1, got {size}")
        return [size] * num_levels
    if isinstance(codebook_size, (str, bytes)) or not isinstance(codebook_size, Sequence):
        raise ValueError(
            f"`codebook_size` must be a positive int or a list of {num_levels} ints, got {codebook_size!r}"
        )
    if len(codebook_size) != num_levels:
        raise ValueError(
            f"`codebook_size` has {len(codebook_size)} entries but the codes have {num_levels} levels; give one size "
            "per level or a single int"
        )
    sizes = []
    for level, value in enumerate(codebook_size):
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"`codebook_size[{level}]` must be an int, got {value!r}") from None
        if value < 1:
            raise ValueError(f"`codebook_size[{level}]` must be >= 1, got {value}")
        sizes.append(value)
    return sizes


def _validate_location_codes(
    location_codes: Mapping[Any, Sequence[int]], codebook_size: int | Sequence[int] | None
) -> tuple[dict[str, tuple[int, ...]], int, list[int]]:
    """Check a location -> code table; return it normalised (str ids, int tuples), the level count and sizes."""
    if not isinstance(location_codes, Mapping):
        raise ValueError(
            f"`location_codes` must be a mapping location id -> sequence of ints, got {type(location_codes).__name__}"
        )
    if len(location_codes) == 0:
        raise ValueError("`location_codes` is empty; a LocationTokenizer needs at least one location")
    table: dict[str, tuple[int, ...]] = {}
    num_levels = None
    for raw_id, raw_codes in location_codes.items():
        location_id = str(raw_id)
        if location_id in table:
            raise ValueError(f"`location_codes` has two keys that both read {location_id!r} as strings")
        if isinstance(raw_codes, (str, bytes)) or not isinstance(raw_codes, Iterable):
            raise ValueError(f"code of location {location_id!r} must be a sequence of ints, got {raw_codes!r}")
        try:
            codes = tuple(operator.index(c) for c in raw_codes)
        except TypeError:
            raise ValueError(f"code of location {location_id!r} must contain ints only, got {raw_codes!r}") from None
        if num_levels is None:
            num_levels = len(codes)
            if not 1 <= num_levels <= MAX_LEVELS:
                raise ValueError(
                    f"codes must have between 1 and {MAX_LEVELS} levels (one letter a-z per level), got {num_levels} "
                    f"for location {location_id!r}"
                )
        elif len(codes) != num_levels:
            raise ValueError(
                f"all codes must have the same number of levels: location {location_id!r} has {len(codes)} "
                f"({list(codes)}) but the first location has {num_levels}"
            )
        table[location_id] = codes

    if codebook_size is None:
        sizes = [max(codes[level] for codes in table.values()) + 1 for level in range(num_levels)]
    else:
        sizes = _normalize_codebook_size(codebook_size, num_levels)
    seen: dict[tuple[int, ...], str] = {}
    for location_id, codes in table.items():
        for level, code in enumerate(codes):
            if not 0 <= code < sizes[level]:
                raise ValueError(
                    f"code of location {location_id!r} at level {level} is {code}, allowed: 0 <= code < {sizes[level]} "
                    "(`codebook_size`)"
                )
        other = seen.setdefault(codes, location_id)
        if other != location_id:
            raise ValueError(
                f"locations {other!r} and {location_id!r} share the code {list(codes)}; every location needs a unique "
                "code tuple (disambiguate collisions first)"
            )
    return table, num_levels, sizes


class LocationTokenizer(PreTrainedTokenizerFast):
    r"""
    A fast tokenizer that writes locations as semantic code tokens (QT-Mob / LC-Rec style).

    It wraps any Hugging Face fast tokenizer (its `tokenizer.json`, special tokens, chat template and padding side are
    kept) and adds one token per (level, code) pair: `<a_0>`...`<a_{K-1}>` for level 0, `<b_0>`... for level 1, and so
    on (one letter per level, at most 26 levels). The code tokens are plain added tokens (`normalized=False`, not
    special), so they are never split and `decode(..., skip_special_tokens=True)` keeps them. The tokenizer holds the
    location <-> code table and saves it as `location_codes.json` beside the tokenizer files.

    Build one with [`LocationTokenizer.from_base`]; reload it with [`LocationTokenizer.from_pretrained`] or, without
    this library, with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`.

    Args:
        location_codes (`dict[str, Sequence[int]]`, *optional*):
            Location id -> one code per level. Every location must have the same number of levels and a unique code
            tuple. Required unless `location_codes_file` is given.
        codebook_size (`int` or `list[int]`, *optional*):
            Number of codes per level (one int for all levels, or one per level). A token is added for every code of
            every level, used or not. Defaults to the largest code seen per level plus one.
        level_prefixes (`list[str]`, *optional*):
            Token prefix of each level (`<{prefix}_{code}>`): lower-case letters/digits, distinct. Defaults to one
            letter per level (`a`, `b`, ...); QT-Mob's plain-ID ablation uses one level with prefix `"loc"`
            (`<loc_0>`, `<loc_1>`, ...), see [`LocationTokenizer.id_codes`].
        location_codes_file (`str`, *optional*):
            Path of a `location_codes.json` written by [`~LocationTokenizer.save_pretrained`]; `from_pretrained`
            fills it in.
        kwargs (*optional*):
            Passed to [`PreTrainedTokenizerFast`] (`tokenizer_file`, `tokenizer_object`, special tokens, ...).

    Example:

    ```python
    >>> base = build_bpe_tokenizer(["a user visits a cafe", "then a park"], vocab_size=300)
    >>> tok = LocationTokenizer.from_base(base, {"cafe": (3, 1), "park": (0, 2)}, codebook_size=4)
    >>> tok.location_to_text("cafe")
    '<a_3><b_1>'
    >>> tok.text_to_locations("user 7 will visit <a_0><b_2>")
    ['park']
    ```
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json", "location_codes_file": LOCATION_CODES_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        *args,
        location_codes: Mapping[Any, Sequence[int]] | None = None,
        codebook_size: int | Sequence[int] | None = None,
        level_prefixes: Sequence[str] | None = None,
        location_codes_file: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if location_codes is None:
            if location_codes_file is None or not os.path.isfile(location_codes_file):
                raise ValueError(
                    "LocationTokenizer needs `location_codes` (location id -> codes) or a `location_codes_file`; "
                    f"got neither (location_codes_file={location_codes_file!r})"
                )
            location_codes, codebook_size, level_prefixes = self._read_location_codes_file(
                location_codes_file, codebook_size, level_prefixes
            )
        table, num_levels, sizes = _validate_location_codes(location_codes, codebook_size)
        prefixes = _normalize_prefixes(level_prefixes, num_levels)
        self._prefixes = prefixes
        self._location_codes = table
        self._code_to_location = {codes: location_id for location_id, codes in table.items()}
        self._num_levels = num_levels
        self._codebook_sizes = sizes
        self._trie = None

        new_tokens = [
            AddedToken(_code_token(level, code, prefixes), normalized=False, special=False, lstrip=False, rstrip=False)
            for level in range(num_levels)
            for code in range(sizes[level])
        ]
        self.add_tokens(new_tokens)
        self._code_token_ids = [
            [self.convert_tokens_to_ids(_code_token(level, code, prefixes)) for code in range(sizes[level])]
            for level in range(num_levels)
        ]
        self._token_to_code: dict[int, tuple[int, int]] = {}
        for level, ids in enumerate(self._code_token_ids):
            for code, token_id in enumerate(ids):
                if token_id is None or token_id in self._token_to_code:
                    raise ValueError(
                        f"code token {_code_token(level, code, prefixes)!r} could not be given its own id ({token_id})"
                    )
                self._token_to_code[token_id] = (level, code)
        special_ids = {i for i in self.all_special_ids if i is not None}
        clash = sorted(special_ids & self._token_to_code.keys())
        if clash:
            raise ValueError(
                f"the base tokenizer already uses the code tokens {self.convert_ids_to_tokens(clash)} as special tokens"
            )
        group = r"\s*".join(rf"<{prefix}_(\d+)>" for prefix in prefixes)
        self._group_pattern = re.compile(group)

    # ------------------------------------------------------------------------------------------------------------------
    # construction, loading and saving

    @classmethod
    def from_base(
        cls,
        base_tokenizer: PreTrainedTokenizerFast,
        location_codes: Mapping[Any, Sequence[int]],
        codebook_size: int | Sequence[int] | None = None,
        level_prefixes: Sequence[str] | None = None,
    ) -> LocationTokenizer:
        r"""
        Wrap a fast tokenizer and add the code tokens of `location_codes`.

        The base's `tokenizer.json` (vocabulary, normaliser, pre-tokeniser, post-processor, added tokens), special
        tokens, chat template, padding and truncation sides and `model_max_length` are kept; the base object is not
        modified.

        Args:
            base_tokenizer ([`PreTrainedTokenizerFast`]):
                Any fast (Rust-backed) tokenizer, e.g. from `AutoTokenizer.from_pretrained` or [`build_bpe_tokenizer`].
            location_codes (`dict[str, Sequence[int]]`):
                Location id -> one code per level (same number of levels for all, unique tuples, at most 26 levels).
            codebook_size (`int` or `list[int]`, *optional*):
                Codes per level; defaults to the largest code seen per level plus one.
            level_prefixes (`list[str]`, *optional*):
                Token prefix per level (default `a`, `b`, ...; `["loc"]` for plain location-ID tokens).

        Returns:
            [`LocationTokenizer`]: the wrapped tokenizer.
        """
        if not isinstance(base_tokenizer, PreTrainedTokenizerFast):
            raise ValueError(
                "`base_tokenizer` must be a fast tokenizer (a `PreTrainedTokenizerFast`/`TokenizersBackend`), got "
                f"{type(base_tokenizer).__name__}"
            )
        # Validate before doing any file work so that errors are cheap and clear.
        _, num_levels, _ = _validate_location_codes(location_codes, codebook_size)
        _normalize_prefixes(level_prefixes, num_levels)
        with tempfile.TemporaryDirectory(prefix="location_tokenizer_") as tmp:
            base_tokenizer.save_pretrained(tmp)
            stale = os.path.join(tmp, LOCATION_CODES_FILE)
            if os.path.exists(stale):
                os.remove(stale)
            if isinstance(base_tokenizer, LocationTokenizer):
                base_tokenizer._drop_code_tokens(os.path.join(tmp, "tokenizer.json"))
            tokenizer = cls.from_pretrained(
                tmp,
                location_codes=location_codes,
                codebook_size=codebook_size,
                level_prefixes=level_prefixes,
                padding_side=base_tokenizer.padding_side,
                truncation_side=base_tokenizer.truncation_side,
                model_max_length=base_tokenizer.model_max_length,
                model_input_names=list(base_tokenizer.model_input_names),
                local_files_only=True,
            )
        for key in ("auto_map", "location_codes_file", "is_local", "local_files_only"):  # artefacts of the temp folder
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.name_or_path = base_tokenizer.name_or_path
        if base_tokenizer.chat_template is not None:
            tokenizer.chat_template = base_tokenizer.chat_template
        return tokenizer

    def _drop_code_tokens(self, tokenizer_file: str) -> None:
        """Remove this tokenizer's code tokens from a saved `tokenizer.json`, so that `from_base(location_tokenizer,
        other_codes)` re-codes the locations on the original base (e.g. semantic codes -> plain IDs)."""
        with open(tokenizer_file, encoding="utf-8") as handle:
            payload = json.load(handle)
        codes = {token for level in self.code_tokens for token in level}
        kept = [t for t in payload.get("added_tokens", []) if t.get("content") not in codes]
        dropped = [t["id"] for t in payload.get("added_tokens", []) if t.get("content") in codes]
        vocab = payload.get("model", {}).get("vocab", {})
        top = max([t["id"] for t in kept] + [len(vocab) - 1 if isinstance(vocab, (dict, list)) else -1])
        if dropped and min(dropped) <= top:
            raise ValueError(
                "cannot re-code this LocationTokenizer: its code tokens are not the last ids of its vocabulary (tokens "
                "were added after them); build the new one from the original base tokenizer instead"
            )
        payload["added_tokens"] = kept
        with open(tokenizer_file, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        # Always build the backend straight from `tokenizer.json` (the added code tokens live there).
        return super().convert_to_native_format(trust_remote_code=True, **kwargs)

    @staticmethod
    def _read_location_codes_file(
        path: str, codebook_size: int | Sequence[int] | None, level_prefixes: Sequence[str] | None
    ):
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        if not isinstance(payload, dict) or "location_codes" not in payload:
            raise ValueError(f"{path} is not a location code table (no `location_codes` key)")
        if codebook_size is None:
            codebook_size = payload.get("codebook_size")
        if level_prefixes is None:
            level_prefixes = payload.get("level_prefixes")
        return payload["location_codes"], codebook_size, level_prefixes

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        file_names = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        path = os.path.join(
            str(save_directory), (filename_prefix + "-" if filename_prefix else "") + LOCATION_CODES_FILE
        )
        self._write_location_codes_file(path)
        return file_names + (path,)

    def _write_location_codes_file(self, path: str) -> None:
        header = {
            "format_version": _FORMAT_VERSION,
            "num_levels": self._num_levels,
            "codebook_size": self.codebook_size,
            "level_prefixes": list(self._prefixes),
            "token_format": "<{prefix}_{code}>",
            "num_locations": len(self._location_codes),
        }
        lines = ["{"]
        lines += [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
        lines.append('  "location_codes": {')
        items = [
            f"    {json.dumps(location_id, ensure_ascii=False)}: {json.dumps(list(codes))}"
            for location_id, codes in self._location_codes.items()
        ]
        lines.append(",\n".join(items))
        lines += ["  }", "}"]
        tmp_path = path + ".tmp"
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        os.replace(tmp_path, path)

    @staticmethod
    def id_codes(location_ids: Iterable[Any]) -> dict[str, tuple[int]]:
        """
        The code table of QT-Mob's plain-ID ablation: one level, one code per location, in sorted id order.

        Use it with `level_prefixes=[ID_PREFIX]` (`"loc"`), so location number 123 is the single token `<loc_123>`:

        ```python
        >>> codes = LocationTokenizer.id_codes(["p7", "p3"])
        >>> tok = LocationTokenizer.from_base(base, codes, level_prefixes=["loc"])
        >>> tok.location_to_text("p7")
        '<loc_1>'
        ```
        """
        ordered = sorted({str(location_id) for location_id in location_ids})
        return {location_id: (index,) for index, location_id in enumerate(ordered)}

    # ------------------------------------------------------------------------------------------------------------------
    # the code table

    @property
    def location_codes(self) -> Mapping[str, tuple[int, ...]]:
        """Read-only mapping location id -> code tuple (one code per level); `dict(...)` it for a copy."""
        return MappingProxyType(self._location_codes)

    @property
    def location_ids(self) -> list[str]:
        """The location ids of the code table, in table order."""
        return list(self._location_codes)

    @property
    def num_locations(self) -> int:
        """Number of locations in the code table."""
        return len(self._location_codes)

    @property
    def num_levels(self) -> int:
        """Number of code levels (tokens per location)."""
        return self._num_levels

    @property
    def level_prefixes(self) -> list[str]:
        """Token prefix of each level (`["a", "b", ...]`, or `["loc"]` for plain location-ID tokens)."""
        return list(self._prefixes)

    @property
    def codebook_size(self) -> int | list[int]:
        """Codes per level: an int when every level has the same size, else one int per level."""
        sizes = self._codebook_sizes
        return sizes[0] if len(set(sizes)) == 1 else list(sizes)

    @property
    def codebook_sizes(self) -> list[int]:
        """Codes per level, always as a list with one entry per level."""
        return list(self._codebook_sizes)

    @property
    def code_tokens(self) -> list[list[str]]:
        """The code token strings, `[num_levels][codebook_size]`."""
        return [
            [_code_token(level, code, self._prefixes) for code in range(size)]
            for level, size in enumerate(self._codebook_sizes)
        ]

    @property
    def code_token_ids(self) -> list[list[int]]:
        """Token ids of the code tokens, `[num_levels][codebook_size]` (`code_token_ids[level][code]`)."""
        return [list(ids) for ids in self._code_token_ids]

    def code_to_location(self, codes: Sequence[int]) -> str | None:
        """Return the location whose code tuple is `codes`, or `None` when no location has it."""
        try:
            key = tuple(operator.index(c) for c in codes)
        except TypeError:
            return None
        return self._code_to_location.get(key)

    def location_to_codes(self, location_id: str) -> tuple[int, ...]:
        """Return the code tuple of `location_id` (raises `ValueError` for an unknown id)."""
        codes = self._location_codes.get(str(location_id))
        if codes is None:
            raise ValueError(
                f"location_id={location_id!r} is not in the code table of this tokenizer ({len(self._location_codes)} "
                "locations; see `tokenizer.location_ids`)"
            )
        return codes

    def location_to_text(self, location_id: str) -> str:
        """Return the code tokens of `location_id` as text, e.g. `"<a_3><b_17><c_0><d_5>"`."""
        codes = self.location_to_codes(location_id)
        return "".join(_code_token(level, code, self._prefixes) for level, code in enumerate(codes))

    def locations_to_text(self, location_ids: Iterable[str]) -> list[str]:
        """Batch version of [`~LocationTokenizer.location_to_text`]: one code string per location id."""
        return [self.location_to_text(location_id) for location_id in location_ids]

    def location_to_ids(self, location_id: str) -> list[int]:
        """Return the `num_levels` token ids of `location_id` (no special tokens)."""
        codes = self.location_to_codes(location_id)
        return [self._code_token_ids[level][code] for level, code in enumerate(codes)]

    def text_to_locations(self, text: str) -> list[str | None]:
        """
        Parse text (e.g. generated output) back to location ids.

        Every complete code group (`<a_i><b_j>...` through the last level, whitespace between tokens allowed) is
        returned in order of appearance; a complete group whose code tuple belongs to no location gives `None`;
        incomplete groups are ignored.
        """
        return [
            self._code_to_location.get(tuple(int(c) for c in match.groups()))
            for match in self._group_pattern.finditer(text)
        ]

    def ids_to_locations(self, token_ids: Iterable[int]) -> list[str | None]:
        """
        Parse token ids (e.g. a generated sequence) back to location ids without decoding.

        Same rules as [`~LocationTokenizer.text_to_locations`]: every run of code tokens of levels `0..num_levels-1`
        in order is a complete group (unknown tuple -> `None`), anything else is skipped.
        """
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        out: list[str | None] = []
        current: list[int] = []
        for token_id in token_ids:
            entry = self._token_to_code.get(int(token_id))
            if entry is None:
                current = []
                continue
            level, code = entry
            if level == len(current):
                current.append(code)
            elif level == 0:
                current = [code]
            else:
                current = []
                continue
            if len(current) == self._num_levels:
                out.append(self._code_to_location.get(tuple(current)))
                current = []
        return out

    def build_trie(self) -> dict[int, dict]:
        """
        Return a prefix tree over the token ids of all valid code sequences.

        Nested dicts: `trie[id_a][id_b]...[id_last] == {}`; the children of a node are the token ids allowed next.
        The trie is built once and cached; treat it as read-only.
        """
        if self._trie is None:
            trie: dict[int, dict] = {}
            for codes in self._location_codes.values():
                node = trie
                for level, code in enumerate(codes):
                    node = node.setdefault(self._code_token_ids[level][code], {})
            self._trie = trie
        return self._trie


LocationTokenizer.register_for_auto_class("AutoTokenizer")


def build_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    special_tokens: Sequence[str] = ("<pad>", "<s>", "</s>", "<unk>"),
    min_frequency: int = 2,
    split_numbers: bool = False,
) -> PreTrainedTokenizerFast:
    r"""
    Train a small byte-level BPE tokenizer on a corpus (an offline base tokenizer for demos and tests).

    Args:
        texts (`Iterable[str]`):
            The training corpus.
        vocab_size (`int`, *optional*, defaults to 1000):
            Target vocabulary size, at least 256 (the byte alphabet) plus the special tokens.
        special_tokens (`Sequence[str]`, *optional*, defaults to `("<pad>", "<s>", "</s>", "<unk>")`):
            The pad, bos, eos and unk tokens, in this order (they get ids 0-3); further entries are kept as extra
            special tokens.
        min_frequency (`int`, *optional*, defaults to 2):
            Minimum pair frequency for a merge.
        split_numbers (`bool`, *optional*, defaults to `False`):
            Cut runs of digits into pieces of at most 3 digits, apart from the characters around them, before BPE (as
            Llama-3's tokenizer does): a number is then the same token after a space (`"52 121"`) and after a comma
            (`"[52,121]"`), at the price of a token per space.

    Returns:
        [`PreTrainedTokenizerFast`]: the trained tokenizer with `pad_token`, `bos_token`, `eos_token` and `unk_token`
        set; no special tokens are added when encoding.
    """
    special_tokens = list(special_tokens)
    if len(special_tokens) < 4 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(
            f"`special_tokens` must hold at least 4 distinct tokens (pad, bos, eos, unk), got {special_tokens!r}"
        )
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"`vocab_size` must be an int >= {minimum} (byte alphabet + special tokens), got {vocab_size!r}"
        )
    if isinstance(texts, str):
        raise ValueError("`texts` must be an iterable of strings, not a single string")
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_numbers:
        from tokenizers import Regex

        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((str(t) for t in texts), trainer=trainer)
    pad, bos, eos, unk, *extra = special_tokens
    kwargs = {"extra_special_tokens": extra} if extra else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk, **kwargs
    )
