"""Validation helpers for mixer option dataclasses.

Every mixer's ``Config`` checks its values in ``__post_init__`` and raises ``ConfigError`` naming
the option, the rule and the value, so recipes can prefix the YAML path
(``model.mixers.kvm.chunk_len: must be > 0, got -4``) instead of failing deep inside torch.
"""

from __future__ import annotations

from typing import Any

from blocks.errors import InputError


class ConfigError(InputError):
    """An option value that breaks a rule. ``field`` names the option."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(field, message)


def require_positive(field: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, f"must be an integer > 0, got {value!r}")


def require_non_negative(field: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field, f"must be an integer >= 0, got {value!r}")


def require_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_heads(d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
    """Resolve (num_heads, num_kv_heads, head_dim) and check they fit ``d_model`` and each other."""
    require_positive("num_heads", num_heads)
    kv = num_heads if num_kv_heads is None else num_kv_heads
    require_positive("num_kv_heads", kv)
    require(num_heads % kv == 0, "num_kv_heads", f"must divide num_heads ({num_heads}), got {kv}")
    if head_dim is None:
        require(d_model % num_heads == 0, "num_heads",
                f"must divide d_model ({d_model}), got {num_heads}; or set head_dim explicitly")
        head_dim = d_model // num_heads
    require_positive("head_dim", head_dim)
    return num_heads, kv, head_dim
