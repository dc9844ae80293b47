"""The base of the exceptions raised under ``plugins/``.

Each plugin error keeps its builtin base too (``SignatureError`` is still a ``ValueError``),
so existing ``except`` clauses catch what they caught before, while a transport or a test can
tell a plugin-side failure (a platform breaking its protocol, the detector going away, an
unusable AMI or signature header) from a bug with one ``except PluginError``. Mirrors
:mod:`server.errors` and :mod:`models.errors`.
"""

from __future__ import annotations


class PluginError(Exception):
    """Base of every exception class defined under ``plugins/``."""
