"""Instruction-set builders for the LLM methods (QT-Mob, Llama-3-8B-Mob)."""
