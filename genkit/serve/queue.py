"""A bounded queue and worker threads that coalesce requests into engine batches.

Each request becomes a `Ticket`: its jobs (one per image) and a key; jobs of different tickets
with the same key (model, LoRAs, `Job.batch_key()`) run in one batch of up to `max_batch`, the
oldest waiting job deciding which key goes next. The engine seeds each image on its own, so a
coalesced image has the pixels it would have alone. One thread runs every batch: it owns the
models. With several workers (`workers=`: one per GPU, or CPU processes; genkit.serve.workers) each
has a thread here that takes the next batch when its worker is free and hands it to that worker.

- Over `max_queue` waiting images, `submit` raises `QueueFull` (the server answers 429).
- `cancel(ticket)` (a client that went away) drops its waiting jobs at once; a running batch
  whose requests are all cancelled stops at its next step.
- `interrupt()` (A1111's) stops the running batch at its next step and drops the waiting jobs
  of the requests in it; they are answered with the images they already have.
- An exception inside a batch fails that batch's requests only; the worker keeps going (a worker
  process that died is restarted by its `run_batch`).
- A batch's images are delivered (`deliver`: written, recorded) on a thread of their own while the
  worker runs the next batch, at most one batch behind, in order.
- `observers`: callables given `(event, **fields)`; after each batch `("batch", worker=, images=,
  requests=, seconds=, outcome="ok"|"failed"|"stopped")` (genkit.serve.metrics).
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


class LocalWorker:
    """A worker in this process: the coalescer's own `run_batch` (the server's models)."""

    def __init__(self, name: str, run_batch: Callable):
        self.name, self._run_batch = name, run_batch

    def run_batch(self, key, jobs, check):
        return self._run_batch(key, jobs, check)

    def ready(self) -> bool:
        return True

    def alive(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


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
                 deliver: Callable | None = None, workers: list | None = None):
        self.run_batch, self.deliver = run_batch, deliver or (lambda ticket, job, output: output)
        self.max_batch, self.max_queue, self.gather = max_batch, max_queue, gather
        # the default: one worker in this process, calling self.run_batch (set after construction by the app)
        self.workers: list = []
        self.pending: deque = deque()  # (ticket, position) in arrival order
        self.batches: dict = {}  # worker name -> its running batch [(ticket, position)]
        self.progresses: dict = {}  # worker name -> its batch's Progress
        self.busy: dict = {}  # worker name -> batches, images and seconds it ran
        self.add_workers(workers or [LocalWorker("0", lambda *args: self.run_batch(*args))])
        self.stats = {"batches": 0, "images": 0, "shared_batches": 0, "largest_batch": 0}  # shared: >1 request
        self.observers: list = []
        self._seconds_per_batch = 0.0
        self._interrupt: set = set()  # workers whose batch must stop at its next step
        self._stopping = False
        self._cond = threading.Condition()
        self._threads: list = []
        # deliveries run here while the workers make the next batches (the GPU need not wait for PNG encoding)
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genkit-serve-deliver")
        self._delivering: dict = {}  # worker name -> its last batch's delivery (Future)

    @property
    def running(self) -> list:
        """Every running batch's (ticket, position), all workers together."""
        return [item for batch in self.batches.values() for item in batch]

    @property
    def progress(self) -> Progress:
        """The progress of the batch that started first (A1111's /progress shows one)."""
        running = [self.progresses[name] for name in self.batches if name in self.progresses]
        return min(running, key=lambda p: p.started) if running else Progress()

    def add_workers(self, workers: list) -> None:
        """More workers (before `start`)."""
        for worker in workers:
            self.workers.append(worker)
            self.progresses[worker.name] = Progress()
            self.busy[worker.name] = {"batches": 0, "images": 0, "seconds": 0.0}

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
        """Stop every running batch at its next step (A1111's /interrupt)."""
        with self._cond:
            if not self.batches:
                return False
            self._interrupt |= set(self.batches)
            return True

    def waiting_images(self) -> int:
        with self._cond:
            return len(self.pending)

    def status(self) -> dict:
        with self._cond:
            progress, running = self.progress, self.running
            workers = [{"name": w.name, "busy": w.name in self.batches, "alive": w.alive(), "ready": w.ready(),
                        **self.busy[w.name]} for w in self.workers]
            return {**self.stats, "running": len(running), "waiting": len(self.pending), "step": progress.step,
                    "steps": progress.steps, "started": progress.started, "interrupted": progress.interrupted,
                    "task": progress.task, "requests": len({id(t) for t, _ in [*running, *self.pending]}),
                    "workers": workers}

    def ticket_progress(self, ticket: Ticket) -> dict:
        """One request's progress: its images done, and the step of the batch running its images (if any)."""
        with self._cond:
            step = steps = 0
            for name, batch in self.batches.items():
                if any(t is ticket for t, _ in batch):
                    step, steps = self.progresses[name].step, self.progresses[name].steps
            return {"images": len(ticket.jobs), "images_done": sum(o is not None for o in ticket.outputs),
                    "running": any(t is ticket for t, _ in self.running), "step": step, "steps": steps,
                    "waiting": sum(1 for t, _ in self.pending if t is ticket)}

    def ready(self) -> bool:
        """Every worker has its models loaded."""
        return all(worker.ready() for worker in self.workers)

    def seconds_per_batch(self) -> float:
        return self._seconds_per_batch

    # -- the worker's side -----------------------------------------------------------------
    def start(self) -> None:
        for worker in self.workers:
            worker.start()
            thread = threading.Thread(target=self._loop, args=(worker,), name=f"genkit-serve-worker-{worker.name}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._interrupt |= set(self.batches)
            for ticket in {id(t): t for t, _ in self.pending}.values():
                self._drop(ticket)
                self._fail(ticket, ShuttingDown("the server is shutting down; retry later"))
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._delivery.shutdown(wait=True)  # the images of a finished batch are still delivered
        for worker in self.workers:
            worker.stop()

    def _loop(self, worker) -> None:
        while True:
            with self._cond:
                while not (self.pending and worker.ready()) and not self._stopping:
                    self._cond.wait(0.5 if self.pending else None)  # a worker still loading looks again soon
                if self._stopping:
                    return
                self._gather()
                batch = self._take()
                if not batch:
                    continue
                self.batches[worker.name] = batch
                self._interrupt.discard(worker.name)
                first = batch[0][0].jobs[batch[0][1]]
                self.progresses[worker.name] = Progress(steps=getattr(first, "num_inference_steps", 0),
                                                        images=len(batch), started=time.monotonic(),
                                                        task=getattr(first, "task", None))
            self._run(worker, batch)

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
        """The oldest waiting job's key, and up to max_batch waiting jobs with that key, in order; with other workers
        free too, this one's share of them (8 waiting, 2 free workers: 4 each), so no worker idles while another
        runs a batch it could have split."""
        if not self.pending:
            return []
        key = self.pending[0][0].key
        free = sum(1 for w in self.workers if w.name not in self.batches and w.ready())
        same = sum(1 for item in self.pending if item[0].key == key)
        limit = min(self.max_batch, math.ceil(same / max(1, free)))
        batch, rest = [], deque()
        for item in self.pending:
            if len(batch) < limit and item[0].key == key:
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        self.stats["batches"] += 1
        self.stats["images"] += len(batch)
        self.stats["shared_batches"] += len({id(t) for t, _ in batch}) > 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        return batch

    def _checker(self, name: str) -> Callable:
        def check(step: int, steps: int) -> None:
            with self._cond:
                progress = self.progresses[name]
                progress.step, progress.steps = step, steps
                interrupted = name in self._interrupt
                if interrupted or all(ticket.cancelled for ticket, _ in self.batches.get(name, ())):
                    progress.interrupted = interrupted
                    raise Stopped()

        return check

    def _run(self, worker, batch: list) -> None:
        started = time.monotonic()
        tickets = list({id(t): t for t, _ in batch}.values())
        outcome = "ok"
        try:
            outputs = worker.run_batch(batch[0][0].key, [t.jobs[p] for t, p in batch], self._checker(worker.name))
        except Stopped:
            outcome = "stopped"
            with self._cond:
                for ticket in tickets:
                    ticket.interrupted = worker.name in self._interrupt
                    self._drop(ticket)
                    ticket.waiting -= sum(1 for t, _ in batch if t is ticket)
                    self._settle(ticket)
        except Exception as exc:  # noqa: BLE001 - one batch's failure must not stop the server
            outcome = "failed"
            log.exception("a batch of %d image(s) failed on worker %s", len(batch), worker.name)
            with self._cond:
                for ticket in tickets:
                    self._drop(ticket)
                    self._fail(ticket, exc)
        else:
            took = time.monotonic() - started
            self._seconds_per_batch = 0.7 * self._seconds_per_batch + 0.3 * took if self._seconds_per_batch else took
            previous = self._delivering.get(worker.name)
            if previous is not None:
                previous.result()  # at most one batch behind: a slow disk slows the worker, not memory
            try:
                self._delivering[worker.name] = self._delivery.submit(self._deliver_batch, batch, outputs)
            except RuntimeError:  # stop() gave up waiting for this batch and closed the delivery thread
                self._deliver_batch(batch, outputs)
        finally:
            took = time.monotonic() - started
            with self._cond:
                self.batches.pop(worker.name, None)
                self.progresses[worker.name].step = 0
                busy = self.busy[worker.name]
                busy["batches"] += 1
                busy["images"] += len(batch) if outcome == "ok" else 0
                busy["seconds"] += took
                self._cond.notify_all()
            for observer in self.observers:
                try:
                    observer("batch", worker=worker.name, images=len(batch), requests=len(tickets), seconds=took,
                             outcome=outcome)
                except Exception:  # noqa: BLE001 - monitoring must not stop the server
                    log.exception("a queue observer failed")

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
