"""The one way every callshield program reads its flags from the environment, so the same
image runs from a shell, systemd or Kubernetes without a wrapper script.

One naming scheme: flag ``--some-flag`` of a program reads ``CALLSHIELD_<SCOPE>SOME_FLAG``, the
scope being empty for the server (``CALLSHIELD_LISTEN``), ``WORKER_`` for the Redis worker
(``CALLSHIELD_WORKER_DEVICE``), ``PLUGINS_`` for the telephony plugins
(``CALLSHIELD_PLUGINS_AMI_SECRET``) and ``CONSOLE_`` for the console; a flag on the command line
wins. Scoped names let one environment file serve several programs on one host without a
worker taking the server's ``--device`` or ``--metrics-port``; the settings that must agree
with the server's (Redis URL, model, batching, log level) fall back from the worker's name to
the server's.

It lives here, beside the API stubs every program already depends on, rather than in
``server``: the plugins and the console read their flags the same way without importing the
server (whose import registers its Prometheus series in the process's registry).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "CALLSHIELD_"
_TRUE = ("1", "true", "yes", "on")


@dataclass
class EnvFlags:
    """Adds flags to ``parser`` whose defaults come from the environment.

    ``--some-flag`` reads ``{prefix}SOME_FLAG``, then (for a dest in ``shared``)
    ``CALLSHIELD_SOME_FLAG``, then its old name in ``deprecated`` (dest -> variable), the first
    one set and not empty; else the default given. Values are parsed by the flag's own ``type``
    (argparse converts string defaults, so a bad value is a usage error naming the flag),
    ``store_true`` flags take 1/true/yes/on, ``append`` flags a comma-separated list.
    """

    parser: argparse.ArgumentParser
    prefix: str = PREFIX
    shared: Collection[str] = ()
    deprecated: Mapping[str, str] = field(default_factory=dict)
    #: (old variable, its name now) for each deprecated alias that was read
    deprecated_used: list[tuple[str, str]] = field(default_factory=list)

    def variable(self, dest: str) -> str:
        return f"{self.prefix}{dest.upper()}"

    def names(self, dest: str) -> list[str]:
        """The variables ``dest`` reads, first match wins (the deprecated name last)."""
        names = [self.variable(dest)]
        if dest in self.shared:
            names.append(f"{PREFIX}{dest.upper()}")
        if dest in self.deprecated:
            names.append(self.deprecated[dest])
        return names

    def value(self, dest: str) -> str | None:
        names = self.names(dest)
        for name in names:
            raw = os.environ.get(name, "")
            if raw:
                if name == self.deprecated.get(dest):
                    self.deprecated_used.append((name, names[0]))
                return raw
        return None

    def _set_name(self, dest: str) -> str:
        """The variable a value of ``dest`` was read from."""
        return next(n for n in self.names(dest) if os.environ.get(n, ""))

    def add(self, *flags: str, default: Any = None, help: str | None = None,
            **kwargs: Any) -> argparse.Action:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        raw = self.value(dest)
        if raw is not None:
            action = kwargs.get("action")
            if action == "store_true":
                default = raw.lower() in _TRUE
            elif action == "append":
                default = [item.strip() for item in raw.split(",") if item.strip()]
            else:
                default = raw
            choices = kwargs.get("choices")
            if choices is not None and action != "append":
                # argparse checks choices on the command line only, never on a default
                converted = kwargs["type"](default) if "type" in kwargs else default
                if converted not in choices:
                    self.parser.error(f"{self._set_name(dest)}={raw!r}: choose from "
                                      + ", ".join(map(str, choices)))
        current = [n for n in self.names(dest) if n != self.deprecated.get(dest)]
        note = "env " + ", then ".join(current)
        return self.parser.add_argument(*flags, default=default, **kwargs,
                                        help=f"{help} ({note})" if help else f"({note})")
