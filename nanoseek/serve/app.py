"""The FastAPI app: `create_app` wires a `Server` (the handlers and the state they share) to its routes, error
handlers and lifespan; `running` serves an app on a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from .. import __version__
from ..engine import Completion, Engine
from ..errors import NanoseekError
from ..model import Transformer
from ..sampling import SamplingParams
from ..tokenizer import ReasoningSplitter, Tokenizer, ToolCallStream, thinking_prefill
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .schemas import (ERRORS, UNSUPPORTED, APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest,
                      choice, sse, tool_call, usage)
from .worker import EngineWorker, Job, job_events

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
bearer = HTTPBearer(auto_error=False)


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, speculative: bool = False,
               max_len: int | None = None, compile: bool = False) -> FastAPI:
    """The server for one model. `max_len` (default: the model's context) is the longest sequence, prompt and
    reply together; the engine's latent cache holds max_batch x max_len tokens. `compile`: the Engine's compiled
    decode step, warmed up before the server takes requests."""
    if max_batch < 1 or max_queue < 1:
        raise NanoseekError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
    if speculative and not model.mtp:  # the engine's process would refuse it too, after the server had started
        raise NanoseekError("speculative decoding needs the model's MTP module (num_nextn_predict_layers >= 1)")
    context = max_len or model.cfg.max_position_embeddings
    worker = EngineWorker(functools.partial(Engine, model, tokenizer, max_batch, context, speculative, compile),
                          max_queue, ServerMetrics(max_batch), warm_up=compile)
    server = Server(worker, tokenizer, model_name, model.cfg.vocab_size, api_key, max_batch, context, compile)
    app = FastAPI(title="nanoseek", version=__version__, lifespan=server.lifespan,
                  description="An OpenAI-compatible API for a DeepSeek-V3-architecture model.")
    app.state.worker = worker
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(NanoseekError, user_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.get("/", include_in_schema=False)(server.page)
    app.get("/health")(server.health)
    app.get("/metrics", response_class=PlainTextResponse)(server.metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.authorize)], responses=ERRORS)
    v1.get("/models")(server.models)
    v1.get("/models/{model_id:path}")(server.model_info)
    v1.post("/chat/completions")(server.chat_completions)
    v1.post("/completions")(server.completions)
    app.include_router(v1)
    return app


# ---- errors: all in OpenAI's shape -----------------------------------------------------------------------------
async def api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def user_error(request: Request, e: NanoseekError) -> JSONResponse:
    """Sampling settings out of range, a bad chat message."""
    return APIError(400, str(e)).response()


async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = max(e.errors(), key=lambda x: len(x["loc"]))  # for a union, the branch that got furthest
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})",
                        code="invalid_json").response()
    # the field's path, without "body" and the names pydantic gives the branches of a union ("str", "list[str]")
    param = ".".join(str(p) for p in err["loc"] if p not in ("body", "str", "int") and "[" not in str(p)
                     and not str(p).startswith("constrained-")) or None
    return APIError(400, f"{param or 'the body'}: {err['msg']}", param).response()


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else str(e.detail)
    return APIError(e.status_code, message).response()


async def server_error(request: Request, e: Exception) -> JSONResponse:
    return APIError(500, "internal server error; see the server log").response()


# ---- the handlers ----------------------------------------------------------------------------------------------
class Server:
    """One model behind an EngineWorker: the route handlers and what they share (the worker, the tokenizer, the
    model's name, the limits)."""

    def __init__(self, worker: EngineWorker, tokenizer: Tokenizer, model_name: str, vocab: int,
                 api_key: str | None, max_batch: int, context: int, compile: bool):
        self.worker, self.tokenizer, self.model_name, self.vocab = worker, tokenizer, model_name, vocab
        self.api_key, self.max_batch, self.max_queue = api_key, max_batch, worker.max_queue
        self.context, self.compile = context, compile

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the engine's process (with `compile`: its decode steps built) before the app takes requests; stop
        it with the app."""
        await asyncio.to_thread(self.worker.start)
        if self.compile:
            log.info("decode step compiled in %.1f s", self.worker.warmup_seconds)
        try:
            yield
        finally:
            await asyncio.to_thread(self.worker.stop)

    async def authorize(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if self.api_key is None:
            return
        if credentials is None:
            raise APIError(401, "an API key is needed: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        if not secrets.compare_digest(credentials.credentials.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    # ---- routes ----
    async def page(self) -> HTMLResponse:
        return HTMLResponse(importlib.resources.files("nanoseek").joinpath("static/chat.html").read_text("utf-8"))

    async def health(self) -> dict:
        """Always open (no key): the model, requests in flight and the server's limits."""
        return {"status": "ok", "model": self.model_name, **self.worker.stats(), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "context": self.context}

    async def metrics(self) -> PlainTextResponse:
        """Always open (no key): Prometheus metrics in its text format (see serve/metrics.py)."""
        return PlainTextResponse(self.worker.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "nanoseek",
                "max_model_len": self.context}

    async def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    async def model_info(self, model_id: str) -> dict:
        if model_id != self.model_name:
            raise APIError(404, f"model {model_id!r} is not served here", "model", "model_not_found")
        return self.model_card()

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        """A reply to the messages (DeepSeek-R1's chat template); reasoning in `reasoning_content`."""
        prompt = self.tokenizer.apply_chat_template([m.as_dict() for m in body.messages], add_generation_prompt=True,
                                                    tools=body.offered_tools(), thinking=body.thinking())
        return await self.respond(body, [prompt], "messages", request, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        """Text after each prompt; a text prompt starts with bos, as the tokenizer's add_bos_token says."""
        prompts = [body.prompt] if isinstance(body.prompt, str) or not body.prompt or isinstance(body.prompt[0], int) \
            else body.prompt  # one prompt (text or ids) or several
        prompts = [self.tokenizer.encode(p, add_bos=True) if isinstance(p, str) else p for p in prompts]
        return await self.respond(body, prompts, "prompt", request, chat=False)

    # ---- generation ----
    async def respond(self, body: GenerationRequest, prompts: list[list[int]], what: str, request: Request,
                      chat: bool):
        """Submit one job per prompt and choice; answer with a stream of events or, once all have finished, one
        response. `what`: the request field that holds the prompts, for error messages."""
        jobs = self.jobs_for(body, prompts, what)
        self.worker.submit(jobs)
        prompt_tokens = sum(map(len, prompts))
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        if body.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(jobs, head, prompt_tokens, include_usage, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watch = asyncio.create_task(self.cancel_when_gone(request, jobs))
        try:
            done: dict[int, Completion] = {index: event.completion async for batch in job_events(jobs)
                                           for index, event in batch if event.finished}
        finally:
            watch.cancel()
            self.worker.cancel(jobs)
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [self.finished(index, c, body) for index, c in sorted(done.items())],
                "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in done.values()))}

    def text_of(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def finished(self, index: int, c: Completion, body: GenerationRequest) -> dict:
        """A finished choice, with its log-probs and (completions with echo) its prompt, as the request asked."""
        report, prompt_report = body.reported_logprobs()
        if isinstance(body, ChatCompletionRequest):
            return choice(index, c, True, None if report is None else chat_logprobs(c.token_logprobs, self.text_of),
                          thinking_prefill(body.thinking()), tools=body.offered_tools() is not None)
        echo = self.tokenizer.decode(c.prompt_ids) if body.echo else ""
        if report is None:
            return choice(index, c, False, None, echo)
        ids, entries = c.token_ids, c.token_logprobs
        if prompt_report is not None:
            ids, entries = c.prompt_ids + ids, c.prompt_logprobs + entries
        return choice(index, c, False, completion_logprobs(ids, entries, self.text_of), echo)

    def jobs_for(self, body: GenerationRequest, prompts: list[list[int]], what: str) -> list[Job]:
        """Check the request against the model and the context; one job per prompt and choice."""
        if body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server has {self.model_name!r}",
                           "model", "model_not_found")
        for name, neutral in UNSUPPORTED.items():
            if (body.model_extra or {}).get(name) not in neutral:
                raise APIError(400, f"{name} is not supported by this server", name)
        n = body.n or 1
        if n * len(prompts) > self.max_queue:
            raise APIError(400, f"n x prompts = {n * len(prompts)} choices; this server takes at most "
                           f"{self.max_queue} at once", "n")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        report, prompt_report = body.reported_logprobs()
        grammar = body.grammar()
        loop, events, jobs = asyncio.get_running_loop(), asyncio.Queue(), []
        context = self.context
        for p, ids in enumerate(prompts):
            if not ids:
                raise APIError(400, f"{what}: the prompt is empty", what)
            if not all(0 <= i < self.vocab for i in ids):
                raise APIError(400, f"{what}: token ids must be in [0, {self.vocab})", what)
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
                    seed=None if body.seed is None else body.seed + i, stop=stop, ignore_eos=body.ignore_eos,
                    logprobs=report, prompt_logprobs=prompt_report, grammar=grammar)
                jobs.append(Job(ids, params, p * n + i, events, loop,
                                "chat" if isinstance(body, ChatCompletionRequest) else "completions"))
        return jobs

    async def cancel_when_gone(self, request: Request, jobs: list[Job]) -> None:
        """Cancel the jobs of a non-streaming request whose client has gone (checked every POLL_S seconds)."""
        while not await request.is_disconnected():
            await asyncio.sleep(POLL_S)
        self.worker.cancel(jobs)

    async def stream(self, jobs: list[Job], head: dict, prompt_tokens: int, include_usage: bool,
                     body: GenerationRequest) -> AsyncIterator[str]:
        """Server-sent events: per choice a first chunk (chat: the role; completions with echo: the prompt), deltas
        with the log-probs of their tokens when asked, a chunk with the finish_reason; then with include_usage a
        last chunk with the usage and no choices; then [DONE]."""
        chat = isinstance(body, ChatCompletionRequest)
        deltas = {job.index: StreamDeltas(self, body) for job in jobs}
        null_usage = {"usage": None} if include_usage else {}

        def chunk(index: int, fields: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
            return sse({**head, "choices": [{"index": index, **fields, "logprobs": logprobs,
                                             "finish_reason": finish_reason}], **null_usage})

        completion_tokens = 0
        try:
            for job in jobs if chat else []:
                yield chunk(job.index, {"delta": {"role": "assistant", "content": ""}})
            async for batch in job_events(jobs):
                chunks = []  # written together
                for index, event in batch:
                    chunks += [chunk(index, fields, logprobs) for fields, logprobs in deltas[index].of(event)]
                    if event.finished:
                        completion_tokens += len(event.completion.token_ids)
                        chunks.append(chunk(index, {"delta": {}} if chat else {"text": ""}, None,
                                            "tool_calls" if deltas[index].called else event.completion.finish_reason))
                if chunks:
                    yield "".join(chunks)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the status line has gone out: the error travels as an event
            yield sse(e.body)
        finally:  # a client that went away (the stream closed early) frees its slots; finished jobs are left alone
            self.worker.cancel(jobs)


class StreamDeltas:
    """One streamed choice: turns its events into the fields and log-probs of its chunks (chat: the reasoning apart
    from the answer; completions with echo: the prompt first)."""

    def __init__(self, server: Server, body: GenerationRequest):
        self.server, self.chat = server, isinstance(body, ChatCompletionRequest)
        self.report, self.prompt_report = body.reported_logprobs()
        self.echo = not self.chat and bool(body.echo)
        self.splitter = ReasoningSplitter()
        if self.chat:  # what the prompt opened the reply with (a thinking switch): the splitter's first text
            self.splitter.feed(thinking_prefill(body.thinking()))
        self.calls = ToolCallStream() if self.chat and body.offered_tools() is not None else None
        self.called = False  # tool calls went out: the choice finishes with "tool_calls"
        self.started, self.offset = False, 0  # the prompt sent (echo); where the next token's text starts

    def of(self, event) -> list[tuple[dict, dict | None]]:
        c, text_of = event.completion, self.server.text_of
        if self.chat:
            reasoning, content = self.splitter.feed(event.new_text, final=event.finished)
            calls = []
            if self.calls is not None:
                content, calls = self.calls.feed(content, final=event.finished)
            delta = {k: v for k, v in (("reasoning_content", reasoning), ("reasoning", reasoning),
                                       ("content", content)) if v}
            if calls:
                delta["tool_calls"] = [tool_call(name, arguments, i) for i, (name, arguments) in enumerate(calls)]
                self.called = True
            logprobs = chat_logprobs(event.logprobs, text_of) if self.report is not None and event.logprobs else None
            return [({"delta": delta}, logprobs)] if delta or logprobs else []
        out = []
        if self.echo and not self.started:
            prompt = self.server.tokenizer.decode(c.prompt_ids)
            logprobs = None
            if self.prompt_report is not None:
                logprobs = completion_logprobs(c.prompt_ids, c.prompt_logprobs, text_of)
                self.offset = sum(map(len, logprobs["tokens"]))
            out.append(({"text": prompt}, logprobs))
        self.started = True
        logprobs = None
        if self.report is not None and event.logprobs:
            logprobs = completion_logprobs([e.token for e in event.logprobs], event.logprobs, text_of, self.offset)
            self.offset += sum(map(len, logprobs["tokens"]))
        if event.new_text or logprobs:
            out.append(({"text": event.new_text}, logprobs))
        return out


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
