"""What the ``python -m models`` subcommands share: their options and how one is declared.

Why parent parsers: ``--model``, ``--threads``, ``--device`` and ``--quiet`` mean the same in
every subcommand that takes them; declared once here, their defaults and help cannot drift
apart between ``score``, ``vocode``, ``adapt``, ``calibrate``, ``ship``... Each subcommand's
parser lives beside its task (``add_parser`` in :mod:`models.tasks.adapt`, ...) and
:func:`models.cli.build_parser` only assembles them.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from typing import Any

#: what a subcommand runs: its parsed arguments in, the process' exit code out
Handler = Callable[[argparse.Namespace], int]


def model_names() -> str:
    """``default (= lcnn-fusion), rawnet2-tel, lfcc-gmm``: every name
    :func:`models.inference.load_detector` resolves, an alias beside the name it stands for, so
    that a newly shipped model shows in every ``--model`` help."""
    from models.inference import NAMED_MODELS

    names: list[str] = []
    shown: set[object] = set()
    for name, path in NAMED_MODELS.items():
        if path in shown:
            continue
        shown.add(path)
        aliases = [other for other, p in NAMED_MODELS.items() if p == path and other != name]
        names.append(f"{name} (= {', '.join(aliases)})" if aliases else name)
    return ", ".join(names)


def _parent(*flags: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A parent parser of one option, without a ``-h`` of its own (its children have one)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


MODEL = _parent("--model", default="default", help=f"{model_names()} or a checkpoint path")
THREADS = _parent("--threads", type=int, default=2, help="torch threads")
DEVICE = _parent("--device", default="cpu", help="cpu, cuda or auto")
QUIET = _parent("--quiet", action="store_true", help="no progress bars")


def command(sub: Any, name: str, run: Handler, *, description: str | None = None,
            parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Declare subcommand ``name`` of ``sub`` (``add_subparsers``' result), run by ``run``.

    ``run``'s docstring is the command's documentation, as in click: its first line the
    one-line help of ``python -m models --help``, the rest the description of ``NAME --help``
    (``description`` replaces that where it is computed). So the text that says what a command
    does sits on the code that does it, and the declaration is only the command's flags."""
    summary, _, body = (inspect.getdoc(run) or "").partition("\n")
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary or None, description=description or body.strip() or None,
        parents=list(parents))
    parser.set_defaults(func=run)
    return parser
