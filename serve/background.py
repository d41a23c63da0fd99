"""Run a :class:`~serve.server.Server` on its own event loop in a thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from serve.config import ServerConfig
from serve.server import Server

T = TypeVar("T")


class BackgroundServer:
    """``with BackgroundServer(config) as bg:`` starts a server (``bg.port``) and stops it after.

    ``call`` runs a coroutine function on the server's loop, e.g.
    ``bg.call(lambda: bg.server.stop(5))``.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: Server | None = None
        self.port: int = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="server")

    def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        """Run ``make()`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)

    def start(self) -> int:
        """Start the loop thread and the server; return the bound port."""
        self._thread.start()

        async def start() -> int:
            self.server = Server(self.config)
            return await self.server.start()

        try:
            self.port = self.call(start)
        except BaseException:
            self.close()
            raise
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop the server (see ``Server.stop``)."""
        if self.server is not None:
            server = self.server
            self.call(lambda: server.stop(grace))

    def close(self) -> None:
        """Stop the server if running, then the loop and its thread."""
        try:
            self.stop(0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
