"""Group commit (shared.batching): requests that arrive while a batch runs go together in the next
one, each caller gets its own result, a failed batch fails every caller in it, and a failed part
of a batch only its own callers."""
from __future__ import annotations

import asyncio
import threading

import pytest

from shared.batching import Batcher


async def test_requests_arriving_while_a_batch_runs_go_together_in_the_next():
    release = threading.Event()
    batches: list[list[int]] = []

    def run(requests):
        batches.append(list(requests))
        if len(batches) == 1:
            release.wait(5)  # the first batch is still running when the others arrive
        return [request * 10 for request in requests]

    batcher: Batcher[int, int] = Batcher(run)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.05)
    others = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == 10
    assert [await task for task in others] == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs():
    def run(requests):
        if 0 in requests:
            raise RuntimeError("the transaction failed")
        return list(requests)

    batcher: Batcher[int, int] = Batcher(run)
    failing = await asyncio.gather(batcher.submit(0), batcher.submit(5), return_exceptions=True)
    assert [type(result) for result in failing] == [RuntimeError, RuntimeError]
    assert await batcher.submit(7) == 7


async def test_a_failed_part_of_a_batch_fails_only_its_own_callers():
    def run(requests):
        return [ValueError(f"no {r}") if r < 0 else r for r in requests]

    batcher: Batcher[int, int] = Batcher(run)
    results = await asyncio.gather(*(batcher.submit(n) for n in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "no -2"


async def test_a_batch_holds_at_most_max_batch_requests():
    sizes: list[int] = []

    def run(requests):
        sizes.append(len(requests))
        return list(requests)

    batcher: Batcher[int, int] = Batcher(run, max_batch=3)
    assert await asyncio.gather(*(batcher.submit(n) for n in range(7))) == list(range(7))
    assert max(sizes) <= 3 and sum(sizes) == 7


@pytest.mark.parametrize("count", [1, 50])
async def test_every_caller_gets_its_own_result(count):
    batcher: Batcher[str, str] = Batcher(lambda requests: [r.upper() for r in requests])
    words = [f"w{n}" for n in range(count)]
    assert await asyncio.gather(*(batcher.submit(w) for w in words)) == [w.upper() for w in words]
