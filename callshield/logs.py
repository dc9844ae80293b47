"""structlog as one JSON object per line on stderr, the shape log shippers expect: the setup
every callshield program (server, worker, plugins, console) shares.

It lives here rather than in ``server`` so that the telephony plugins configure their logs
without importing the server. What a program logs about a call (which ids, hashed or plain)
stays with the program (``server/logs.py``, the plugins' ``--log-call-ids``).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info") -> None:
    """JSON lines on stderr at ``level`` (debug, info, warning, error) and above."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
