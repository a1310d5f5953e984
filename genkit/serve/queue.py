"""A bounded queue and one worker thread that coalesces requests into engine batches.

Each request becomes a `Ticket`: its jobs (one per image) and a key; jobs of different tickets
with the same key (model, LoRAs, `Job.batch_key()`) run in one batch of up to `max_batch`, the
oldest waiting job deciding which key goes next. The engine seeds each image on its own, so a
coalesced image has the pixels it would have alone. One thread runs every batch: it owns the
models.

- Over `max_queue` waiting images, `submit` raises `QueueFull` (the server answers 429).
- `cancel(ticket)` (a client that went away) drops its waiting jobs at once; a running batch
  whose requests are all cancelled stops at its next step.
- `interrupt()` (A1111's) stops the running batch at its next step and drops the waiting jobs
  of the requests in it; they are answered with the images they already have.
- An exception inside a batch fails that batch's requests only; the worker keeps going.
- A batch's images are delivered (`deliver`: written, recorded) on a thread of their own while the
  worker runs the next batch, at most one batch behind, in order.
- The worker waits up to `gather` seconds for requests sent together, and less when the batch is
  full or none came for a fifth of it (a lone request waits 2 ms, not 10).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable

log = logging.getLogger("genkit.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server stopped before this request's images were made."""


class Stopped(Exception):
    """The batch was stopped before its end (interrupt, or every requester left)."""


@dataclass(eq=False)
class Ticket:
    """One request's images: jobs in order, filled with outputs as batches finish."""

    key: Hashable
    jobs: list
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    interrupted: bool = False
    files: dict = field(default_factory=dict)  # an edit's input files to keep beside its images: {name: bytes}

    def __post_init__(self):
        self.outputs: list = [None] * len(self.jobs)
        self.waiting = len(self.jobs)  # jobs neither done nor dropped

    def outputs_done(self) -> list:
        return [output for output in self.outputs if output is not None]


@dataclass
class Progress:
    step: int = 0
    steps: int = 0
    images: int = 0
    started: float = 0.0
    interrupted: bool = False
    task: str | None = None  # the running batch's: None (text-to-image), "img2img" or "inpaint"


class Coalescer:
    """`run_batch(key, jobs, check)` makes a batch's outputs; it must call `check(step, steps)` each step."""

    def __init__(self, run_batch: Callable, *, max_batch: int = 8, max_queue: int = 64, gather: float = 0.01,
                 deliver: Callable | None = None):
        self.run_batch, self.deliver = run_batch, deliver or (lambda ticket, job, output: output)
        self.max_batch, self.max_queue, self.gather = max_batch, max_queue, gather
        self.pending: deque = deque()  # (ticket, position) in arrival order
        self.running: list = []
        self.progress = Progress()
        self.stats = {"batches": 0, "images": 0, "shared_batches": 0, "largest_batch": 0}  # shared: >1 request
        self._seconds_per_batch = 0.0
        self._interrupt = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        # deliveries run here while the worker makes the next batch (the GPU need not wait for PNG encoding)
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genkit-serve-deliver")
        self._delivering: Future | None = None

    # -- the requests' side ----------------------------------------------------------------
    def submit(self, ticket: Ticket) -> Ticket:
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if len(self.pending) + len(ticket.jobs) > self.max_queue:
                raise QueueFull(self.retry_after())
            self.pending.extend((ticket, position) for position in range(len(ticket.jobs)))
            self._cond.notify_all()
        return ticket

    def retry_after(self) -> int:
        batches = math.ceil((len(self.pending) + 1) / self.max_batch)
        return max(1, math.ceil(batches * (self._seconds_per_batch or 1.0)))

    def cancel(self, ticket: Ticket) -> None:
        """The requester is gone: drop its waiting jobs; its running ones are discarded."""
        with self._cond:
            ticket.cancelled = True
            self._drop(ticket)
            if not any(t is ticket for t, _ in self.running):
                self._settle(ticket)

    def interrupt(self) -> bool:
        with self._cond:
            if not self.running:
                return False
            self._interrupt = True
            return True

    def waiting_images(self) -> int:
        with self._cond:
            return len(self.pending)

    def status(self) -> dict:
        with self._cond:
            progress = self.progress
            return {**self.stats, "running": len(self.running), "waiting": len(self.pending), "step": progress.step,
                    "steps": progress.steps, "started": progress.started, "interrupted": progress.interrupted,
                    "task": progress.task,
                    "requests": len({id(t) for t, _ in [*self.running, *self.pending]})}

    # -- the worker's side -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="genkit-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._interrupt = bool(self.running)
            for ticket in {id(t): t for t, _ in self.pending}.values():
                self._drop(ticket)
                self._fail(ticket, ShuttingDown("the server is shutting down; retry later"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._delivery.shutdown(wait=True)  # the images of a finished batch are still delivered

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            with self._cond:
                self._gather()
                batch = self._take()
                self.running, self._interrupt = batch, False
                first = batch[0][0].jobs[batch[0][1]] if batch else None
                self.progress = Progress(steps=getattr(first, "num_inference_steps", 0), images=len(batch),
                                         started=time.monotonic(), task=getattr(first, "task", None))
            if batch:
                self._run(batch)

    def _gather(self) -> None:
        """Wait (under the lock) for requests sent together, which arrive a few ms apart: until the oldest key's batch
        could be full, `gather` has passed, or no request came for a fifth of it."""
        deadline, quiet = time.monotonic() + self.gather, self.gather / 5
        seen = len(self.pending)
        while seen < self.max_batch and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(left, quiet))
            if len(self.pending) == seen:
                return  # a quiet spell: nothing more is on its way
            seen = len(self.pending)

    def _take(self) -> list:
        """The oldest waiting job's key, and up to max_batch waiting jobs with that key, in order."""
        if not self.pending:
            return []
        key = self.pending[0][0].key
        batch, rest = [], deque()
        for item in self.pending:
            if len(batch) < self.max_batch and item[0].key == key:
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        self.stats["batches"] += 1
        self.stats["images"] += len(batch)
        self.stats["shared_batches"] += len({id(t) for t, _ in batch}) > 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        return batch

    def _check(self, step: int, steps: int) -> None:
        with self._cond:
            self.progress.step, self.progress.steps = step, steps
            if self._interrupt or all(ticket.cancelled for ticket, _ in self.running):
                self.progress.interrupted = self._interrupt
                raise Stopped()

    def _run(self, batch: list) -> None:
        started = time.monotonic()
        tickets = list({id(t): t for t, _ in batch}.values())
        try:
            outputs = self.run_batch(batch[0][0].key, [t.jobs[p] for t, p in batch], self._check)
        except Stopped:
            with self._cond:
                for ticket in tickets:
                    ticket.interrupted = self._interrupt
                    self._drop(ticket)
                    ticket.waiting -= sum(1 for t, _ in batch if t is ticket)
                    self._settle(ticket)
        except Exception as exc:  # noqa: BLE001 - one batch's failure must not stop the server
            log.exception("a batch of %d image(s) failed", len(batch))
            with self._cond:
                for ticket in tickets:
                    self._drop(ticket)
                    self._fail(ticket, exc)
        else:
            self._seconds_per_batch = 0.7 * self._seconds_per_batch + 0.3 * (time.monotonic() - started) \
                if self._seconds_per_batch else time.monotonic() - started
            if self._delivering is not None:
                self._delivering.result()  # at most one batch behind: a slow disk slows the worker, not memory
            try:
                self._delivering = self._delivery.submit(self._deliver_batch, batch, outputs)
            except RuntimeError:  # stop() gave up waiting for this batch and closed the delivery thread
                self._deliver_batch(batch, outputs)
        finally:
            with self._cond:
                self.running = []
                self.progress.step = 0

    def _deliver_batch(self, batch: list, outputs: list) -> None:
        """Deliver a finished batch's outputs (the delivery thread), then answer the requests it completes."""
        delivered = []
        for (ticket, position), output in zip(batch, outputs):
            if not ticket.cancelled:
                try:
                    output = self.deliver(ticket, ticket.jobs[position], output)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: this request fails
                    log.exception("could not deliver an image")
                    with self._cond:
                        self._drop(ticket)
                        self._fail(ticket, exc)
                    continue
            delivered.append((ticket, position, output))
        with self._cond:
            for ticket, position, output in delivered:
                ticket.outputs[position] = output
                ticket.waiting -= 1
                self._settle(ticket)

    # -- helpers, under the lock --------------------------------------------------------------
    def _drop(self, ticket: Ticket) -> None:
        kept = deque(item for item in self.pending if item[0] is not ticket)
        ticket.waiting -= len(self.pending) - len(kept)
        self.pending = kept

    def _settle(self, ticket: Ticket) -> None:
        if ticket.waiting <= 0 and not ticket.future.done():
            if ticket.cancelled:
                ticket.future.cancel()
            else:
                ticket.future.set_result(ticket)

    @staticmethod
    def _fail(ticket: Ticket, exc: BaseException) -> None:
        if not ticket.future.done():
            ticket.future.set_exception(exc)
