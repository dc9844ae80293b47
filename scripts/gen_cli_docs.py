"""Writes ``docs/reference/cli.md`` from the ``--help`` of every callshield program.

The reference is generated rather than written because the flags change often and a page
copied by hand goes stale silently; ``tests/test_docs.py`` regenerates it and fails when the
committed file differs, so ``make docs`` is the one step after adding a flag.

Every program runs in one child process (torch and grpc import once, not once per
subcommand) with a clean environment: ``CALLSHIELD_*`` variables are dropped, because they
become the flags' defaults, and the terminal width is pinned, because argparse wraps help
text to it. Subcommands are found in each help text (``{a,b}`` under "positional
arguments"), so a new subcommand appears without an edit here.

Usage: ``python scripts/gen_cli_docs.py`` (write) or ``--check`` (exit 1 when stale).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference" / "cli.md"
COLUMNS = "100"
PYTHON_MARK = "Generated with Python"


def python_version() -> str:
    """``3.11``: the help layout is argparse's, which changes between Python versions."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"

#: (the command as a user types it, how to run it: "module:NAME" or "func:MODULE:ATTR")
PROGRAMS: tuple[tuple[str, str], ...] = (
    ("python -m server", "module:server"),
    ("python -m server.worker", "module:server.worker"),
    ("python -m plugins", "module:plugins"),
    ("client", "func:client.cli:main"),
    ("python -m models", "module:models"),
    ("python -m console", "module:console"),
)

# Runs in the child: for each (target, argv) prints the help text that argv produces, as one
# JSON list, so that the parent sees exactly what a user's terminal would.
_DRIVER = r"""
import contextlib, importlib, io, json, runpy, sys
out = []
for target, prog, argv in json.loads(sys.argv[1]):
    buffer = io.StringIO()
    sys.argv = [prog, *argv]
    with contextlib.redirect_stdout(buffer):
        try:
            kind, _, name = target.partition(":")
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=False)
            else:
                module, _, attr = name.partition(":")
                getattr(importlib.import_module(module), attr)()
        except SystemExit:
            pass
    out.append(buffer.getvalue())
sys.__stdout__.write(json.dumps(out))
"""


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSHIELD_")}
    env.update(COLUMNS=COLUMNS, LINES="50", PYANNOTE_METRICS_ENABLED="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def _helps(requests: list[tuple[str, str, list[str]]]) -> list[str]:
    """The help texts of ``requests`` ((target, prog, argv) each), from one child process."""
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(requests)], cwd=ROOT, env=_environment(),
        capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"--help failed (exit {result.returncode}):\n{result.stderr}")
    texts: list[str] = json.loads(result.stdout)
    for (_target, prog, argv), text in zip(requests, texts, strict=True):
        if not text.startswith("usage:"):
            raise RuntimeError(f"{prog} {' '.join(argv)} printed no help:\n{text}")
    return texts


def subcommands(help_text: str) -> list[str]:
    """The choices of a subcommand positional (``  {train,score}`` under "positional
    arguments"), or none."""
    section = help_text.split("\npositional arguments:\n", 1)
    if len(section) < 2:
        return []
    match = re.search(r"^  \{([\w,-]+)\}", section[1], flags=re.MULTILINE)
    return match.group(1).split(",") if match else []


def programs() -> list[tuple[str, str]]:
    """The programs of :data:`PROGRAMS` whose package is in this checkout."""
    def package(target: str) -> str:
        return target.split(":")[1].split(".")[0]
    return [(command, target) for command, target in PROGRAMS
            if (ROOT / package(target)).is_dir()]


def collect() -> list[tuple[str, str]]:
    """(command line, help text) for every program and, depth first, its subcommands."""
    pending = [(command, target, []) for command, target in programs()]
    done: dict[tuple[str, tuple[str, ...]], str] = {}
    while pending:  # one child per level of subcommands (two levels today)
        requests = [(target, command.split()[-1], [*argv, "--help"])
                    for command, target, argv in pending]
        texts = _helps(requests)
        after = []
        for (command, target, argv), text in zip(pending, texts, strict=True):
            done[(command, tuple(argv))] = text
            after += [(command, target, [*argv, sub]) for sub in subcommands(text)]
        pending = after
    order: list[tuple[str, str]] = []

    def visit(command: str, argv: tuple[str, ...]) -> None:
        text = done[(command, argv)]
        order.append((" ".join([command, *argv]), text))
        for sub in subcommands(text):
            visit(command, (*argv, sub))

    for command, _target in programs():
        visit(command, ())
    return order


def anchor(title: str) -> str:
    """GitHub's heading anchor for a heading of plain text and code spans."""
    text = title.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def render() -> str:
    sections = collect()
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated by `make docs` (scripts/gen_cli_docs.py) from each program's --help;",
        "     do not edit by hand: tests/test_docs.py fails when this file is stale.",
        f"     {PYTHON_MARK} {python_version()} (argparse's layout differs between versions). -->",
        "",
        "Every program's `--help`, as printed with `CALLSHIELD_*` unset. Each flag of the",
        "server, the Redis worker, the telephony plugins and the console also reads an",
        "environment variable, named after the flag in its help text (`env CALLSHIELD_...`); a",
        "flag given on the command line wins. The scheme: [environment.md](environment.md).",
        "",
    ]
    lines += [f"- [`{command}`](#{anchor(command)})" for command, _ in sections]
    for command, text in sections:
        lines += ["", f"## `{command}`", "", "```text", text.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the committed file differs from a fresh one")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
