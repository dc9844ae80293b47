"""Where the shared developer material lives: ``../shared`` beside the checkout."""

import os
from pathlib import Path

import pytest

from devstack import ROOT, SHARED

REPO = ROOT

CORPUS = SHARED / "corpus"
CALLS = SHARED / "calls"
REFERENCE = SHARED / "reference"


def missing(what: str) -> None:
    """A real part the test needs is not here. Locally that is a skip naming it; under CI
    (``CI=true``) it is a failure, so a layout change cannot silently drop tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: required, not skipped)", pytrace=False)
    pytest.skip(what)


def require(path: Path) -> Path:
    """The path, or :func:`missing` when a piece of ../shared is not there."""
    if not path.exists():
        missing(f"{path} is not available")
    return path
