"""The engine thread: one thread owns the Engine (it is not thread-safe) and hands each step's events to the
asyncio queues of the requests they belong to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..engine import Completion, Engine, Event
from ..sampling import SamplingError, SamplingParams
from .metrics import ServerMetrics
from .schemas import APIError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One engine request: the choice `index` of an API request, whose events go to `events` on `loop`."""
    prompt_ids: list[int]
    params: SamplingParams
    index: int
    events: asyncio.Queue  # (index, Event | APIError)
    loop: asyncio.AbstractEventLoop
    endpoint: str = ""  # for the metrics: chat | completions
    completion: Completion | None = None
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # when its latest token was handed out (None: none yet), for the metrics


class EngineWorker:
    """The one thread that owns the Engine: takes jobs from a queue between steps and loops `step()` while there is
    work. `submit` and `cancel` are called from the event loop; everything else runs on the thread."""

    def __init__(self, make_engine: Callable[[], Engine], max_queue: int, metrics: ServerMetrics):
        self.make_engine, self.max_queue, self.metrics = make_engine, max_queue, metrics
        self.engine = make_engine()
        self.load = 0  # engine requests accepted and not finished
        self.cancelled = 0
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (method, job), or None to stop
        self._jobs: dict[int, Job] = {}  # completion id -> job
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            if self.load + len(jobs) > self.max_queue:
                raise APIError(429, f"the server is busy ({self.load} requests waiting or running, at most "
                               f"{self.max_queue}); retry later", code="rate_limit_exceeded")
            self.load += len(jobs)
        for job in jobs:
            self._inbox.put((self._admit, job))

    def cancel(self, jobs: list[Job]) -> None:
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

    def _admit(self, job: Job) -> None:
        try:
            job.completion = self.engine.submit(job.prompt_ids, job.params)
        except SamplingError as e:
            self._deliver([(job, APIError(400, str(e)))])
            return
        self._jobs[job.completion.id] = job
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _cancel(self, job: Job) -> None:
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
        items = [(self._jobs[event.completion.id], event) for event in events]
        for job, event in items:
            self.metrics.tokens(job, event)
        self.metrics.step(self.engine)
        self._deliver(items)

    def _deliver(self, items: list[tuple[Job, Event | APIError]]) -> None:
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
