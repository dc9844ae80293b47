"""``python -m server``: the detection server (see ``--help``; flags or CALLSHIELD_* env)."""

from __future__ import annotations

import asyncio

from server.app import serve
from server.config import parse_args
from server.logs import configure


def main() -> None:
    config = parse_args()
    configure(config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
