"""The models a server holds: the served ones by name, the current one, and LoRA variants.

Requests pick a served model by name (A1111's `sd_model_checkpoint`, OpenAI's `model`). A
request with LoRAs runs on a copy of its model loaded the way `genkit generate --lora` loads it
(`genkit.load` then `genkit.lora.apply`), so its images are the CLI's; the last few such copies
are kept (`lora_cache`). Loading happens on the worker thread, which alone runs the models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from genkit.serve.errors import ApiError

LoraKey = tuple  # ((path, scale), ...) in the order the request gave them


class ModelPool:
    def __init__(self, pipelines: list, *, lora_cache: int = 2):
        if not pipelines:
            raise ValueError("a server needs at least one model")
        self.served = {pipeline.name: pipeline for pipeline in pipelines}
        self.current = pipelines[0].name
        self.lora_cache = lora_cache
        self._variants: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.served)

    def resolve(self, text: str | None, field: str, *, status: int = 422) -> str:
        """A served model's name from a name, an A1111 title (`name [hash]`) or a folder's base name."""
        if text is None or text == "":
            return self.current
        text = str(text).strip()
        candidates = [text, text.split(" [")[0]]
        for name in self.served:
            if name in candidates or Path(name).name in candidates:
                return name
        raise ApiError(status, f"{field}: model {text!r} is not served here (served: {', '.join(self.served)})",
                       param=field, code="model_not_found")

    def get(self, name: str):
        return self.served[name]

    def pipeline_for(self, name: str, loras: LoraKey):
        """The pipeline for `name` with these LoRAs (worker thread only: it may load a model)."""
        base = self.served[name]
        if not loras:
            return base
        key = (name, loras)
        with self._lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
        variant = _load_with_loras(base, loras)
        with self._lock:
            self._variants[key] = variant
            while len(self._variants) > max(self.lora_cache, 1):
                self._variants.popitem(last=False)
        return variant


def _load_with_loras(base, loras: LoraKey):
    import genkit
    from genkit import lora

    settings = base.settings()  # how the served model was loaded: device, dtype, attention
    exact = {"exact": settings["exact"]} if "exact" in settings else {}  # engines that record --exact/--fast
    pipeline = genkit.load(base.name, device=settings["device"], dtype=settings.get("dtype"),
                           attention=settings.get("attention", "auto"), memory=getattr(base, "memory_budget", None),
                           **exact)
    lora.apply(pipeline, [lora.LoraSpec(Path(path), float(scale)) for path, scale in loras])
    return pipeline
