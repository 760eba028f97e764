"""An ASGI app (FastAPI) served by uvicorn on a thread of this process: the site's feature service inside
`edge-agent start`, and the aggregator's metrics and dashboard inside `cloud-aggregator serve`."""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


class BackgroundServer:
    """`start()` binds and returns the base URL once the server accepts connections (OSError naming the
    address when it cannot bind, as uvicorn's own error line is not ours); `stop()` ends it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host, self.port = host, port
        # uvicorn's own lines (a malformed request, say) go through this process's logging: one line each,
        # with the site and round of the thread that started the server
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", log_config=None, access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> str:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as err:
            raise OSError(f"cannot serve on {self.host}:{self.port}: {err.strerror or err}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
            sock.bind(address)
        except OSError as err:
            sock.close()
            raise OSError(f"cannot serve on {self.host}:{self.port}: {err.strerror or err}") from None
        run = contextvars.copy_context().run  # (the site and round of log lines)
        self.thread = threading.Thread(
            target=run, args=(self.server.run, [sock]), name=f"http-{self.port}", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise OSError(f"cannot serve on {self.host}:{self.port}")
            time.sleep(0.02)
        host = f"[{self.host}]" if ":" in self.host else self.host  # (an IPv6 address)
        return f"http://{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=30)


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The app served while the block runs; yields its base URL."""
    server = BackgroundServer(app, host, port)
    try:
        yield server.start()
    finally:
        server.stop()
