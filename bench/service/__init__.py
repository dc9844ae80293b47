"""Service capacity with the shipped defaults, over real gRPC: ``python -m bench.service``
(``make bench``) writes ``bench/results/service.{json,md}``.

* :mod:`bench.service.stack`: the server as ``make run`` starts it (flags read from the
  Makefile), through :class:`devstack.Stack`;
* :mod:`bench.service.audio`: real calls, mono (MIXED) and one party per channel (SPLIT);
* :mod:`bench.service.driver`: real-time streams, per-window latency, the capacity search;
* :mod:`bench.service.report`: the JSON and the markdown.
"""
