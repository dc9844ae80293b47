"""Benchmarks (``make bench-*``): each module measures one area on the shipped defaults and
writes ``bench/results/<name>.json`` (the numbers) and ``<name>.md`` (the table the docs
quote). What the commands share lives here."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def command(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a bench command (its module docstring as the help). Also turns
    pyannote.audio's telemetry off before anything the command runs can import it: the
    benches read call audio."""
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    return argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def page(lines: list[str], *notes: str) -> str:
    """A results page: the table ``lines``, then each note as a paragraph of its own."""
    return "\n".join([*lines, *(part for note in notes for part in ("", note))]) + "\n"


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """``payload`` as ``bench/results/<name>.json`` and ``markdown`` as ``<name>.md``; the
    table is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
