"""The fraud desk's console: live calls, alerts and analyst verdicts (``python -m console``).

It watches a detection server's admin feed (``WatchCalls``, server/events.py), stores what it
sees (metadata only, unless ``--keep-flagged-audio`` keeps the alerts' audio for review) in
a SQLAlchemy database, and serves server-rendered pages updated by server-sent events. See
docs/console.md.
"""
