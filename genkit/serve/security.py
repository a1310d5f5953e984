"""Secure defaults: loopback unless a key is set, bearer auth, bounded bodies.

- `check_bind`: any address other than loopback needs an API key, else the server refuses to
  start (one line, before a model is loaded).
- `Guard`: an ASGI middleware that, when a key is set, wants `Authorization: Bearer KEY` on every
  route but the static gallery page (which holds no data and asks the browser for the key) and the
  probes `/healthz` and `/readyz` (which say only "ok" or which workers are loading, and which
  orchestrators call without credentials); `/metrics` keeps the key (Prometheus can send it);
  HTTP Basic with the key as password is accepted too, for A1111 clients that only know
  `--api-auth`. Bodies over the limit get 413, from Content-Length or while being read.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress

from genkit.errors import GenkitError, term
from genkit.serve.errors import ApiError, response_for

PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/healthz", "/readyz"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise GenkitError(f"refusing to listen on {host} without an API key: anyone who can reach it could use the "
                          f"model (pass {term('api_key')} KEY or set GENKIT_API_KEY, or keep {term('host')} 127.0.0.1)")


def key_matches(header: bytes | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, value = header.decode("latin-1").partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), key.encode())


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server accepts ({limit} bytes)", param="body",
                         code="body_too_large")


class Guard:
    """ASGI middleware: API key on every non-public route, request bodies bounded."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.api_key and path not in PUBLIC_PATHS and scope["method"] != "OPTIONS" \
                and not key_matches(headers.get(b"authorization"), self.api_key):
            error = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            return await response_for(path, error)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await response_for(path, BodyTooLarge(self.max_body))(scope, receive, send)
        return await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive):
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return bounded_receive
