"""Measuring models: perplexity and loss by position, needle in a haystack, lm-eval tasks, speed and state
benchmarks, and the long-context recall experiment."""
