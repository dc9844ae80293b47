"""Experiments: what was measured on the way to the shipped models and not shipped.

Not a part of any package the wheel carries (``pyproject.toml`` lists those); a checkout runs
its scripts as ``python -m experiments.<script>``. What each file is and the command that
reproduces it: ``experiments/README.md``.
"""
