"""Workers past the first: one process per extra device (`--devices cuda:0,cuda:1`) or CPU worker (`--workers N`).

The server's own process is worker 0: its models check every request (`Pipeline.plan`) and run batches
like any worker's. Each further worker is a process started with `spawn` that loads the served models by
name, with the server's settings, on its device, and then runs the batches the coalescing queue hands it
(genkit.serve.queue): jobs go in over a pipe already numbered and seeded, so an image's pixels do not
depend on which worker made it (same device kind and threads: CPU workers divide the cores among them, and
the count is in each record), and (image, record) pairs come back. Each worker keeps its own LoRA copies and
current model, as worker 0 does.

A step message comes back every step; the queue's check may answer it with a stop (an interrupt, or every
requester gone), which the worker sees at its next step. A worker process that dies (killed, out of host
memory, a driver fault) fails the batch it held with `WorkerDied` (the server answers 500 with its message),
and is started again; the other workers go on meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("genkit.serve")
POLL_S = 0.25  # how often a waiting parent looks whether its worker still lives


class WorkerDied(RuntimeError):
    """A worker process ended while it held a batch."""


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker process loads what the server serves."""

    models: tuple  # names or folders, as genkit.load takes them
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    memory: object = None
    threads: int | None = None  # CPU threads (GENKIT_THREADS in the worker)
    lora_cache: int = 2
    settings: dict = field(default_factory=dict)  # further genkit.load keywords (exact)


def devices(text: str | None) -> list[str]:
    """`--devices`: a comma-separated list, or `all` for every CUDA device here (the CPU when there is none)."""
    from genkit.errors import GenkitError

    if text is None or not text.strip():
        return []
    if text.strip().lower() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{n}" for n in range(count)] or ["cpu"]
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
            raise GenkitError(f"device {name!r} is not one genkit knows (write --devices cuda:0,cuda:1, "
                              f"all, or cpu)", param="devices")
    return names


class ProcessWorker:
    """A worker in a process of its own; `run_batch` is called by one queue thread at a time."""

    def __init__(self, name: str, spec: WorkerSpec, *, prepare: Callable = lambda jobs: jobs):
        self.name, self.spec, self.prepare = name, spec, prepare
        self.process = self.conn = None
        self.failure: str | None = None  # why the last start did not load
        self.restarts = -1
        self._ready = threading.Event()
        self._stopping = False

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._ready.clear()
        self.conn = parent
        self.process = context.Process(target=_main, args=(child, self.spec, self.name),
                                       name=f"genkit-serve-worker-{self.name}", daemon=True)
        self.process.start()
        child.close()
        self.restarts += 1
        threading.Thread(target=self._await_ready, args=(parent,), daemon=True,
                         name=f"genkit-serve-worker-{self.name}-load").start()

    def _await_ready(self, conn) -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = ("failed", f"the process ended while loading (exit code {self.process.exitcode})")
        if message[0] == "ready":
            self.failure = None
            self._ready.set()
            log.info("worker %s ready on %s (pid %s)", self.name, message[1].get("device"), self.process.pid)
        else:
            self.failure = message[1]
            log.error("worker %s could not load: %s", self.name, message[1])

    def ready(self) -> bool:
        return self._ready.is_set()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self) -> None:
        self._stopping = True
        if self.process is None:
            return
        try:
            self.conn.send(("quit",))
        except (OSError, ValueError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    def restart(self, why: str) -> None:
        log.error("worker %s %s; starting it again", self.name, why)
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        if not self._stopping:
            self.start()

    # -- batches ---------------------------------------------------------------------------------
    def run_batch(self, key, jobs, check):
        from genkit.serve.queue import Stopped

        jobs = self.prepare(jobs)
        try:
            self.conn.send(("batch", key, jobs))
        except (OSError, ValueError):
            self._died()
        stopped = False
        while True:
            message = self._receive()
            kind = message[0]
            if kind == "step" and not stopped:
                try:
                    check(message[1], message[2])
                except Stopped:
                    stopped = True
                    self.conn.send(("stop",))
            elif kind == "done":
                return message[1]
            elif kind == "stopped":
                raise Stopped()
            elif kind == "error":
                raise message[1]

    def _receive(self):
        while True:
            try:
                if self.conn.poll(POLL_S):
                    return self.conn.recv()
            except (EOFError, OSError):
                self._died()
            if not self.process.is_alive():
                if self.conn.poll(0):  # its last words arrived before it ended
                    continue
                self._died()

    def _died(self):
        self.process.join(1)
        code = self.process.exitcode
        self._ready.clear()
        why = f"died (exit code {code}) while making a batch"
        threading.Thread(target=self.restart, args=(why,), daemon=True).start()
        raise WorkerDied(f"worker {self.name} ({self.spec.device or 'default device'}) {why}; it is being restarted, "
                         f"send the request again")


def make_batch(pool, key, jobs, check) -> list:
    """One batch on the pipeline its key names (with its LoRAs): (image, record) pairs in order. Worker 0 and the
    worker processes both run batches through this."""
    from genkit.generate import GenerationConfig

    model, loras, _ = key
    pipeline = pool.pipeline_for(model, loras)
    outputs = []
    # the engine's callback counts the steps the batch runs (an edit: the last int(steps * strength))
    for result in pipeline.iter_generate([job.prompt for job in jobs], GenerationConfig(batch_size=len(jobs)),
                                         jobs=jobs, callback=lambda info: check(info["step"], info["steps"])):
        outputs += zip(result.images, result.metadata)
    return outputs


def _main(conn, spec: WorkerSpec, name: str) -> None:
    """A worker process: load, say ready, then run batches until told to quit or the pipe closes."""
    if spec.threads:
        os.environ["GENKIT_THREADS"] = str(spec.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(spec.threads))
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")  # the server's process already said what loading warns about, once
    for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(key, "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        from genkit.serve.app import _load_all
        from genkit.serve.models import ModelPool

        pool = ModelPool(_load_all(list(spec.models), spec.device, spec.dtype, spec.attention, spec.memory,
                                   **spec.settings), lora_cache=spec.lora_cache)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it; this process ends
        from genkit.serve.errors import one_line

        conn.send(("failed", one_line(exc)))
        return
    conn.send(("ready", {"device": str(pool.get(pool.current).device), "pid": os.getpid()}))
    from genkit.serve.queue import Stopped

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "quit":
            return
        if message[0] != "batch":
            continue
        _, key, jobs = message
        seen = time.monotonic()

        def check(step, steps):
            nonlocal seen
            conn.send(("step", step, steps))
            seen = time.monotonic()
            if conn.poll(0) and conn.recv()[0] == "stop":
                raise Stopped()

        try:
            outputs = make_batch(pool, key, jobs, check)
        except Stopped:
            conn.send(("stopped",))
        except Exception as exc:  # noqa: BLE001 - the batch's requests get it; the worker goes on
            conn.send(("error", _portable(exc)))
        else:
            conn.send(("done", outputs))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (GenkitError, OutOfMemory...), else a RuntimeError with its one line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        from genkit.serve.errors import one_line

        return RuntimeError(one_line(exc))
