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

    Given the proxy's ``config``, it runs the app the way ``llm-proxy serve`` does (the same
    protocol class and client timeouts, from :func:`proxy.server.uvicorn_options`), but on
    ``host:port`` and without touching the process's logging.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, config=None, **uvicorn_options) -> None:
        self.app = app
        self.host = host
        self.port = port
        proxy_options = {}
        if config is not None:
            from ..server import uvicorn_options as proxy_uvicorn_options

            proxy_options = proxy_uvicorn_options(config, log_level="warning", configure_logging=False)
            for name in ("host", "port", "loop", "timeout_graceful_shutdown"):  # the thread decides these
                del proxy_options[name]
        self._options = {"log_level": "warning", "access_log": False, "lifespan": "auto",
                         **proxy_options, **uvicorn_options}  # fmt: skip
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _bind(self) -> socket.socket:
        from ..server import bind_socket

        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
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
