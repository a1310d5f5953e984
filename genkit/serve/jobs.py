"""Jobs that outlive a connection: a generation accepted now, made later, asked about by its id.

- `POST /genkit/v1/jobs[?api=txt2img|img2img|generations]`: any generation body of either dialect (A1111's
  txt2img/img2img JSON, OpenAI's images/generations JSON) -> 202 `{"id", "url", "state", ...}` and a `Location`
  header. Without `api` the body's keys say: OpenAI's own (n, size, response_format, quality, style, user,
  output_format) mean generations, `init_images` img2img, anything else txt2img. The body is checked and planned
  as its dialect's route does (its body model and `_order`, then `Service.ticket`), so a mistake is answered at
  once with that dialect's status (A1111 422, OpenAI 400) naming the field. Over `--max-queue`: 429 + Retry-After.
- `GET /genkit/v1/jobs/{id}`: `state` (queued, running, done, failed, cancelled), `progress` (step, steps,
  images, images_done, eta_seconds: an estimate from the queue's seconds per batch, None before one has run),
  created/started/finished (Unix seconds), `error` when failed, and the images made (`url` on the gallery's file
  route, `file`, `seed`, `record`). `GET /genkit/v1/jobs?limit=&state=`: recent jobs, newest first.
- `DELETE /genkit/v1/jobs/{id}`: cancel a queued or running job (409 once it has finished; 404 unknown id).

Each job is a JSON file, `<out>/jobs/<id>.json`, written through `atomic_write` whenever its state changes and
whenever an image of it is delivered. Its seeds are fixed when it is accepted (a random seed is drawn by planning
and written into the stored body), so a rerun makes the same pixels. On startup every job whose file says queued
or running is planned again from its body and queued for the images it does not have yet: a server killed mid-run
(SIGKILL included) and restarted finishes every job it had accepted, and finished jobs stay queryable. Without
`--out` the store is a temporary folder, removed at exit: jobs are served but do not survive a restart.

Job ids are uuid4 hex; an id from a URL is matched against that pattern before any file is looked up.
A1111's `/sdapi/v1/interrupt` stops a running job's batch too: the job ends `cancelled`, `interrupted` true, with
the images it had.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from genkit.serve.errors import ApiError, one_line
from genkit.serve.queue import QueueFull, ShuttingDown, Ticket

log = logging.getLogger("genkit.serve")
router = APIRouter(prefix="/genkit/v1/jobs")

APIS = ("txt2img", "img2img", "generations")
STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
OPENAI_ONLY = frozenset({"n", "size", "response_format", "quality", "style", "user", "output_format"})
ID = re.compile(r"^[0-9a-f]{32}$")
WATCH_S = 0.1  # how often the watcher looks at the active jobs (state, images delivered)
KEEP = 10_000  # finished jobs held in memory; older ones are read back from their file when asked for


@dataclass(eq=False)
class Job:
    """One accepted generation: its body (seed fixed), where it stands, and the images it has (by position)."""

    id: str
    api: str
    body: dict
    seeds: list
    created: float
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    interrupted: bool = False
    resumed: int = 0  # how many times a restarted server queued it again
    images: dict = field(default_factory=dict)  # position -> {"file", "seed", "record"}
    # in memory only, while the job is in the queue: its ticket, and the position in the job of each ticket job
    ticket: object = None
    positions: list = field(default_factory=list)
    order: object = None
    dirty: bool = False  # changed since its file was last written
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_json(self) -> dict:
        return {"id": self.id, "api": self.api, "state": self.state, "created": self.created, "started": self.started,
                "finished": self.finished, "error": self.error, "interrupted": self.interrupted,
                "resumed": self.resumed, "seeds": self.seeds,
                "images": [{"position": p, **self.images[p]} for p in sorted(self.images)], "body": self.body}

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        if not ID.match(str(data.get("id"))) or data.get("api") not in APIS or data.get("state") not in STATES:
            raise ValueError("not a job file")
        images = {int(image.pop("position")): image for image in data.get("images", [])}
        return cls(id=data["id"], api=data["api"], body=data["body"], seeds=list(data["seeds"]),
                   created=float(data["created"]), state=data["state"], started=data.get("started"),
                   finished=data.get("finished"), error=data.get("error"), interrupted=bool(data.get("interrupted")),
                   resumed=int(data.get("resumed", 0)), images=images)


def dialect(api: str | None, body) -> str:
    """Which dialect a body speaks: `api` when given, else its keys."""
    if api is not None:
        if api not in APIS:
            raise ApiError(422, f"api must be one of {', '.join(APIS)}, got {api!r}", param="api")
        return api
    keys = set(body) if isinstance(body, dict) else set()
    if keys & OPENAI_ONLY:
        return "generations"
    return "img2img" if "init_images" in keys else "txt2img"


def order_for(api: str, request: Request, body):
    """The body's `Order`, read and checked by its dialect's own model and `_order` (errors as that dialect's)."""
    from genkit.serve import a1111, openai
    from genkit.serve.bodies import parse

    if api == "generations":
        parsed = parse(openai.Generations, body, status=400)
        order = openai._order(parsed)
        if parsed.model:  # as openai's route: an unknown model is a 404 there
            request.app.state.genkit.pool.resolve(parsed.model, "model", status=404)
        return order
    if api == "img2img":
        return a1111.img2img_order(request, parse(a1111.Img2Img, body))
    return a1111._order(request, parse(a1111.Txt2Img, body))


class Jobs:
    """The jobs of one app: accepted here, watched by one thread, kept in `<store.out>/jobs/`."""

    def __init__(self, app, server):
        self.app, self.server, self.queue = app, server, server.queue
        self.folder = Path(server.store.out) / "jobs"
        self.jobs: OrderedDict = OrderedDict()  # id -> Job, oldest first
        self.active: list = []  # queued or running, in the order they were queued
        self.backlog: deque = deque()  # accepted but not in the queue yet (resumed jobs that did not fit)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the requests' side ---------------------------------------------------------------------
    def accept(self, api: str, body, request: Request) -> Job:
        """Check and plan `body`, fix its seeds, keep its file and queue it (ApiError: refused, nothing kept)."""
        order = order_for(api, request, body)
        ticket = self.server.service.ticket(order)
        if self.backlog:  # jobs accepted before this one still wait for room in the queue
            raise full(self.queue.max_queue, self.queue.retry_after())
        seeds = [job.seed for job in ticket.jobs]
        job = Job(id=uuid.uuid4().hex, api=api, body={**body, "seed": seeds[0]}, seeds=seeds, created=time.time(),
                  ticket=ticket, positions=list(range(len(seeds))), order=order)
        self.persist(job)  # first the file: a server killed right after queueing still has the job
        try:
            self.queue.submit(ticket)
        except QueueFull as exc:
            (self.folder / f"{job.id}.json").unlink(missing_ok=True)
            raise full(self.queue.max_queue, exc.retry_after) from None
        self._watch(job)
        return job

    def cancel(self, job: Job) -> None:
        with job.lock:
            if job.state not in ACTIVE:
                raise ApiError(409, f"job {job.id} has already finished ({job.state}); nothing to cancel",
                               param="id", code="finished")
            job.state, job.finished = "cancelled", time.time()
            if job.ticket is not None:
                self.queue.cancel(job.ticket)
            self.persist(job)
        with self._lock:
            if job in self.backlog:
                self.backlog.remove(job)

    def find(self, job_id: str) -> Job | None:
        """The job of this id, from memory or its file; None for an unknown (or malformed) id."""
        if not ID.match(job_id):
            return None
        with self._lock:
            job = self.jobs.get(job_id)
        return job if job is not None else self._read(self.folder / f"{job_id}.json")

    def recent(self, limit: int, state: str | None = None) -> list:
        with self._lock:
            jobs = list(reversed(self.jobs.values()))
        return [job for job in jobs if state is None or job.state == state][:limit]

    def view(self, job: Job, base: str) -> dict:
        """What a client sees of a job (the stored body is not echoed: it may hold a base64 input image)."""
        with job.lock:
            progress = self.progress(job)
            return {"id": job.id, "url": f"{base}/genkit/v1/jobs/{job.id}", "api": job.api, "state": job.state,
                    "created": job.created, "started": job.started, "finished": job.finished, "progress": progress,
                    "seeds": job.seeds, "error": job.error, "interrupted": job.interrupted, "resumed": job.resumed,
                    "images": [{"url": f"{base}/genkit/v1/files/{image['file']}", **image}
                               for _, image in sorted(job.images.items())]}

    def progress(self, job: Job) -> dict:
        step = steps = 0
        ticket = job.ticket if job.state in ACTIVE else None
        if ticket is not None:
            now = self.queue.ticket_progress(ticket)
            step, steps = now["step"], now["steps"]
        return {"step": step, "steps": steps, "images": len(job.seeds), "images_done": len(job.images),
                "eta_seconds": self.eta(job) if ticket is not None else None}

    def eta(self, job: Job) -> float | None:
        """Seconds until the job's last image: the running batches' rest, then the batches of the images waiting up
        to its last one, at the queue's seconds per batch, shared by its workers. None before a batch has run."""
        per_batch = self.queue.seconds_per_batch()
        if not per_batch:
            return None
        pending = list(self.queue.pending)  # (ticket, position) in the order they will be taken
        ahead = max((i + 1 for i, (ticket, _) in enumerate(pending) if ticket is job.ticket), default=0)
        status = self.queue.status()
        workers = max(1, len(status.get("workers") or [None]))
        running = 1 - status["step"] / status["steps"] if status["running"] and status["steps"] else 0.0
        return round(per_batch * (running + math.ceil(ahead / self.queue.max_batch) / workers), 2)

    # -- the files ----------------------------------------------------------------------------------
    def persist(self, job: Job) -> None:
        """Write the job's file (`dirty` until it is written: the watcher tries again after a failed write)."""
        from genkit.outputs import save_text

        job.dirty = True
        self.folder.mkdir(parents=True, exist_ok=True)
        save_text(self.folder / f"{job.id}.json", json.dumps(job.to_json(), ensure_ascii=False))
        job.dirty = False

    @staticmethod
    def _read(path: Path) -> Job | None:
        try:
            return Job.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _load(self) -> list:
        """Every job file in the folder, oldest first."""
        if not self.folder.is_dir():
            return []
        jobs = []
        for path in self.folder.glob("*.json"):
            if ID.match(path.stem):
                job = self._read(path)
                if job is None:
                    log.warning("skipping %s: not a job file genkit wrote", path)
                else:
                    jobs.append(job)
        return sorted(jobs, key=lambda job: job.created)

    # -- starting, resuming, stopping -----------------------------------------------------------------
    def start(self) -> None:
        """After the queue has started: load the jobs kept in the folder, queue again those a stopped or killed
        server left queued or running, and start watching."""
        for job in self._load():
            self._remember(job)
            if job.state in ACTIVE:
                self._resume(job)
        self._thread = threading.Thread(target=self._run, name="genkit-serve-jobs", daemon=True)
        self._thread.start()

    def _resume(self, job: Job) -> None:
        from starlette.requests import Request as Scoped

        job.state, job.started, job.resumed = "queued", None, job.resumed + 1
        # the images a killed server wrote (and recorded in the job) are kept; the rest are made again
        job.images = {p: image for p, image in job.images.items() if self.server.store.path(image["file"])}
        try:
            request = Scoped({"type": "http", "app": self.app})  # a request of this app: the dialects read its state
            job.order = order_for(job.api, request, job.body)
            ticket = self.server.service.ticket(job.order)
            if [planned.seed for planned in ticket.jobs] != job.seeds:
                raise ApiError(500, f"the job's seeds {job.seeds} planned as {[j.seed for j in ticket.jobs]}")
        except Exception as exc:  # noqa: BLE001 - e.g. its model or LoRA is no longer served: the job says why
            job.state, job.finished = "failed", time.time()
            job.error = f"could not be resumed: {exc.message if isinstance(exc, ApiError) else one_line(exc)}"
            self.persist(job)
            return
        job.positions = [p for p in range(len(job.seeds)) if p not in job.images]
        if not job.positions:
            job.state, job.finished = "done", time.time()
            self.persist(job)
            return
        job.ticket = Ticket(key=ticket.key, jobs=[ticket.jobs[p] for p in job.positions], files=ticket.files)
        self.persist(job)
        with self._lock:
            self.backlog.append(job)
        self._submit_backlog()

    def _submit_backlog(self) -> None:
        while True:
            with self._lock:
                if not self.backlog:
                    return
                job = self.backlog[0]
            with job.lock:
                if job.state in ACTIVE:
                    try:
                        self.queue.submit(job.ticket)
                    except QueueFull:
                        return  # the watcher tries again when batches have made room
            with self._lock:
                if self.backlog and self.backlog[0] is job:
                    self.backlog.popleft()
            if job.state in ACTIVE:
                self._watch(job)

    def stop(self) -> None:
        """Before the queue stops: stop watching and write what was delivered. Jobs still queued or running stay so
        in their files (the queue fails them with ShuttingDown, which is not written), and a restart resumes them."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        for job in list(self.active):
            self._update(job)

    # -- the watcher ------------------------------------------------------------------------------
    def _remember(self, job: Job) -> None:
        with self._lock:
            self.jobs[job.id] = job
            if len(self.jobs) > KEEP:  # forget the oldest finished ones (their files answer for them)
                for old in [old for old in self.jobs.values() if old.state not in ACTIVE][:len(self.jobs) - KEEP]:
                    del self.jobs[old.id]

    def _watch(self, job: Job) -> None:
        self._remember(job)
        with self._lock:
            self.active.append(job)
        job.ticket.future.add_done_callback(lambda _: self._wake.set())
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(WATCH_S if self.active else None)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._submit_backlog()
                for job in list(self.active):
                    self._update(job)
            except Exception:  # noqa: BLE001 - e.g. a full disk: the jobs stay as they are, the watcher goes on
                log.exception("could not update the jobs")
                time.sleep(1)

    def _update(self, job: Job) -> None:
        """Look at one active job: images delivered, started, finished; write its file when anything changed."""
        with job.lock:
            ticket = job.ticket
            if ticket is None or (job.state not in ACTIVE and not job.dirty):
                self._forget(job)
                return
            changed = job.dirty
            if job.state in ACTIVE:
                changed = self._look(job, ticket) or changed
            if changed:
                self.persist(job)
            if job.state not in ACTIVE:
                self._forget(job)

    def _look(self, job: Job, ticket) -> bool:
        """The images delivered since the last look, the start, the end; whether anything changed."""
        changed = False
        for index, output in enumerate(ticket.outputs):
            position = job.positions[index]
            if hasattr(output, "file") and position not in job.images:  # an Entry (a cancelled one's stay raw)
                job.images[position] = {"file": output.file, "seed": output.record.get("seed"),
                                        "record": output.record}
                changed = True
        if job.state == "queued" and (job.images.keys() & set(job.positions)
                                      or self.queue.ticket_progress(ticket)["running"]):
            job.state, job.started, changed = "running", time.time(), True
        if ticket.future.done():
            changed = self._finish(job, ticket) or changed
        return changed

    def _finish(self, job: Job, ticket) -> bool:
        from genkit.errors import GenkitError

        if ticket.future.cancelled():
            job.state = "cancelled"
        elif ticket.future.exception() is not None:
            exc = ticket.future.exception()
            if isinstance(exc, ShuttingDown):
                return False  # stays queued or running in its file: the next start resumes it
            job.state = "failed"
            if isinstance(exc, GenkitError):
                job.error = exc.naming(job.order.field(exc.param) if job.order is not None and exc.param else None)
            else:
                job.error = f"generation failed: {one_line(exc)}"
        elif ticket.interrupted:
            job.state, job.interrupted = "cancelled", True
            job.error = f"interrupted after {len(job.images)} of {len(job.seeds)} images"
        else:
            job.state = "done"
        job.finished = time.time()
        return True

    def _forget(self, job: Job) -> None:
        with self._lock:
            if job in self.active:
                self.active.remove(job)
        job.ticket = job.order = None


def full(max_queue: int, retry_after: int) -> ApiError:
    return ApiError(429, f"the server is busy ({max_queue} images already wait); retry in {retry_after} s",
                    code="queue_full", headers={"Retry-After": str(retry_after)})


def jobs_of(request: Request) -> Jobs:
    return request.app.state.genkit_jobs


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _job(request: Request, job_id: str) -> Job:
    job = jobs_of(request).find(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id[:64]!r} here", param="id")
    return job


@router.post("")
async def submit(request: Request, api: str | None = Query(None)):
    from genkit.serve.bodies import read_json

    body = await read_json(request)
    api = dialect(api, body)
    jobs = jobs_of(request)
    job = jobs.accept(api, body, request)
    view = jobs.view(job, _base(request))
    return JSONResponse(view, status_code=202, headers={"Location": view["url"]})


@router.get("")
def listing(request: Request, limit: int = Query(100, ge=1, le=1000), state: str | None = Query(None)):
    if state is not None and state not in STATES:
        raise ApiError(422, f"state must be one of {', '.join(STATES)}, got {state!r}", param="state")
    jobs = jobs_of(request)
    return {"jobs": [jobs.view(job, _base(request)) for job in jobs.recent(limit, state)]}


@router.get("/{job_id}")
def one(request: Request, job_id: str):
    return jobs_of(request).view(_job(request, job_id), _base(request))


@router.delete("/{job_id}")
def cancel(request: Request, job_id: str):
    jobs = jobs_of(request)
    job = _job(request, job_id)
    jobs.cancel(job)
    return jobs.view(job, _base(request))


def install(app, server) -> None:
    """Add the jobs' routes to `app`; resume kept jobs when the app starts, stop watching before its queue stops."""
    jobs = Jobs(app, server)
    app.state.genkit_jobs = jobs
    server.startup.append(jobs.start)
    server.shutdown.append(jobs.stop)
    app.include_router(router)
