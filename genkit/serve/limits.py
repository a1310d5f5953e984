"""What one request may ask of the server, and how much may wait: every bound in one place.

A value past a bound is refused with 422 naming the field (in the client's own word for it)
and the bound; a body past `max_body_bytes` with 413 before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from genkit.serve.errors import ApiError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20  # a request body (img2img bodies carry base64 images)
    max_side: int = 2048  # width and height, pixels
    max_input_side: int = 4096  # an edit's input image or mask, pixels (read from the header before decoding)
    max_images: int = 16  # images one request may ask for (A1111 batch_size * n_iter, OpenAI n)
    max_steps: int = 150  # denoising steps (A1111's own slider stops at 150)
    max_guidance: float = 100.0  # classifier-free guidance (A1111's slider stops at 30)
    max_prompt_chars: int = 4000
    max_loras: int = 4  # LoRAs in one request
    max_lora_weight: float = 10.0
    max_batch: int = 8  # images per engine batch (coalesced across requests)
    max_queue: int = 64  # images waiting; past it new requests get 429 with Retry-After

    def check_count(self, value: int, field: str) -> None:
        if value < 1:
            raise ApiError(422, f"{field} must be at least 1, got {value}", param=field)
        if value > self.max_images:
            raise ApiError(422, f"{field} asks for {value} images; this server makes at most {self.max_images} per "
                                "request (--max-images)", param=field, code="limit")

    def check_steps(self, value: int | None, field: str) -> None:
        if value is not None and value > self.max_steps:
            raise ApiError(422, f"{field} is {value}; this server runs at most {self.max_steps} steps (--max-steps)",
                           param=field, code="limit")

    def check_guidance(self, value: float | None, field: str) -> None:
        if value is not None and value > self.max_guidance:
            raise ApiError(422, f"{field} is {value}; this server accepts guidance up to {self.max_guidance}",
                           param=field, code="limit")

    def check_side(self, value: int | None, field: str) -> None:
        if value is not None and value > self.max_side:
            raise ApiError(422, f"{field} is {value}; this server makes images at most {self.max_side} pixels wide "
                                "and high (--max-size)", param=field, code="limit")

    def check_prompt(self, value: str, field: str) -> None:
        if len(value) > self.max_prompt_chars:
            raise ApiError(422, f"{field} has {len(value)} characters; at most {self.max_prompt_chars} are accepted",
                           param=field, code="limit")
