"""Test-suite settings: the tests use tiny tensors, where one thread is fastest and steadiest
(two OpenMP threads competing with another process can make a one-token step 30x slower)."""

import torch

torch.set_num_threads(1)
