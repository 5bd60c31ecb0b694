"""Values ready now or later (inference/promises.py): what an item waiting on one or two embeddings gets."""

from __future__ import annotations

import asyncio

import pytest

from clipserve_server.utils.errors import ErrorKind, ItemError
from clipserve_server.inference.promises import Later, awaited, both, from_future, then


def test_ready_values_are_combined_at_once():
    assert then(2, lambda x: x * 10) == 20
    assert both(2, 3, lambda x, y: x * y) == 6


def test_a_pending_input_gives_a_later_value_that_settles_when_it_does():
    image: Later[int] = Later()
    score = both(2, image, lambda text, img: text * img)
    assert isinstance(score, Later) and not score.settled
    image.set_result(5)
    assert score.settled and score.result() == 10


def test_callbacks_run_when_the_value_lands_in_the_order_they_came():
    """No event-loop round trip per waiter: a thousand waiters are a thousand plain calls."""
    image: Later[int] = Later()
    seen: list[int] = []
    for i in range(1000):
        then(image, lambda value, i=i: value + i).add_callback(lambda later: seen.append(later.result()))
    image.set_result(1)
    assert seen == [1 + i for i in range(1000)]


def test_both_inputs_pending_settle_in_any_order():
    text, image = Later(), Later()
    score = both(text, image, lambda t, i: (t, i))
    image.set_result("i")
    assert not score.settled
    text.set_result("t")
    assert score.result() == ("t", "i")


def test_a_failed_input_fails_the_item_and_withdraws_from_the_other():
    withdrawn: list[str] = []
    text, image = Later(on_cancel=lambda: withdrawn.append("text")), Later()
    score = both(text, image, lambda t, i: 0.0)
    image.set_error(ItemError(ErrorKind.NOT_FOUND, "404"))
    with pytest.raises(ItemError, match="404"):
        score.result()
    assert withdrawn == ["text"]  # the text's cache sees this caller go: no one else wanted it


def test_an_error_in_the_combination_is_the_items_error():
    image: Later[int] = Later()
    score = then(image, lambda i: 1 / i)
    image.set_result(0)
    with pytest.raises(ZeroDivisionError):
        score.result()


def test_cancelling_the_item_withdraws_from_what_it_waits_on_and_drops_its_callbacks():
    withdrawn: list[bool] = []
    image: Later[int] = Later(on_cancel=lambda: withdrawn.append(True))
    score = then(image, lambda i: i)
    called: list[Later] = []
    score.add_callback(called.append)
    score.cancel()
    assert withdrawn == [True] and image.settled
    image.set_result(3)  # too late: nobody listens
    assert called == []


def test_a_callback_that_fails_does_not_keep_the_value_from_the_others():
    image: Later[int] = Later()
    seen: list[int] = []
    image.add_callback(lambda later: 1 / 0)
    image.add_callback(lambda later: seen.append(later.result()))
    image.set_result(7)
    assert seen == [7]


def test_a_coroutine_awaits_a_later_value_and_its_cancellation_withdraws():
    async def main():
        ready: Later[int] = Later()
        waiter = asyncio.ensure_future(awaited(ready))
        await asyncio.sleep(0)
        ready.set_result(4)
        got = await waiter
        withdrawn: list[bool] = []
        never: Later[int] = Later(on_cancel=lambda: withdrawn.append(True))
        abandoned = asyncio.ensure_future(awaited(never))
        await asyncio.sleep(0)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        return got, withdrawn, await awaited(5)

    assert asyncio.run(main()) == (4, [True], 5)


def test_a_task_becomes_a_later_value_and_its_cancellation_is_retryable():
    async def main():
        async def hashed() -> str:
            return "sha256:abc"

        done = from_future(asyncio.ensure_future(hashed()))
        await asyncio.sleep(0.01)
        stopped = from_future(asyncio.ensure_future(asyncio.sleep(10)))
        await asyncio.sleep(0)
        stopped_task = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()][0]
        stopped_task.cancel()  # someone else cancels the work: the item is answered, retryably
        await asyncio.sleep(0.01)
        with pytest.raises(ItemError) as failure:
            stopped.result()
        return done.result(), failure.value.kind

    assert asyncio.run(main()) == ("sha256:abc", ErrorKind.UNAVAILABLE)
