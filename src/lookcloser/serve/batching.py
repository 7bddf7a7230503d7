"""Dynamic micro-batching: one thread runs every model call, predictions grouped into batches.

Requests put their preprocessed image on a queue and wait on a Future. The worker takes the
first waiting prediction, collects more for up to `max_wait_s` or until `max_batch`, and
runs one forward for the group. Explanations (one image, with gradients) run alone on the
same thread, so the model is only ever used by one call at a time. `max_batch=1` turns
batching off (one forward per request) so its gain can be measured.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lookcloser.serve.backends import Backend


@dataclass
class _Predict:
    image: Tensor
    meta: Tensor
    meta_mask: Tensor
    future: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class ModelWorker:
    """The thread that owns the model: batched predictions and one-by-one calls."""

    def __init__(self, backend: Backend, max_batch: int = 8, max_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.forwards = 0  # batches run
        self.predicted = 0  # images predicted
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._users = 0  # app lifespans running: a test client and a fuzzer may overlap
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread (if not running yet); each start needs a stop."""
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="lookcloser-model", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Stop the thread after the jobs queued before this call, once every start has stopped."""
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._thread is None:
                return
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    def predict(self, image: Tensor, meta: Tensor, meta_mask: Tensor) -> Future:
        """A Future of the image's class probabilities (1-D). Cancel it to drop the request."""
        job = _Predict(image, meta, meta_mask)
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """A Future of `fn()`, run on the model thread between batches."""
        job = _Call(fn)
        self._queue.put(job)
        return job.future

    # ---- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        held = None  # a call met while collecting a batch: it runs right after that batch
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is _STOP:
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch = [job]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if isinstance(more, _Predict):
                    batch.append(more)
                else:
                    held = more
                    break
            self._run_batch(batch)

    def _run_call(self, job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the request gave up (timed out) before its turn
        try:
            job.future.set_result(job.fn())
        except BaseException as err:  # handed to the request, which answers for it
            job.future.set_exception(err)

    def _run_batch(self, batch: list[_Predict]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            probs = self.backend.probabilities(
                torch.stack([job.image for job in batch]),
                torch.stack([job.meta for job in batch]),
                torch.stack([job.meta_mask for job in batch]),
            )
        except BaseException as err:
            for job in batch:
                job.future.set_exception(err)
            return
        self.forwards += 1
        self.predicted += len(batch)
        for job, row in zip(batch, probs, strict=True):
            job.future.set_result(row)
