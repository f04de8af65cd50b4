"""Test-suite settings and shared fixtures.

The tests use tiny tensors, where one thread is fastest and steadiest (two OpenMP threads competing
with another process can make a one-token step 30x slower). ``published_tiny`` is the folder of data
made with the published KVM code (tests/fixtures/kvm_published_tiny: README.md describes it,
PROVENANCE.md says where it comes from and lists its SHA-256 sums).
"""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

PUBLISHED_TINY = Path(__file__).resolve().parent / "fixtures" / "kvm_published_tiny"
PUBLISHED_TINY_FILES = ("README.md", "PROVENANCE.md", "config.json", "config.yaml", "kvm_state.safetensors",
                        "logits.safetensors", "model.safetensors", "tokens.json")


@pytest.fixture(scope="session")
def published_tiny() -> Path:
    """The published-code fixture's folder. A missing file fails every test that uses it, by name."""
    missing = [str(PUBLISHED_TINY / name) for name in PUBLISHED_TINY_FILES if not (PUBLISHED_TINY / name).is_file()]
    if missing:
        pytest.fail(f"the published-code fixture is incomplete, missing: {', '.join(missing)}", pytrace=False)
    return PUBLISHED_TINY
