"""The asyncio batcher the in-process stage calls use."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from models.inspection import Batcher


def test_calls_in_one_turn_are_one_batch_per_key_split_at_the_maximum():
    batcher = Batcher(max_batch_size=3)
    seen = []

    def double(items):
        seen.append(list(items))
        return [2 * i for i in items]

    def negate(items):
        seen.append(list(items))
        return [-i for i in items]

    async def main():
        calls = [batcher.submit("double", double, i) for i in range(5)]
        calls += [batcher.submit("negate", negate, i) for i in range(2)]
        return await asyncio.gather(*calls)

    assert asyncio.run(main()) == [0, 2, 4, 6, 8, 0, -1]
    assert seen == [[0, 1, 2], [3, 4], [0, 1]]
    assert batcher.batch_sizes == [3, 2, 2]


def test_a_failing_batch_fails_each_of_its_calls_and_no_other():
    batcher = Batcher(max_batch_size=2)

    def fails_on_three(items):
        if 3 in items:
            raise RuntimeError("bad item")
        return items

    async def main():
        return await asyncio.gather(
            *(batcher.submit("k", fails_on_three, i) for i in range(4)), return_exceptions=True
        )

    first, second, third, fourth = asyncio.run(main())
    assert (first, second) == (0, 1)
    assert isinstance(third, RuntimeError) and isinstance(fourth, RuntimeError)
    with pytest.raises(ValueError):
        Batcher(max_batch_size=0)


def test_a_compute_that_loses_answers_is_an_error():
    batcher = Batcher()

    async def main():
        return await batcher.submit("k", lambda items: [], 1)

    with pytest.raises(RuntimeError, match="1 items gave 0 answers"):
        asyncio.run(main())


def test_off_the_loop_calls_that_arrive_while_a_batch_computes_form_the_next_batch():
    release = threading.Event()
    seen = []

    def slow_square(items):
        seen.append(list(items))
        if len(seen) == 1:
            release.wait(5)  # the first batch computes while more calls arrive
        return [i * i for i in items]

    async def main():
        batcher = Batcher(max_batch_size=8, executor=ThreadPoolExecutor(1))
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit("k", slow_square, 1))
        await asyncio.sleep(0.05)  # the first batch (one item, no wait) is computing
        later = [asyncio.ensure_future(batcher.submit("k", slow_square, i)) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        # The loop stayed free while the first batch computed (it waits up to 5 s).
        free_loop_s = time.monotonic() - started
        release.set()
        answers = await asyncio.gather(first, *later)
        failed = batcher.submit("k", lambda items: 1 / 0, 5)
        with pytest.raises(ZeroDivisionError):
            await failed
        return answers, free_loop_s, batcher.batch_sizes

    answers, free_loop_s, sizes = asyncio.run(main())
    assert answers == [1, 4, 9, 16]
    assert seen == [[1], [2, 3, 4]]
    assert sizes == [1, 3, 1] and free_loop_s < 1.0


def test_synchronous_callers_inside_a_running_loop_still_get_their_answer():
    from models.inspection.local import run_to_completion

    async def answer() -> tuple[int, str]:
        await asyncio.sleep(0)
        return 42, threading.current_thread().name

    assert run_to_completion(answer()) == (42, threading.current_thread().name)

    async def notebook_cell() -> tuple[int, str]:  # a loop already runs in this thread
        return run_to_completion(answer())

    value, thread = asyncio.run(notebook_cell())
    assert value == 42 and thread != threading.current_thread().name
