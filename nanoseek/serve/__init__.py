"""An OpenAI-compatible server (FastAPI + uvicorn) over the generation engine, and a small chat page at `/`.

    GET  /health                 status, requests in flight (running / waiting), cancellations
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> a reply; the `<think>` part goes to `reasoning_content`, as in
                                 DeepSeek's API; streaming as server-sent events
    POST /v1/completions         raw prompt(s) -> text

The Engine runs in a process of its own, so HTTP and decoding never wait for one interpreter lock: requests reach
it through a pipe and are submitted between decode steps, so they join the running batch, and each step's updates
come back through another, to the request's event loop. At most `max_queue` engine requests wait or run at once
(one per choice); past that the server answers 429. A streaming client that disconnects has its request cancelled,
which frees its slot. An engine that fails a step, or whose process dies, fails its requests with a 500 and is
replaced.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for any malformed request (bad JSON,
wrong types, unknown model, a prompt or max_tokens the context cannot hold, sampling settings out of range),
401 for a missing or wrong key when the server has one, 404 for unknown routes, 429 when the queue is full.

Files: schemas.py (the request models, errors, pieces of responses), worker.py (the engine's process), app.py
(`create_app`: the routes and their handlers; `running`).
"""

from .app import create_app, running

__all__ = ["create_app", "running"]
