"""``python -m console``: the fraud desk's console (flags also read from
CALLSHIELD_CONSOLE_<FLAG>).

``python -m console hash-password`` reads a password (prompted, or one line on stdin) and
prints the hash for a ``name:role:hash`` line of the users file.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from server.config import EnvFlags, listen_address

DEFAULT_LISTEN = "127.0.0.1:8765"
SHUTDOWN_SECONDS = 3  # browsers hold their event streams open: cut them after this


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m console",
        description="callshield fraud-desk console: live calls, alerts, analyst verdicts "
                    "(flags also read from CALLSHIELD_CONSOLE_<FLAG>)")
    # CALLSHIELD_CONSOLE_<FLAG>; the admin token also from the server's CALLSHIELD_ADMIN_TOKEN
    env = EnvFlags(p, prefix="CALLSHIELD_CONSOLE_", shared=("admin_token",))
    env.add("--listen", default=DEFAULT_LISTEN,
            help="HOST:PORT of the web console; a bare port binds 127.0.0.1")
    env.add("--server", action="append", dest="servers",
            help="detection server HOST:PORT to watch (repeat for several; "
                 "default 127.0.0.1:50051)")
    env.add("--admin-token", default="",
            help="the servers' admin token (their --admin-token); prefer the environment")
    env.add("--db", default="sqlite:///callshield.db",
            help="SQLAlchemy database URL (e.g. postgresql+psycopg://user@host/callshield)")
    env.add("--users", default="",
            help="users file: name:role:hash lines (roles viewer, analyst); hashes from "
                 "`python -m console hash-password`")
    env.add("--tls", action="store_true", help="TLS to the detection servers")
    env.add("--root-certificates", default="", help="PEM roots for --tls")
    env.add("--session-hours", type=float, default=12.0, help="login lifetime")
    env.add("--secure-cookies", action="store_true",
            help="mark cookies Secure (when served over HTTPS behind a proxy)")
    env.add("--keep-flagged-audio", type=float, default=0.0, metavar="SECONDS",
            help="keep each alert's audio (its range, at most SECONDS, up to 60) for the "
                 "analysts to play on the call page; the servers must allow it "
                 "(--feed-flagged-audio). 0 (default): metadata only, no audio")
    env.add("--flagged-audio-retention-days", type=float, default=30.0, metavar="DAYS",
            help="delete kept audio this many days after it was kept (checked at start "
                 "and hourly)")
    env.add("--log-level", default="info")
    return p


def hash_password_main() -> int:
    from console.users import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("a password needs 8 characters or more", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["hash-password"]:
        return hash_password_main()
    p = parser()
    args = p.parse_args(args_list)
    try:
        host, _, port = listen_address(args.listen).rpartition(":")
    except ValueError as exc:
        p.error(str(exc))
    if not args.users:
        p.error("--users FILE is required (python -m console hash-password makes hashes)")
    if not args.admin_token:
        p.error("--admin-token (or CALLSHIELD_ADMIN_TOKEN) is required: the server's admin "
                "feed refuses watchers without it")
    if not 0 <= args.keep_flagged_audio <= 60:
        p.error("--keep-flagged-audio must lie in [0, 60] seconds")
    if args.flagged_audio_retention_days <= 0:
        p.error("--flagged-audio-retention-days must be positive")
    import uvicorn

    from console.app import ConsoleSettings, create_app
    from console.users import UsersFileError, load_users

    try:
        users = load_users(args.users)
    except (OSError, UsersFileError) as exc:
        p.error(str(exc))
    settings = ConsoleSettings(
        db=args.db, servers=args.servers or ["127.0.0.1:50051"], admin_token=args.admin_token,
        users=users, tls=args.tls, root_certificates=args.root_certificates or None,
        session_hours=args.session_hours, secure_cookies=args.secure_cookies,
        keep_flagged_audio=args.keep_flagged_audio,
        flagged_audio_retention_days=args.flagged_audio_retention_days)
    uvicorn.run(create_app(settings), host=host.strip("[]"), port=int(port),
                log_level=args.log_level, proxy_headers=False,
                timeout_graceful_shutdown=SHUTDOWN_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
