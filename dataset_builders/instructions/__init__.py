"""Instruction-set builders for the LLM methods (QT-Mob, Llama-3-8B-Mob)."""

from .humob_qa import HumobQAConfig, build_humob_qa, parse_records  # noqa: F401
