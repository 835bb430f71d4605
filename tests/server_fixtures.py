"""A real uvicorn server on 127.0.0.1 in a background thread over a tiny CPU engine, for the server tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from diffulex.server.app import create_app
from diffulex.server.engine_client import EngineClient

from diffulex.config import ServerConfig, load_engine_config
from diffulex.engine.engine import Engine


@dataclass
class Served:
    url: str
    client: EngineClient
    model: str

    def pages_whole(self) -> bool:
        with self.client._lock:  # the engine is not thread-safe; the test peeks between steps
            engine = self.client.engine
            return not engine.has_unfinished() and engine.kv_cache.is_whole()


def serve(model: Path, engine_options: dict, **server_options) -> Iterator[Served]:
    """Yield a started server (use with ``yield from`` in a fixture); stop it and the engine after."""
    engine = Engine(load_engine_config(model=str(model), **engine_options))
    client = EngineClient(engine, idle_wait_s=0.01)
    app = create_app(client, ServerConfig(port=0, **server_options))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", client, app.state.serving.model_name)
    server.should_exit = True
    thread.join(timeout=10)
    client.shutdown(drain=False)


def wait_until_whole(served: Served, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not served.pages_whole():
        assert time.monotonic() < deadline, f"KV pages not freed: {served.client.stats()}"
        time.sleep(0.02)
