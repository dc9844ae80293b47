"""Benchmarks (``make bench-*``): each module measures one area on the shipped defaults and
writes ``bench/results/<name>.json`` (the numbers) and ``<name>.md`` (the table the docs
quote). What the commands share lives here."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# The run footer of a page whose payload has a mode and the run's seconds: the end of its
# closing paragraph, so that every such page says how it was run the same way.
RAN = "Mode `{mode}`, {seconds:.0f} s."


@dataclass
class Run:
    """A bench run under way, from :func:`start`: its thread count and its clock, which the
    payload records because the pages quote them."""

    threads: int
    began: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return round(time.time() - self.began, 1)


def start(threads: int) -> Run:
    """The start of a bench run: torch held to ``threads`` before anything is timed (the
    benches share their machine, and a page's seconds mean little without the thread
    count), and the clock started."""
    import torch

    torch.set_num_threads(threads)
    return Run(threads)


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


def prose(template: str, values: Mapping[str, Any]) -> str:
    """One paragraph of a page's fixed prose: ``template``, a module-level string with the
    payload's fields in it, filled by ``str.format_map``. Its line breaks and indentation are
    folded to single spaces first, so the source wraps the wording wherever it likes and the
    page still gets one paragraph."""
    return " ".join(template.split()).format_map(values)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """``payload`` as ``bench/results/<name>.json`` and ``markdown`` as ``<name>.md``; the
    table is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
