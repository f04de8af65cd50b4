"""Linear-RNN operators in pure PyTorch (chunked GLA, gated delta rule, DPLR delta rule), with fla's
Triton kernels as an optional backend where they can run (``backend``).
"""
