"""The base of the exceptions raised under ``models/``.

Each model error keeps its builtin base too (``ModelNotFoundError`` is still a
``FileNotFoundError``, ``AudioError`` a ``ValueError``), so existing ``except`` clauses catch
what they caught before, while a caller that loads or scores models (the server, the workers,
the benches) can tell a model-side failure from its own with one ``except ModelError``.
Mirrors :mod:`server.errors` and :mod:`plugins.errors`.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base of every exception class defined under ``models/``."""
