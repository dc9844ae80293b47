"""The fraud desk's console: live calls, alerts and analyst verdicts (``python -m console``).

It watches a detection server's admin feed (``WatchCalls``, server/events.py), stores what it
sees (metadata only: no audio) in a SQLAlchemy database, and serves server-rendered pages
updated by server-sent events. See docs/console.md.
"""
