"""Run an app under uvicorn: in the foreground (`genkit serve`) or in a background thread.

The listening socket is bound here first, so a port in use is one clear line, and port 0 picks a
free port (tests, benchmarks: `Background(app).start()` returns the base URL).
"""

from __future__ import annotations

import socket
import threading
import time

from genkit.errors import GenkitError, term


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets whose protocol says TCP; with 0 every
    # response's last small segment waited for the client's delayed ACK (40 ms a request; benchmarks/overhead.py)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise GenkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another {term('port')} or {term('host')})") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(app, log_level: str):
    import uvicorn

    # uvicorn's own access line (on stdout) would repeat genkit.serve.access's JSON line (genkit.serve.metrics)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5, access_log=False)
    return uvicorn.Server(config)


def serve(app, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve until Ctrl-C (uvicorn handles the signals)."""
    sock = bind(host, port)
    _server(app, log_level).run(sockets=[sock])


class Background:
    """An app served from a daemon thread: `url = Background(app).start()`, later `.stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.server = _server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 60.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
