"""accman.deadline's `within`: a cancel that meets the awaited call's
completion ends the task cancelled (asyncio.wait_for before 3.12 returns
the result instead); the bound raises asyncio.TimeoutError; a cancel
from elsewhere leaves as a cancel; the block runs in the calling task."""

from __future__ import annotations

import asyncio

import pytest

from accman.deadline import within


@pytest.fixture
def form():
    return within


def test_a_cancel_in_the_step_its_call_completes_is_not_lost(form):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        went_on = []

        async def waiter():
            async with form(30):
                got = await fut
            went_on.append(got)             # a call sent, in the client's dial
        task = loop.create_task(waiter())
        await asyncio.sleep(0)              # it waits on fut

        def both():                         # one callback: one loop step
            fut.set_result("connected")
            task.cancel()
        loop.call_soon(both)
        await asyncio.wait({task})
        return task.cancelled(), went_on
    assert asyncio.run(main()) == (True, [])


def test_the_bound_raises_asyncio_timeout_error(form):
    async def main():
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            async with form(0.01):
                await never
        return asyncio.current_task().cancelled()
    assert asyncio.run(main()) is False


def test_a_cancel_from_elsewhere_leaves_as_a_cancel(form):
    async def main():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        async def waiter():
            async with form(30):
                started.set()
                await loop.create_future()
        task = loop.create_task(waiter())
        await started.wait()
        task.cancel()
        await asyncio.wait({task})
        return task.cancelled()
    assert asyncio.run(main()) is True


def test_no_bound_and_the_block_runs_in_the_calling_task(form):
    async def main():
        me = asyncio.current_task()

        async def which():
            await asyncio.sleep(0)
            return asyncio.current_task()
        async with form(None):
            first = await which()
        async with form(30):
            second = await which()
        return first is me and second is me
    assert asyncio.run(main()) is True
