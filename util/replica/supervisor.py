"""What a replica runs beside its predictor: its engine, kept alive, and its progress reports.

An engine that dies or hangs is replaced, the rows it held run again, and a row that kills every engine it
meets becomes an error row instead of a loop:

    supervisor = EngineSupervisor(start_engine, max_restarts=3, max_tokens=256)   # starts the engine
    result = await supervisor.run(row_id, lambda engine: generate(engine, request))
    supervisor.shutdown()                                # or at the replica's exit, whichever comes first

- **A death** (vLLM's EngineDeadError: the engine process is gone) or **a stall** (no row finished for
  longer than `stall_bound()`) ends the engine. The first row to see it starts a new one while the others
  wait; then every row that was in flight runs again. A row already returned never runs again.
- **Bounded**: a death more than `max_restarts` times within WINDOW_S stops the replica with a
  RuntimeError that says so, and the job fails with it.
- **A row that kills the engine**: a row in flight at two deaths is a suspect. Suspects run in groups with
  nothing beside them; a group whose engine dies is split in two, and a row whose engine dies while it runs
  alone is the culprit: an error row. Deaths inside those groups halve a group each, so they are bounded by
  the suspects, and do not count against `max_restarts`.

A ProgressClient sends the replica's finished rows to the run's progress actor (util/report.py), at most
every FLUSH_S seconds, and what it survived at once; one that finds no actor reports nothing.
"""

import asyncio
import atexit
import collections
import logging
import time
import weakref

import ray

from util import columns as col
from util.errors import RowError, RunStopped, error_text

WINDOW_S = 600.0  # max_restarts is counted over this window
STALL_FLOOR_S = 300.0  # the stall bound is never shorter...
STALL_MARGIN = 3.0  # ... nor shorter than this many times the slowest row's time for max_tokens
UNMEASURED_TOK_PER_S = 2.0  # before any row finished: every sequence decodes at least this fast
WATCH_S = 1.0
FLUSH_S = 1.0  # a replica sends its finished rows at most this often
PROGRESS_ACTOR = "batch-llm-progress"  # the run's progress actor (util/report.py ProgressReporter) goes by it

logger = logging.getLogger("batch_llm")


class EngineSupervisor:
    def __init__(self, start_engine, max_restarts: int = 3, stall_timeout_s: float | None = None,
                 max_tokens: int = 2048, count=lambda name, n: None, stop_engine=None, is_dead=None):
        """`start_engine()` -> a vLLM AsyncLLM; `count(name, n)`: what it survived, for the run's report;
        `stop_engine(engine)` and `is_dead(error)` (the engine is gone): vLLM's, unless given."""
        from util.replica.internals import engine_dead_error, shutdown_engine

        self.start_engine, self.count = start_engine, count
        self.stop_engine = stop_engine or shutdown_engine
        self.is_dead = is_dead or (lambda error: isinstance(error, engine_dead_error()))
        self.max_restarts, self.stall_timeout_s, self.max_tokens = max_restarts, stall_timeout_s, max_tokens
        self.engine, self.generation, self.dead, self.replacing = start_engine(), 0, None, None
        # Exit hooks run last-registered first, so this one runs before multiprocessing's, which would end the
        # engine's processes under it (vLLM would log a crash after a good run). Weak: it keeps nothing alive.
        atexit.register(_shutdown_if_alive, weakref.ref(self))
        self.in_flight: dict[str, float] = {}  # row id -> when it went to the current engine
        self.strikes = collections.Counter()  # row id -> deaths it was in flight at
        self.groups: list[set] = []  # suspects; the first group runs, with no other row beside it
        self.culprits: set[str] = set()
        self.deaths: collections.deque = collections.deque()  # when, outside the suspects' groups
        self.last_progress, self.slowest_tok_per_s, self.watchdog = time.monotonic(), None, None
        self.changed = asyncio.Event()  # set (and replaced) whenever a waiting row may now run

    async def run(self, row_id: str, attempt):
        """`await attempt(engine)` for this row, on a new engine each time one dies under it."""
        if self.watchdog is None:  # here, not in __init__: the actor's event loop runs only now
            self.dead, self.watchdog = asyncio.get_running_loop().create_future(), asyncio.ensure_future(self.watch())
        while True:
            await self.wait_turn(row_id)
            generation, dead, started = self.generation, self.dead, time.monotonic()
            if not self.in_flight:
                self.last_progress = started  # an idle replica is not a stalled one
            self.in_flight[row_id] = started
            task = asyncio.ensure_future(attempt(self.engine))
            await asyncio.wait([task, dead], return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not self.died(task):
                self.finished(row_id, task, started)
                return task.result()  # or the row's own error, raised
            self.declare_dead(generation, dead.result() if dead.done() else f"died ({task.exception()!r})")
            task.cancel()
            self.in_flight.pop(row_id, None)
            if row_id in self.culprits:
                self.finished(row_id, None, started)
                raise RowError(f"the engine died {self.strikes[row_id]} times while running this row, the last "
                               "time with no other row beside it")

    def died(self, task: asyncio.Task) -> bool:
        error = None if task.cancelled() else task.exception()
        return task.cancelled() or (error is not None and not isinstance(error, RowError) and self.gone(error, self.engine))

    def gone(self, error: Exception, engine) -> bool:
        """Whether `error` says the engine is dead (not that it refused one request)."""
        return self.is_dead(error) or getattr(engine, "errored", False)

    def refusal(self, error: Exception, engine) -> RowError:
        """The engine's refusal of one request (bad sampling values, ...) as that row's error. A dead engine is
        not the row's fault: its error is raised again, for `run` to replace the engine."""
        if self.gone(error, engine):
            raise error
        # vLLM raises EngineGenerateError(), with no message, from the error that says why.
        return RowError(f"{type(error).__name__}: {error}" if str(error).strip() else error_text(error))

    async def wait_turn(self, row_id: str) -> None:
        while True:
            if self.replacing is not None:
                await asyncio.shield(self.replacing)  # raises, for every row, if the replica must stop
            if not self.groups or row_id in self.groups[0]:
                return
            await self.changed.wait()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def finished(self, row_id: str, task: asyncio.Task | None, started: float) -> None:
        self.in_flight.pop(row_id, None)
        now = time.monotonic()
        self.last_progress = now
        result = task.result() if task is not None and task.exception() is None else None
        tokens = result.get(col.NUM_GENERATED_TOKENS, 0) if isinstance(result, dict) else 0
        if tokens and now > started:  # the slowest row so far, queueing included: it sets the stall bound
            rate = tokens / (now - started)
            self.slowest_tok_per_s = min(rate, self.slowest_tok_per_s or rate)
        if self.groups and row_id in self.groups[0]:
            self.groups[0].discard(row_id)
            if not self.groups[0]:
                self.groups.pop(0)
                self.notify()

    def stall_bound(self) -> float:
        """Seconds without a finished row after which the engine counts as hung."""
        if self.stall_timeout_s:
            return self.stall_timeout_s
        rate = self.slowest_tok_per_s or UNMEASURED_TOK_PER_S
        return max(STALL_FLOOR_S * (1 if self.slowest_tok_per_s else 2), STALL_MARGIN * self.max_tokens / rate)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            bound = self.stall_bound()
            if self.in_flight and self.replacing is None and time.monotonic() - self.last_progress > bound:
                self.declare_dead(self.generation, f"finished no row for {bound:.0f} s (a hung engine)")

    def declare_dead(self, generation: int, reason: str) -> None:
        """Once per engine: strikes for its rows in flight, then a new engine (`replacing`)."""
        if generation != self.generation or self.replacing is not None:
            return
        if not self.dead.done():
            self.dead.set_result(reason)  # ends every other row's wait on this engine
        in_flight, now = list(self.in_flight), time.monotonic()
        self.strikes.update(in_flight)
        if self.groups:  # suspects ran alone: one is the culprit, or the group is halved
            group = sorted(self.groups.pop(0))
            if len(group) == 1 and group[0] in self.in_flight:
                self.culprits.add(group[0])
                self.count("rows_isolated", 1)
            elif len(group) > 1 and in_flight:
                self.groups[0:0] = [set(group[:len(group) // 2]), set(group[len(group) // 2:])]
            else:  # it died with none of them running: the same group again
                self.groups.insert(0, set(group))
        else:
            self.deaths.append(now)
            while now - self.deaths[0] > WINDOW_S:
                self.deaths.popleft()
            suspects = {row for row in in_flight if self.strikes[row] >= 2}
            if suspects:
                self.groups.append(suspects)
        self.count("rows_rerun", len(set(in_flight) - self.culprits))
        self.replacing = asyncio.ensure_future(self.replace(reason, len(in_flight)))

    async def replace(self, reason: str, rows: int) -> None:
        self.stop_engine(self.engine)
        while True:
            if len(self.deaths) > self.max_restarts:
                raise RuntimeError(f"a replica's engine died {len(self.deaths)} times within {WINDOW_S / 60:.0f} "
                                   f"minutes, more than --max-engine-restarts {self.max_restarts} allows; the "
                                   f"last time it {reason}")
            logger.warning("a replica's engine %s; starting a new one, then the rows it held run again (%d)",
                           reason, rows)
            self.count("engine_restarts", 1)
            try:
                self.engine = self.start_engine()  # the rows wait for it in any case
                break
            except Exception as error:  # a death while it starts counts like any other
                reason = f"failed to start ({type(error).__name__}: {error})"
                self.deaths.append(time.monotonic())
        self.generation, self.dead = self.generation + 1, asyncio.get_running_loop().create_future()
        self.last_progress, self.replacing = time.monotonic(), None
        self.notify()

    def shutdown(self) -> None:
        """Stop the engine and its processes, once."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            self.stop_engine(engine)

    def __del__(self) -> None:
        self.shutdown()


def _shutdown_if_alive(supervisor_ref: weakref.ref) -> None:
    supervisor = supervisor_ref()
    if supervisor is not None:
        supervisor.shutdown()


class ProgressClient:
    """A replica's side. The actor is looked up by name at each send, so that a replica kept warm across
    runs reports to each run's own actor, and tells it first that it is ready."""

    def __init__(self, replica: str = "", marks: dict | None = None):
        self.replica, self.reporting_to, self.rows, self.tokens, self.sent = replica, None, 0, 0, time.monotonic()
        self.marks = dict(marks or {})  # the replica's start (the run's timeline): its first run's only
        self.prompt_tokens = self.cached_tokens = 0
        self.released_by = None  # the run that let this replica answer rows

    @classmethod
    def connect(cls, marks: dict | None = None) -> "ProgressClient":
        """Call when the engine is ready: that time starts the replica's own tok/s. `marks`: when its start's
        steps happened (name -> time.time())."""
        if not ray.is_initialized():
            return cls()
        client = cls((ray.get_runtime_context().get_actor_id() or "driver")[:8], marks)
        client._actor()
        return client

    def _actor(self):
        try:
            actor = ray.get_actor(PROGRESS_ACTOR)
        except ValueError:  # no run is reporting
            return None
        if actor != self.reporting_to:  # a new run: this replica is ready for it from now on
            self.reporting_to = actor
            actor.replica_ready.remote(self.replica, time.time(), self.marks)
            self.marks = {}  # a replica kept warm started before the next run did
        return actor

    async def released(self) -> None:
        """Returns once the run lets rows run (its input has passed its check); at once if no run is reporting.
        RunStopped if the run was stopped instead (its input refused, or no row left to run)."""
        actor = self._actor() if self.replica else None
        if actor is not None and actor != self.released_by:
            stopped = await actor.wait_released.remote()
            if stopped is not None:
                raise RunStopped(stopped)
            self.released_by = actor

    def rows_done(self, rows: int, output_tokens: int, flush: bool = False, prompt_tokens: int = 0,
                  cached_tokens: int = 0) -> None:
        """Count finished rows (and their prompt tokens, and how many of those vLLM's prefix cache held); send
        them when FLUSH_S has passed since the last send, or `flush`."""
        self.rows, self.tokens = self.rows + rows, self.tokens + output_tokens
        self.prompt_tokens, self.cached_tokens = self.prompt_tokens + prompt_tokens, self.cached_tokens + cached_tokens
        if self.rows and (flush or time.monotonic() - self.sent >= FLUSH_S):
            actor = self._actor() if self.replica else None
            if actor is not None:
                actor.rows_done.remote(self.replica, self.rows, self.tokens, time.time())
                if self.prompt_tokens:
                    actor.cached.remote(self.replica, self.prompt_tokens, self.cached_tokens)
            self.rows, self.tokens, self.sent = 0, 0, time.monotonic()
            self.prompt_tokens = self.cached_tokens = 0

    def count(self, name: str, n: int) -> None:
        """What the replica survived (SURVIVED), sent at once: it is rare."""
        actor = self._actor() if self.replica else None
        if actor is not None:
            actor.count.remote(name, n)


def report_grouped(prompt_tokens: int, shared_tokens: int) -> None:
    """A grouped block's prompt tokens, and how many its rows share with the row before them
    (util/grouping.py), to the run's progress actor, if one is listening."""
    try:
        actor = ray.get_actor(PROGRESS_ACTOR)
    except ValueError:
        return
    actor.grouped.remote(prompt_tokens, shared_tokens)
