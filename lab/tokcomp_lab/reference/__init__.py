"""Faithful reference implementations that run on Hugging Face transformers models (no vLLM), used to compare
the served forms against the published algorithms."""
