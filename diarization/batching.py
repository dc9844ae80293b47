"""Cross-call batching of the diarizer's model passes, for callers in threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class _Job:
    __slots__ = ("inputs", "result", "error", "done", "lead")

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.inputs = inputs
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lead = False  # woken to run the next pass, not with results


class ConcurrentBatcher:
    """Inputs of concurrent callers go through one model pass together.

    Why: the server runs each MIXED call's diarizer step in a thread of its own, and the
    diarizer's recurrent layers cost per time step more than per sequence: GE2E's LSTM in
    bfloat16 takes 3.2 ms for one 1.6 s partial alone and 0.55-0.65 ms each in a batch of
    16-32; the segmentation model's LSTM 2.0 ms for one 5 s buffer alone, 0.84 ms each in a
    batch of 8. No timer: a caller that finds the model idle runs at once with whatever is
    waiting; callers that arrive while it runs wait and go together in the next pass, run by
    the first of them. So batches grow with the load and an idle server waits for nobody.

    ``run`` maps a list of inputs to a tensor with one leading row per input; each caller
    gets the rows of its own inputs. ``passes`` and ``largest`` (callers in one pass) show
    what happened."""

    def __init__(self, run: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._busy = False
        self.passes = 0
        self.largest = 0

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        job = _Job(inputs)
        with self._lock:
            self._waiting.append(job)
            lead, self._busy = not self._busy, True
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._result(job)
        with self._lock:
            batch, self._waiting = self._waiting, []
            self.passes += 1
            self.largest = max(self.largest, len(batch))
        try:
            out = self._run([x for j in batch for x in j.inputs])
        except BaseException as e:  # every caller of the pass gets it, and the pass goes on
            for j in batch:
                j.error = e
        else:
            start = 0
            for j in batch:
                j.result, start = out[start : start + len(j.inputs)], start + len(j.inputs)
        finally:
            for j in batch:
                if j is not job:
                    j.done.set()
            with self._lock:
                if self._waiting:
                    self._waiting[0].lead = True
                    self._waiting[0].done.set()
                else:
                    self._busy = False
        return self._result(job)

    @staticmethod
    def _result(job: _Job) -> torch.Tensor:
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result
