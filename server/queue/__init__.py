"""Inference queue: one interface (:class:`InferenceQueue`), two backends.

* ``inprocess``: the embedded default, a batching worker thread in this process;
* ``redis``: Redis Streams, with batching workers (``python -m server.worker``) anywhere.
"""

from server.queue.base import InferenceQueue, QueueUnavailable, WindowJob, WindowScore

__all__ = ["InferenceQueue", "QueueUnavailable", "WindowJob", "WindowScore"]
