"""An OpenAI-compatible server (FastAPI + uvicorn) over the generation engine, and a small chat page at `/`.

    GET  /health                 status, requests in flight (running / waiting), cancellations
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> a reply; the `<think>` part goes to `reasoning_content`, as in
                                 DeepSeek's API; streaming as server-sent events
    POST /v1/completions         raw prompt(s) -> text

One thread owns the Engine (it is not thread-safe): requests reach it through a queue and are submitted between
decode steps, so they join the running batch, and each step's events go back to the request's event loop with
`call_soon_threadsafe`. At most `max_queue` engine requests wait or run at once (one per choice); past that the
server answers 429. A streaming client that disconnects has its request cancelled, which frees its slot.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for any malformed request (bad JSON,
wrong types, unknown model, a prompt or max_tokens the context cannot hold, sampling settings out of range),
401 for a missing or wrong key when the server has one, 404 for unknown routes, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from . import __version__
from .engine import Completion, Engine, Event
from .errors import NanoseekError
from .model import Transformer
from .sampling import SamplingError, SamplingParams
from .tokenizer import ReasoningSplitter, Tokenizer, split_reasoning

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": self.TYPES.get(status, "invalid_request_error"),
                               "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


# ---- requests --------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # "1" is not a number; unknown fields are ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: what the context leaves after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: float | None = Field(None, description="default 1; 0 is greedy")
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension: sample from the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=-2**63, lt=2**63, description="choice i samples with seed + i")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, description="choices per prompt")
    ignore_eos: bool = Field(False, description="extension: go on past the end-of-sentence token")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s), or token ids")


# Known OpenAI fields this server cannot honour: a request that sets one to anything but these values gets a 400.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


# ---- the engine thread -----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    """One engine request: the choice `index` of an API request, whose events go to `events` on `loop`."""
    prompt_ids: list[int]
    params: SamplingParams
    index: int
    events: asyncio.Queue  # (index, Event | APIError)
    loop: asyncio.AbstractEventLoop
    completion: Completion | None = None


class EngineWorker:
    """The one thread that owns the Engine: takes jobs from a queue between steps and loops `step()` while there is
    work. `submit` and `cancel` are called from the event loop; everything else runs on the thread."""

    def __init__(self, make_engine: Callable[[], Engine], max_queue: int):
        self.make_engine, self.max_queue = make_engine, max_queue
        self.engine = make_engine()
        self.load = 0  # engine requests accepted and not finished
        self.cancelled = 0
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (method, job), or None to stop
        self._jobs: dict[int, _Job] = {}  # completion id -> job
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, jobs: list[_Job]) -> None:
        with self._lock:
            if self.load + len(jobs) > self.max_queue:
                raise APIError(429, f"the server is busy ({self.load} requests waiting or running, at most "
                               f"{self.max_queue}); retry later", code="rate_limit_exceeded")
            self.load += len(jobs)
        for job in jobs:
            self._inbox.put((self._admit, job))

    def cancel(self, jobs: list[_Job]) -> None:
        """Stop the jobs that have not finished (the others are left alone)."""
        for job in jobs:
            self._inbox.put((self._cancel, job))

    def stats(self) -> dict[str, int]:
        return {"requests": self.load, "running": len(self.engine.active), "waiting": len(self.engine.waiting),
                "cancelled": self.cancelled}

    def _run(self) -> None:
        while True:
            items = [] if self.engine.has_work() else [self._inbox.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._inbox.get_nowait())
            for item in items:
                if item is None:
                    return
                method, job = item
                method(job)
            if self.engine.has_work():
                self._step()

    def _admit(self, job: _Job) -> None:
        try:
            job.completion = self.engine.submit(job.prompt_ids, job.params)
        except SamplingError as e:
            self._deliver([(job, APIError(400, str(e)))])
            return
        self._jobs[job.completion.id] = job

    def _cancel(self, job: _Job) -> None:
        if job.completion is not None:
            self.engine.cancel(job.completion)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # a bug or out of memory: fail the requests in flight, keep serving with a fresh engine
            log.exception("engine step failed")
            failure = APIError(500, "the engine failed while generating; see the server log")
            self._deliver([(job, failure) for job in self._jobs.values()])
            self.engine = self.make_engine()
            return
        self._deliver([(self._jobs[event.completion.id], event) for event in events])

    def _deliver(self, items: list[tuple[_Job, Event | APIError]]) -> None:
        """Hand each item to its request, with one wake-up per event loop for all of them."""
        puts: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in items:
            if isinstance(item, APIError) or item.finished:
                if job.completion is not None:
                    self._jobs.pop(job.completion.id, None)
                self.cancelled += isinstance(item, Event) and item.completion.finish_reason == "cancelled"
                with self._lock:
                    self.load -= 1
            puts.setdefault(job.loop, []).append((job.events, (job.index, item)))
        for loop, batch in puts.items():
            with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for events, item in batch:
        events.put_nowait(item)


# ---- the app ---------------------------------------------------------------------------------------------------
def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, speculative: bool = False,
               max_len: int | None = None, compile: bool = False) -> FastAPI:
    """The server for one model. `max_len` (default: the model's context) is the longest sequence, prompt and
    reply together; the engine's latent cache holds max_batch x max_len tokens. `compile`: the Engine's compiled
    decode step, warmed up before the server takes requests."""
    if max_batch < 1 or max_queue < 1:
        raise NanoseekError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
    worker = EngineWorker(lambda: Engine(model, tokenizer, max_batch, max_len, speculative, compile), max_queue)
    context, vocab = worker.engine.max_len, model.cfg.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if compile:
            log.info("decode step compiled in %.1f s", await asyncio.to_thread(worker.engine.warmup))
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="nanoseek", version=__version__, lifespan=lifespan,
                  description="An OpenAI-compatible API for a DeepSeek-V3-architecture model.")
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(NanoseekError)  # sampling settings out of range, a bad chat message
    async def user_error(request: Request, e: NanoseekError) -> JSONResponse:
        return APIError(400, str(e)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # for a union, the branch that got furthest
        if err["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})",
                            code="invalid_json").response()
        # the field's path, without "body" and the names pydantic gives the branches of a union ("str", "list[str]")
        param = ".".join(str(p) for p in err["loc"] if p not in ("body", "str", "int") and "[" not in str(p)) or None
        return APIError(400, f"{param or 'the body'}: {err['msg']}", param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, message).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, "internal server error; see the server log").response()

    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise APIError(401, "an API key is needed: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        if not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def jobs_for(body: _GenerationRequest, prompts: list[list[int]], what: str) -> list[_Job]:
        """Check the request against the model and the context; one job per prompt and choice."""
        if body.model != model_name:
            raise APIError(400, f"model {body.model!r} is not served here; this server has {model_name!r}", "model",
                           "model_not_found")
        for name, neutral in UNSUPPORTED.items():
            if (body.model_extra or {}).get(name) not in neutral:
                raise APIError(400, f"{name} is not supported by this server", name)
        n = body.n or 1
        if n * len(prompts) > max_queue:
            raise APIError(400, f"n x prompts = {n * len(prompts)} choices; this server takes at most {max_queue} "
                           "at once", "n")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        loop, events, jobs = asyncio.get_running_loop(), asyncio.Queue(), []
        for p, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"{what}: the prompt is empty", what)
            if not all(0 <= i < vocab for i in ids):
                raise APIError(400, f"{what}: token ids must be in [0, {vocab})", what)
            if len(ids) >= context:
                raise APIError(400, f"{what}: the prompt has {len(ids)} tokens; this model's context holds {context} "
                               "(prompt and reply together)", what, "context_length_exceeded")
            room = context - len(ids)
            if asked is not None and asked > room:
                raise APIError(400, f"max_tokens = {asked} is too large: the prompt has {len(ids)} tokens and the "
                               f"context holds {context}, so at most {room} can be generated", "max_tokens",
                               "context_length_exceeded")
            for i in range(n):
                params = SamplingParams(
                    max_new_tokens=room if asked is None else asked,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                    seed=None if body.seed is None else body.seed + i, stop=stop, ignore_eos=body.ignore_eos)
                jobs.append(_Job(ids, params, p * n + i, events, loop))
        return jobs

    async def events(jobs: list[_Job]) -> AsyncIterator[list[tuple[int, Event]]]:
        """Batches of (choice index, Event) until every job has finished: all that has arrived when the request
        gets its turn, a choice's consecutive events merged into one (under load: fewer, larger chunks)."""
        open_jobs, arrived = len(jobs), jobs[0].events
        while open_jobs:
            items = [await arrived.get()]
            while not arrived.empty():
                items.append(arrived.get_nowait())
            batch: list[tuple[int, Event]] = []
            for index, item in items:
                if isinstance(item, APIError):
                    raise item
                open_jobs -= item.finished
                if batch and batch[-1][0] == index:  # the same choice again: one event with both texts
                    before = batch[-1][1]
                    item = Event(item.completion, before.new_text + item.new_text,
                                 before.new_token_ids + item.new_token_ids, item.finished)
                    batch.pop()
                batch.append((index, item))
            yield batch

    async def cancel_when_gone(request: Request, jobs: list[_Job]) -> None:
        """Cancel the jobs of a non-streaming request whose client has gone (checked every POLL_S seconds)."""
        while not await request.is_disconnected():
            await asyncio.sleep(POLL_S)
        worker.cancel(jobs)

    async def stream(jobs: list[_Job], head: dict, prompt_tokens: int, include_usage: bool,
                     chat: bool) -> AsyncIterator[str]:
        """Server-sent events: per choice a first chunk (chat: the role), text deltas, a chunk with the
        finish_reason; then with include_usage a last chunk with the usage and no choices; then [DONE]."""
        splitters = {job.index: ReasoningSplitter() for job in jobs}
        usage = {"usage": None} if include_usage else {}

        def chunk(index: int, fields: dict, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": index, **fields, "logprobs": None,
                                              "finish_reason": finish_reason}], **usage})

        completion_tokens = 0
        try:
            for job in jobs if chat else []:
                yield chunk(job.index, {"delta": {"role": "assistant", "content": ""}})
            async for batch in events(jobs):
                chunks = []  # written together
                for index, event in batch:
                    if chat:
                        reasoning, content = splitters[index].feed(event.new_text, final=event.finished)
                        delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                        if delta:
                            chunks.append(chunk(index, {"delta": delta}))
                    elif event.new_text:
                        chunks.append(chunk(index, {"text": event.new_text}))
                    if event.finished:
                        completion_tokens += len(event.completion.token_ids)
                        chunks.append(chunk(index, {"delta": {}} if chat else {"text": ""},
                                            event.completion.finish_reason))
                if chunks:
                    yield "".join(chunks)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the status line has gone out: the error travels as an event
            yield _sse(e.body)
        finally:  # a client that went away (the stream closed early) frees its slots; finished jobs are left alone
            worker.cancel(jobs)

    async def respond(body: _GenerationRequest, prompts: list[list[int]], what: str, request: Request,
                      chat: bool):
        jobs = jobs_for(body, prompts, what)
        worker.submit(jobs)
        prompt_tokens = sum(map(len, prompts))
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(jobs, head, prompt_tokens, include_usage, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watch = asyncio.create_task(cancel_when_gone(request, jobs))
        try:
            done: dict[int, Completion] = {index: event.completion async for batch in events(jobs)
                                           for index, event in batch if event.finished}
        finally:
            watch.cancel()
            worker.cancel(jobs)
        choices = []
        for index, c in sorted(done.items()):
            if chat:
                reasoning, content = split_reasoning(c.text)
                message = {"role": "assistant", "content": content}
                if reasoning is not None:
                    message["reasoning_content"] = reasoning
                fields = {"message": message}
            else:
                fields = {"text": c.text}
            choices.append({"index": index, **fields, "logprobs": None, "finish_reason": c.finish_reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in done.values()))}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(importlib.resources.files(__package__).joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict:
        """Always open (no key): the model, requests in flight and the server's limits."""
        return {"status": "ok", "model": model_name, **worker.stats(), "max_batch": max_batch,
                "max_queue": max_queue, "context": context}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "nanoseek", "max_model_len": context}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model_info(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} is not served here", "model", "model_not_found")
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """A reply to the messages (DeepSeek-R1's chat template); reasoning in `reasoning_content`."""
        prompt = tokenizer.apply_chat_template([m.as_dict() for m in body.messages], add_generation_prompt=True)
        return await respond(body, [prompt], "messages", request, chat=True)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Text after each prompt; a text prompt starts with bos, as the tokenizer's add_bos_token says."""
        prompts = [body.prompt] if isinstance(body.prompt, str) or not body.prompt or isinstance(body.prompt[0], int) \
            else body.prompt  # one prompt (text or ids) or several
        prompts = [tokenizer.encode(p, add_bos=True) if isinstance(p, str) else p for p in prompts]
        return await respond(body, prompts, "prompt", request, chat=False)

    app.include_router(v1)
    return app


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread (port 0: a free one); yields the base URL, stops on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()
