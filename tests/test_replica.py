"""The engine supervisor (util/replica/supervisor.py) on stand-in engines: deaths, a row that kills every engine, the
bound on restarts, a hung engine. The same faults on real vLLM engines: tests/test_faults.py."""

import asyncio

import pytest

from util import columns as col
from util.errors import RowError
from util.replica.supervisor import EngineSupervisor


class Dead(Exception):
    """Stands in for vLLM's EngineDeadError."""


class StandInEngine:
    """Answers a row after `delay` seconds; dies under every row in flight when a row in `poison` arrives,
    or when `kill()` is called; hangs forever on a row in `hang`."""

    def __init__(self, number: int, poison=(), hang=(), delay=0.01):
        self.number, self.poison, self.hang, self.delay = number, set(poison), set(hang), delay
        self.errored, self.pending, self.ran = False, [], []

    async def generate(self, row: str) -> dict:
        if self.errored:
            raise Dead("dead")
        if row in self.poison:
            self.kill()
            raise Dead("dead")
        waiter = asyncio.get_running_loop().create_future()
        self.pending.append(waiter)
        if row in self.hang:
            await waiter  # until it is killed
        else:
            await asyncio.wait([waiter], timeout=self.delay)
        if self.errored:
            raise Dead("dead")
        self.ran.append(row)
        return {col.NUM_GENERATED_TOKENS: 4, "engine": self.number}

    def kill(self):
        self.errored = True
        for waiter in self.pending:
            if not waiter.done():
                waiter.set_result(None)


def supervisor(engines: list, **kwargs) -> tuple[EngineSupervisor, dict]:
    """A supervisor whose engines are built by `engines`' factories in turn; returns it and its counts."""
    counts, factories = {}, iter(engines)
    started = EngineSupervisor(lambda: next(factories)(), count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n),
                               stop_engine=lambda engine: engine.kill(), is_dead=lambda e: isinstance(e, Dead), **kwargs)
    return started, counts


async def answer(supervisor: EngineSupervisor, row: str):
    try:
        return await supervisor.run(row, lambda engine: engine.generate(row))
    except RowError as error:
        return str(error)


def run_rows(supervisor: EngineSupervisor, rows: list[str], during=None):
    async def main():
        tasks = [asyncio.ensure_future(answer(supervisor, row)) for row in rows]
        if during:
            await during()
        return dict(zip(rows, await asyncio.gather(*tasks)))
    return asyncio.run(main())


ROWS = [f"row{i}" for i in range(8)]


def test_a_dead_engine_is_replaced_and_its_rows_run_again_once():
    first = StandInEngine(0, delay=5)
    sup, counts = supervisor([lambda: first, lambda: StandInEngine(1)])

    async def kill_it():
        await asyncio.sleep(0.05)
        first.kill()
    results = run_rows(sup, ROWS, during=kill_it)
    assert {row: r["engine"] for row, r in results.items()} == dict.fromkeys(ROWS, 1)
    assert counts == {"rows_rerun": 8, "engine_restarts": 1}


def test_a_row_that_kills_every_engine_becomes_the_only_error_row():
    engines = [lambda n=n: StandInEngine(n, poison={"row5"}) for n in range(20)]
    sup, counts = supervisor(engines)
    results = run_rows(sup, ROWS)
    assert results["row5"] == ("the engine died 6 times while running this row, the last time with no other "
                               "row beside it")
    assert all(isinstance(results[row], dict) for row in ROWS if row != "row5")
    # Two deaths make all 8 suspects; halving them down to the culprit alone takes four more (8, 4, 2, 1
    # rows running), which do not count against the bound.
    assert counts["rows_isolated"] == 1 and counts["engine_restarts"] == 6 and len(sup.deaths) == 2


def test_more_deaths_than_the_bound_stop_the_replica_with_why():
    engines = [lambda n=n: StandInEngine(n, poison=set(ROWS)) for n in range(5)]
    sup, _ = supervisor(engines, max_restarts=1)
    with pytest.raises(RuntimeError, match=r"^a replica's engine died 2 times within 10 minutes, more than "
                                           r"--max-engine-restarts 1 allows; the last time it died \(Dead"):
        run_rows(sup, ROWS[:1])


def test_an_engine_that_fails_to_start_counts_as_a_death():
    def broken():
        raise RuntimeError("Engine core initialization failed")
    first = StandInEngine(0, poison={"row0"})
    sup, counts = supervisor([lambda: first, broken, lambda: StandInEngine(2)])
    assert run_rows(sup, ["row1", "row0"])["row1"]["engine"] == 2
    assert len(sup.deaths) == 2 and counts["engine_restarts"] == 2  # each start counts, the failed one too


def test_a_hung_engine_is_replaced_after_the_stall_bound():
    sup, counts = supervisor([lambda: StandInEngine(0, hang={"row3"}), lambda: StandInEngine(1)], stall_timeout_s=0.5)
    results = run_rows(sup, ROWS)
    assert results["row3"]["engine"] == 1
    assert counts == {"rows_rerun": 1, "engine_restarts": 1}


def test_the_stall_bound_follows_max_tokens_and_the_slowest_row():
    sup, _ = supervisor([lambda: StandInEngine(0)], max_tokens=4000)
    assert sup.stall_bound() == 6000  # nothing measured: 2 tok/s a sequence, 3 times over
    sup.slowest_tok_per_s = 100
    assert sup.stall_bound() == 300  # 120 s at the slowest row's pace, 3 times over, but at least 5 minutes
    sup.stall_timeout_s = 42
    assert sup.stall_bound() == 42
