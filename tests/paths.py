"""Where the shared developer material lives: ``../shared`` beside the checkout."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"
CALLS = SHARED / "calls"
REFERENCE = SHARED / "reference"


def require(path: Path) -> Path:
    """Skip the test when a piece of ../shared is missing (a bare clone elsewhere)."""
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path
