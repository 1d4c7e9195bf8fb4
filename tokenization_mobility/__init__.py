"""Tokenizers of hf-mobility (QT-Mob location code tokens on top of a stock Hugging Face tokenizer).

`LocationTokenizer` and `build_bpe_tokenizer` live in `tokenization_location.py` (self-contained, so it can be copied
next to a saved tokenizer for `trust_remote_code`); constrained decoding (`make_prefix_allowed_tokens_fn`,
`LocationCodeLogitsProcessor`, `rank_locations`, `rank_locations_cached`) lives in `constrained.py` and is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tokenization_location import LocationTokenizer, build_bpe_tokenizer

if TYPE_CHECKING:
    from .constrained import (
        LocationCodeLogitsProcessor,
        make_prefix_allowed_tokens_fn,
        rank_locations,
        rank_locations_cached,
    )

__all__ = [
    "LocationCodeLogitsProcessor",
    "LocationTokenizer",
    "build_bpe_tokenizer",
    "make_prefix_allowed_tokens_fn",
    "rank_locations",
    "rank_locations_cached",
]

_CONSTRAINED = {"LocationCodeLogitsProcessor", "make_prefix_allowed_tokens_fn", "rank_locations", "rank_locations_cached"}


def __getattr__(name: str):
    if name in _CONSTRAINED:
        from . import constrained

        return getattr(constrained, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
