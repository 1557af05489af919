"""Admission control: slots, FIFO queue, immediate 503 past the queue, per-client 429."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import ClientLimiter, ModelAdmission
from gateway.errors import ApiError


async def test_slots_then_queue_then_refusal() -> None:
    adm = ModelAdmission("m", max_in_flight=2, max_queue=1)
    await adm.acquire()
    await adm.acquire()
    assert adm.in_flight == 2
    queued = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.queued == 1 and not queued.done()
    with pytest.raises(ApiError) as err:
        await adm.acquire()
    assert err.value.status == 503
    assert err.value.retry_after == 1.0
    assert dict(err.value.headers())[b"retry-after"] == b"1"
    adm.release()  # hands the slot to the waiter
    await asyncio.wait_for(queued, 1)
    assert adm.in_flight == 2 and adm.queued == 0
    adm.release()
    adm.release()
    assert adm.in_flight == 0


async def test_cancelled_waiter_gives_back_its_place() -> None:
    adm = ModelAdmission("m", max_in_flight=1, max_queue=2)
    await adm.acquire()
    first = asyncio.create_task(adm.acquire())
    second = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert adm.queued == 1
    adm.release()
    await asyncio.wait_for(second, 1)
    assert adm.in_flight == 1
    adm.release()
    assert adm.in_flight == 0


async def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    adm = ModelAdmission("m", max_in_flight=1, max_queue=2)
    await adm.acquire()
    first = asyncio.create_task(adm.acquire())
    second = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.release()  # slot handed to `first`...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert adm.in_flight == 1
    adm.release()
    assert adm.in_flight == 0 and adm.queued == 0


async def test_resize_lets_waiters_in_and_shrinks_gracefully() -> None:
    adm = ModelAdmission("m", max_in_flight=1, max_queue=5)
    await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    adm.resize(3, 5)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert adm.in_flight == 3
    adm.resize(1, 0)
    for _ in range(3):
        adm.release()
    assert adm.in_flight == 0
    assert adm.try_acquire()
    assert not adm.try_acquire()


def test_client_limiter() -> None:
    lim = ClientLimiter(2)
    lim.acquire("a")
    lim.acquire("a")
    lim.acquire("b")
    with pytest.raises(ApiError) as err:
        lim.acquire("a")
    assert err.value.status == 429 and err.value.retry_after
    lim.release("a")
    lim.acquire("a")
    off = ClientLimiter(0)
    for _ in range(100):
        off.acquire("a")
