"""A real `latentdiff serve` (uvicorn on a free loopback port, in a thread) for tests that drive it with real
clients (webuiapi, openai, a browser).

    with running_server(ServeSettings(max_batch=1)) as url:     # "http://127.0.0.1:PORT"
        ...
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(settings: Any = None, **app_options: Any) -> Iterator[str]:
    import dataclasses

    import uvicorn

    from latentdiff.serve.app import create_app
    from latentdiff.serve.settings import ServeSettings

    port = free_port()
    settings = dataclasses.replace(settings or ServeSettings(), host="127.0.0.1", port=port)
    app = create_app(settings, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
