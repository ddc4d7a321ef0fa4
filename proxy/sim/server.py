"""Run an ASGI app under uvicorn on a loopback port, in a background thread.

The simulated backends, the demo and the tests all need real HTTP servers that
start fast and stop cleanly; this is the one place that knows how.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn


class ServerThread:
    """A uvicorn server on ``host:port`` (0 picks a free port) in a daemon thread.

    ``stop()`` closes the listening socket, so connections are refused until
    ``start()`` binds the same port again: that is how tests simulate a node
    that goes away and comes back.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._options = {"log_level": "warning", "access_log": False, "lifespan": "auto", **uvicorn_options}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _bind(self) -> socket.socket:
        # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and
        # without it every keep-alive request waits out a delayed ACK (about 40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    def start(self, timeout: float = 10.0) -> ServerThread:
        if self._thread is not None:
            raise RuntimeError("server already running")
        sock = self._bind()
        config = uvicorn.Config(self.app, **self._options)
        server = uvicorn.Server(config)
        # The thread is not the main thread: signal handling belongs to whoever owns the process.
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._server = server

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=run, name=f"server-{self.port}", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not server.started:
            self.stop()
            raise RuntimeError(f"server on port {self.port} did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():  # open streams keep a graceful shutdown waiting: cut them
            server.force_exit = True
            thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
