"""Errors as each dialect's clients expect them, never a traceback.

`ApiError(status, message, param=...)` is raised anywhere in the server; the handlers render it
in OpenAI's shape under `/v1/` (`{"error": {"message", "type", "param", "code"}}`) and in
A1111's (FastAPI's `{"detail": ...}` plus `error` and `field`) elsewhere. Unexpected exceptions
become a 500 with a one-line message; the traceback goes to the server's log only.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("genkit.serve")

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                 501: "not_implemented", 503: "server_error"}


class ApiError(Exception):
    """A request that cannot be served: status, a one-line message, the field it is about."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def body_for(path: str, error: ApiError) -> dict:
    if is_openai(path):
        kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
        return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
    return {"error": error.code or _reason(error.status), "detail": error.message, "field": error.param}


def response_for(path: str, error: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(body_for(path, error), status_code=error.status, headers=error.headers)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def install(app) -> None:
    """Register the handlers that turn every failure into the dialect's error body."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return response_for(request.url.path, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes (404), wrong methods (405)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return response_for(request.url.path, ApiError(exc.status_code, detail, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):  # query parameters
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return response_for(request.url.path, ApiError(422, f"{field}: {first.get('msg', 'invalid')}", param=field))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return response_for(request.url.path, ApiError(500, f"internal error: {one_line(exc)}", code="internal_error"))
