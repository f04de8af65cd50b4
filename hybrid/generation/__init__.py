"""Generating text with a model: prefill, sampling, and batched generation without padding."""
