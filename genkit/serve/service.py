"""One image request, whatever the dialect: check it, plan it, queue it, wait for it.

Each dialect turns its body into an `Order`, in the library's words (genkit.settings), with its own words for
them in `fields` (the dialect's one map), so errors name what the client sent, and gets back `Delivery` entries;
everything between is here:
limits, LoRA tags and names, the model, `Pipeline.plan` (the engine's own validation), the
coalescing queue, and waiting while watching for a client that goes away.

Image editing (A1111 img2img, OpenAI edits) arrives as `image`/`mask`/`strength`/`outpaint` on
the order (PIL images, decoded by the dialect) and goes to the engine as GenerationConfig's own.
The queue needs nothing more: its key holds `Job.batch_key()`, which has the task (text-to-image,
img2img, inpaint) and the strength, so an edit never shares a batch with a job it would change.
With an output folder, each input (and mask) is kept there as `input-<sha>.png` (`mask-<sha>.png`)
and the record names that file and its sha256, so `genkit replay` finds it beside the image.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from genkit.errors import GenkitError
from genkit.memory import OutOfMemory
from genkit.serve.errors import ApiError, one_line
from genkit.serve.loras import LoraLibrary, split_tags
from genkit.serve.queue import Coalescer, QueueFull, ShuttingDown, Ticket

DISCONNECT_POLL_S = 0.2


@dataclass
class Order:
    """What a client asked for, in the library's words; None means the model's default. Its settings are
    genkit.settings' `per_prompt` ones (tests/test_settings.py), then the model, the LoRAs and the dialect's words."""

    prompt: str
    negative_prompt: str = ""
    num_images_per_prompt: int = 1
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    prompt_syntax: str | None = None  # "a1111" or "plain" (genkit.prompt_syntax)
    hires_scale: float | None = None  # the hires fix (genkit.hires)
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    control: object = None  # ControlNet units (genkit.controlnet.Control: a --controlnet-dir model, a PIL image)
    image: object = None  # image editing: the input (a PIL image), a mask (white repaints), strength, outpaint
    mask: object = None
    strength: float | None = None
    outpaint: str | None = None
    model: str | None = None
    lora: list = field(default_factory=list)  # [(name, scale)] besides the prompt's <lora:...> tags
    fields: dict = field(default_factory=dict)  # the library's word -> the dialect's (errors name the client's field)

    def field(self, name: str) -> str:
        return self.fields.get(name, name)


@dataclass
class Delivery:
    entries: list  # store.Entry per image made, in order
    interrupted: bool = False
    model: str = ""


class Service:
    def __init__(self, pool, library: LoraLibrary, store, limits, coalescer: Coalescer):
        self.pool, self.library, self.store, self.limits, self.queue = pool, library, store, limits, coalescer

    # -- from an order to a ticket ------------------------------------------------------------
    def ticket(self, order: Order) -> Ticket:
        limits = self.limits
        limits.check_prompt(order.prompt, order.field("prompt"))
        limits.check_prompt(order.negative_prompt, order.field("negative_prompt"))
        limits.check_count(order.num_images_per_prompt, order.field("num_images_per_prompt"))
        limits.check_steps(order.num_inference_steps, order.field("num_inference_steps"))
        limits.check_guidance(order.guidance_scale, order.field("guidance_scale"))
        limits.check_side(order.width, order.field("width"))
        limits.check_side(order.height, order.field("height"))
        prompt, tags = split_tags(order.prompt, order.field("prompt"))
        loras = self._loras(tags, order)
        model = self.pool.resolve(order.model, order.field("model"))
        pipeline = self.pool.get(model)
        try:
            jobs = pipeline.plan([prompt], self._config(order))
        except GenkitError as exc:
            raise refused(exc, order) from None
        files = {}
        if jobs[0].image is not None:
            self._check_edit_size(jobs[0], order)
        if jobs[0].image is not None or jobs[0].control:
            jobs, files = self._kept_inputs(jobs)
        return Ticket(key=(model, loras, pipeline.batch_key(jobs[0])), jobs=jobs, files=files)

    def _check_edit_size(self, job, order: Order) -> None:
        """An edit's output size comes from its input when width/height are not given: bounded like them."""
        for name, value, asked in (("width", job.width, order.width), ("height", job.height, order.height)):
            if asked is None and value > self.limits.max_side:
                field = order.field("image")
                raise ApiError(422, f"{field}: the output would be {job.width}x{job.height} (the input's size); this "
                                    f"server makes images at most {self.limits.max_side} pixels wide and high "
                                    f"(--max-size): pass {order.field('width')} and {order.field('height')}",
                               param=field, code="limit")

    def _kept_inputs(self, jobs: list) -> tuple[list, dict]:
        """With an output folder: the jobs' inputs (and ControlNet images) as the PNG files the records will name (same
        pixels), and those files' bytes by name, written with the first image delivered (store.keep_input)."""
        from genkit.edit import Pictures

        if not self.store.keeps_inputs:
            return jobs, {}
        files, kept = {}, {}

        def keep(picture, kind):
            if picture is None:
                return None
            if isinstance(picture, Pictures):  # an instruction edit's several input images, each kept
                return Pictures(tuple(keep(item, kind) for item in picture.items))
            if id(picture) not in kept:
                kept[id(picture)], name, data = self.store.input_picture(picture, kind)
                files[name] = data
            return kept[id(picture)]

        def kept_controls(units):  # ControlNet images, kept as the inputs are (genkit.controlnet)
            return tuple(replace(unit, image=keep(unit.image, "input")) for unit in units) if units else units

        jobs = [replace(job, image=keep(job.image, "input"), mask=keep(job.mask, "mask"),
                        control=kept_controls(job.control)) for job in jobs]
        return jobs, files

    @staticmethod
    def _config(order: Order):
        """The order's settings as the engine's call settings (its prompt goes to the plan on its own)."""
        from genkit import settings
        from genkit.generate import GenerationConfig

        return GenerationConfig(**{name: getattr(order, name) for name in settings.names(per_call=True,
                                                                                          per_prompt=True)})

    def _loras(self, tags: list, order: Order) -> tuple:
        named = [(name, scale, order.field("prompt")) for name, scale in tags]
        named += [(name, scale, order.field("lora")) for name, scale in order.lora]
        if len(named) > self.limits.max_loras:
            raise ApiError(422, f"{order.field('lora')}: {len(named)} LoRAs asked for; at most "
                                f"{self.limits.max_loras} per request", param=order.field("lora"), code="limit")
        seen, key = set(), []
        for name, scale, where in named:
            if name in seen:
                raise ApiError(422, f"{where}: LoRA {name!r} is named twice", param=where)
            if abs(scale) > self.limits.max_lora_weight:
                raise ApiError(422, f"{where}: LoRA weight {scale} is outside +-{self.limits.max_lora_weight}",
                               param=where, code="limit")
            seen.add(name)
            key.append((str(self.library.resolve(name, where)), float(scale)))
        return tuple(key)

    # -- running --------------------------------------------------------------------------------
    async def run(self, order: Order, request) -> Delivery | None:
        """Queue the order and wait; None when the client went away (its jobs are dropped)."""
        ticket = self.ticket(order)
        try:
            self.queue.submit(ticket)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy ({self.queue.max_queue} images already wait); retry in "
                                f"{full.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None
        waiting = asyncio.wrap_future(ticket.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    self.queue.cancel(ticket)
                    return None
        except asyncio.CancelledError:  # the server is cancelling this request's task
            self.queue.cancel(ticket)
            raise
        if waiting.cancelled():
            return None
        exc = waiting.exception()
        if exc is not None:
            if isinstance(exc, ShuttingDown):
                raise ApiError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"})
            if isinstance(exc, OutOfMemory):  # the batch and its retry ran out: this request, not the server
                raise ApiError(507, exc.message, code="out_of_memory")
            if isinstance(exc, GenkitError):
                raise refused(exc, order)
            raise ApiError(500, f"generation failed: {one_line(exc)}", code="generation_failed")
        return Delivery(entries=ticket.outputs_done(), interrupted=ticket.interrupted, model=ticket.key[0])

    def numbered(self, jobs: list) -> list:
        """The jobs with the store's next file indices (any worker's batch, before it runs)."""
        return [replace(job, index=self.store.next_index()) for job in jobs]

    def run_batch(self, key, jobs, check):
        """Worker 0's side (the server's process): make one batch on the right pipeline, return (image, record)
        pairs."""
        from genkit.serve.workers import make_batch

        return make_batch(self.pool, key, self.numbered(jobs), check)

    def deliver(self, ticket, job, output):
        image, record = output
        for name, data in ticket.files.items():  # once per request, with its first image (the delivery thread only)
            self.store.keep_input(name, data)
        ticket.files = {}
        return self.store.save(image, record)


def refused(exc: GenkitError, order: Order) -> ApiError:
    """The engine's GenkitError as a 422 naming the request's field for the parameter it is about (`exc.param`)."""
    field = order.field(exc.param) if exc.param else None
    return ApiError(422, exc.naming(field), param=field)
