"""Building a config dataclass from a mapping (YAML, a checkpoint's ``model_config``).

Why one function: a misspelt key in a training config or a checkpoint from another version
would otherwise train or load silently with the default; every config refuses unknown keys
with the same message, naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], raw: dict[str, Any], what: str,
                        error: type[Exception] = ValueError) -> T:
    """``cls(**raw)``, or ``error`` naming the keys of ``raw`` that ``cls`` does not have
    (``what``: the config's name in the message)."""
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise error(f"unknown {what} keys: {sorted(unknown)}")
    return cls(**raw)
