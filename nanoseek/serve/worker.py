"""The engine's process: the Engine runs in a process of its own (as vLLM's engine core), so the server's HTTP work and
the engine's steps never wait for one interpreter lock. Requests go to it over one pipe, between its steps; each step's
updates come back over another, and a reader thread in the server's process hands them to the asyncio queues of the
requests they belong to.

In one process the two took turns: every tensor the step made or freed and every eager operator of a prefill let go of
the lock, and the HTTP thread, a quarter of a core under 32 streaming clients, kept it for up to the 5 ms switch
interval each time (`benchmarks/serve_load.py`: the server at 0.66 of the engine's offline tokens/s)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp  # sends the model's tensors through shared memory, not copies

from ..engine import Completion, Engine, Event
from ..errors import NanoseekError
from ..sampling import SamplingError, SamplingParams, TokenLogprob
from .metrics import ServerMetrics
from .schemas import APIError

log = logging.getLogger(__name__)
STOP_S = 10  # how long a stopping engine process may take before it is killed


@dataclass(eq=False)
class Job:
    """One engine request: the choice `index` of an API request, whose events go to `events` on `loop`."""
    prompt_ids: list[int]
    params: SamplingParams
    index: int
    events: asyncio.Queue  # (index, Event | APIError)
    loop: asyncio.AbstractEventLoop
    endpoint: str = ""  # for the metrics: chat | completions
    key: int = -1  # the worker's number for it
    completion: Completion | None = None  # what has come back so far; the engine's own once finished
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # when its latest token was handed out (None: none yet), for the metrics


@dataclass
class Update:
    """One engine Event on its way to the server's process: what is new for request `key` (with its first update, the
    prompt's log-probs when asked; with its last, the finished Completion), or why the engine refused it."""
    key: int
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: Completion | None = None
    refused: str | None = None  # a SamplingError's message: the request gets a 400
    first: bool = False  # the request's first update: the engine took it (its prompt tokens count)


@dataclass
class EngineStats:
    """The engine after a step, for /health and the metrics."""
    waiting: int = 0
    running: int = 0
    acceptance_rate: float = 0.0
    reused_prompt_tokens: int = 0  # since the previous step


class EngineWorker:
    """The server's side of the engine's process: starts it (and starts a new one if it dies), sends it requests and
    cancellations, counts the requests in flight (at most `max_queue`) and delivers each update to its request.
    `make_engine` is called in the engine's process, so it must pickle (the model's tensors travel as shared
    memory). `submit` and `cancel` are called from the event loop; updates arrive on the reader thread."""

    def __init__(self, make_engine: Callable[[], Engine], max_queue: int, metrics: ServerMetrics,
                 warm_up: bool = False):
        self.make_engine, self.max_queue, self.metrics, self.warm_up = make_engine, max_queue, metrics, warm_up
        self.load = 0  # engine requests accepted and not finished
        self.cancelled = 0
        self.warmup_seconds = 0.0
        self.engine_stats = EngineStats()
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}  # key -> job not finished
        self._keys = itertools.count()
        self.process: mp.Process | None = None  # the engine's, once started
        self._inbox: Connection | None = None  # requests to the engine's process
        self._outbox: Connection | None = None  # its updates
        self._reader = threading.Thread(target=self._read, name="nanoseek-engine-reader", daemon=True)
        self._stopping = False

    def start(self) -> None:
        """Start the engine's process; returns once it is ready (with `warm_up`: its compiled steps built)."""
        self._spawn()
        self._reader.start()

    def stop(self) -> None:
        self._stopping = True
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self._inbox.send(None)
        self.process.join(STOP_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._reader.join()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        inbox, to_engine = ctx.Pipe(duplex=False)
        from_engine, outbox = ctx.Pipe(duplex=False)
        process = ctx.Process(target=run_engine, name="nanoseek-engine", daemon=True,
                              args=(self.make_engine, torch.get_num_threads(), self.warm_up, inbox, outbox))
        process.start()
        inbox.close()  # held by the engine's process alone: a send after it died fails at once
        outbox.close()
        try:
            kind, value = from_engine.recv()
        except EOFError:
            process.join()
            raise NanoseekError(f"the engine's process died while starting (exit code {process.exitcode})") from None
        if kind == "error":
            process.join()
            raise NanoseekError(f"the engine could not start: {value}")
        self.warmup_seconds = value
        self.process, self._inbox, self._outbox = process, to_engine, from_engine

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            if self.load + len(jobs) > self.max_queue:
                raise APIError(429, f"the server is busy ({self.load} requests waiting or running, at most "
                               f"{self.max_queue}); retry later", code="rate_limit_exceeded")
            self.load += len(jobs)
            for job in jobs:
                job.key = next(self._keys)
                job.completion = Completion(job.key, list(job.prompt_ids))
                self._jobs[job.key] = job
        try:
            self._inbox.send([("submit", job.key, job.prompt_ids, job.params) for job in jobs])
        except OSError:  # the engine's process has just died; a new one is on its way
            self._deliver([(job, APIError(503, "the engine is restarting; retry shortly")) for job in jobs])

    def cancel(self, jobs: list[Job]) -> None:
        """Stop the jobs that have not finished (the others are left alone)."""
        keys = [("cancel", job.key) for job in jobs if job.key in self._jobs]
        if keys:
            with contextlib.suppress(OSError):  # a dead engine's requests are failed by the reader
                self._inbox.send(keys)

    def stats(self) -> dict[str, int]:
        return {"requests": self.load, "running": self.engine_stats.running, "waiting": self.engine_stats.waiting,
                "cancelled": self.cancelled}

    # ---- the reader thread ----
    def _read(self) -> None:
        while True:
            try:
                kind, *message = self._outbox.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                self._restart()
                continue
            if kind == "step":
                self._step(*message)
            else:  # "failed": a step raised; the engine's process goes on with a fresh engine
                keys, trace = message
                log.error("engine step failed; the requests in flight get a 500 and a fresh engine takes over\n%s",
                          trace)
                failure = APIError(500, "the engine failed while generating; see the server log")
                self._deliver([(job, failure) for job in map(self._jobs.get, keys) if job is not None])

    def _restart(self) -> None:
        """The engine's process died (killed, out of memory): fail its requests, start another."""
        self.process.join()
        log.error("the engine's process died (exit code %s); its requests get a 500, a new one starts",
                  self.process.exitcode)
        failure = APIError(500, "the engine's process died while generating; see the server log")
        self._deliver([(job, failure) for job in list(self._jobs.values())])
        try:
            self._spawn()
        except NanoseekError:
            log.exception("no new engine process; requests get 503")
            self._stopping = True

    def _step(self, updates: list[Update], stats: EngineStats | None) -> None:
        items: list[tuple[Job, Event | APIError]] = []
        for u in updates:
            job = self._jobs.get(u.key)
            if job is None:
                continue
            if u.refused is not None:
                items.append((job, APIError(400, u.refused)))
                continue
            if u.first:
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))
            c = job.completion
            if u.prompt_logprobs is not None:
                c.prompt_logprobs = u.prompt_logprobs
            c.token_ids += u.new_token_ids
            c.token_logprobs += u.logprobs
            if u.finished is not None:
                job.completion = c = u.finished
            event = Event(c, u.new_text, u.new_token_ids, u.finished is not None, u.logprobs)
            self.metrics.tokens(job, event)
            items.append((job, event))
        if stats is not None:
            self.engine_stats = stats
            self.metrics.step(stats)
        self._deliver(items)

    def _deliver(self, items: list[tuple[Job, Event | APIError]]) -> None:
        """Hand each item to its request, with one wake-up per event loop for all of them."""
        puts: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in items:
            if isinstance(item, APIError) or item.finished:
                with self._lock:
                    if self._jobs.pop(job.key, None) is None:  # already failed (a dead engine's last requests)
                        continue
                    self.load -= 1
                self.cancelled += isinstance(item, Event) and item.completion.finish_reason == "cancelled"
            puts.setdefault(job.loop, []).append((job.events, (job.index, item)))
        for loop, batch in puts.items():
            with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for events, item in batch:
        events.put_nowait(item)


# ---- the engine's process ------------------------------------------------------------------------------------------
def run_engine(make_engine: Callable[[], Engine], threads: int, warm_up: bool, inbox: Connection,
               outbox: Connection) -> None:
    """The engine's process: make the engine (warm it up), say "ready", then serve until told to stop or until the
    server's process has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server stops us
    torch.set_num_threads(threads)
    try:
        loop = EngineLoop(make_engine, outbox)
        seconds = loop.engine.warmup() if warm_up else 0.0
    except Exception as e:
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    outbox.send(("ready", seconds))
    with contextlib.suppress(EOFError, BrokenPipeError):
        loop.run(inbox)


class EngineLoop:
    """Admits and cancels requests between steps, steps while there is work and sends each step's updates."""

    def __init__(self, make_engine: Callable[[], Engine], outbox: Connection):
        self.make_engine, self.outbox = make_engine, outbox
        self.engine = make_engine()
        self.keys: dict[int, int] = {}  # the engine's completion id -> the server's key
        self.completions: dict[int, Completion] = {}  # key -> completion, not finished
        self.started: set[int] = set()  # keys that have had an update
        self.reused = 0  # the engine's reused prompt tokens already reported
        self.updates: list[Update] = []  # to send

    def run(self, inbox: Connection) -> None:
        while True:
            if not self.engine.has_work():
                inbox.poll(None)
            while inbox.poll():
                messages = inbox.recv()
                if messages is None:
                    return
                for kind, key, *args in messages:
                    self.submit(key, *args) if kind == "submit" else self.cancel(key)
            if self.engine.has_work():
                self.step()
            elif self.updates:  # refusals only
                self.outbox.send(("step", self.updates, None))
                self.updates = []

    def submit(self, key: int, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            c = self.engine.submit(prompt_ids, params)
        except SamplingError as e:
            self.updates.append(Update(key, refused=str(e)))
            return
        self.keys[c.id], self.completions[key] = key, c

    def cancel(self, key: int) -> None:
        if key in self.completions:
            self.engine.cancel(self.completions[key])

    def step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # a bug or out of memory: fail the requests in flight, go on with a fresh engine
            self.outbox.send(("failed", list(self.completions), traceback.format_exc()))
            self.engine, self.keys, self.completions, self.started, self.reused = self.make_engine(), {}, {}, set(), 0
            return
        for event in events:
            c = event.completion
            key = self.keys[c.id]
            first = key not in self.started
            self.started.add(key)
            self.updates.append(Update(key, event.new_text, event.new_token_ids, event.logprobs,
                                       c.prompt_logprobs if first and c.prompt_logprobs else None,
                                       c if event.finished else None, first=first))
            if event.finished:
                del self.keys[c.id], self.completions[key]
                self.started.discard(key)
        e = self.engine
        stats = EngineStats(len(e.waiting), len(e.active), e.acceptance_rate, e.reused_prompt_tokens - self.reused)
        self.reused = e.reused_prompt_tokens
        self.outbox.send(("step", self.updates, stats))
        self.updates = []


async def job_events(jobs: list[Job]) -> AsyncIterator[list[tuple[int, Event]]]:
    """Batches of (choice index, Event) until every job has finished: all that has arrived when the request
    gets its turn, a choice's consecutive events merged into one (under load: fewer, larger chunks).
    The jobs share one queue; an APIError in it is raised."""
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
                             before.new_token_ids + item.new_token_ids, item.finished, before.logprobs + item.logprobs)
                batch.pop()
            batch.append((index, item))
        yield batch
