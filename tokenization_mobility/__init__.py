"""Tokenizers of hf-mobility (QT-Mob location code tokens on top of a stock Hugging Face tokenizer)."""
