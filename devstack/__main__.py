"""``python -m devstack`` (``make run-redis``): the Redis stack in the foreground."""

from devstack import main

main()
