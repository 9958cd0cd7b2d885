"""The asyncio batcher the in-process stage calls use."""

import asyncio

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
