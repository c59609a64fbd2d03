"""A pigeon:// settle (ack, nack, extend) whose connection broke after it was sent: the
client sends it again on a new connection, and the broker's ``unknown`` then says the
first send may have settled the delivery (``Indeterminate``), never that it will come
back. A first send answered ``unknown`` still means the delivery was taken back."""

from __future__ import annotations

from typing import Any

import pytest

import pigeon
from pigeon.backends.pigeon.ops import Call, Lost, Ops, Spec, advance, settle_message
from pigeon.errors import BrokenResourceError, Indeterminate, LocalProtocolError
from pigeon.protocol import Ok
from pigeon.testing.broker import BrokerThread
from tests._proxy import CuttingProxy, settle_ok
from tests.backends.test_broker_client import FACES, Face

# --- the operation, driven by hand -----------------------------------------------------


def _settle(what: str, *args: Any, lost: Lost | None, unknown: bool) -> None:
    """Run ``Ops.settle`` for delivery 7: its first send meets ``lost`` (if any), the
    next one is answered with 7 ``unknown`` (or settled)."""
    ops = Ops(Spec("pigeon://127.0.0.1:1/settle-ops"))
    op = ops.settle(settle_message("settle-ops", what, 7, *args), what)
    effect, _ = advance(op, None, None)
    assert isinstance(effect, Call)
    if lost is not None:
        effect, _ = advance(op, None, lost)  # a new connection at once: the same request
        assert isinstance(effect, Call)
    reply = Ok(1, {"settled": 0, "unknown": [7]} if unknown else {"settled": 1, "unknown": []})
    effect, _ = advance(op, reply, None)
    assert effect is None


def _broke(sent: bool) -> Lost:
    return Lost(BrokenResourceError("connection reset"), True, 5.0, sent=sent)


ENDING = [("ack", ()), ("nack", (False, 0.0, "poison"))]


@pytest.mark.parametrize(("what", "args"), ENDING, ids=["ack", "reject"])
def test_an_ending_settle_resent_after_it_was_written_and_answered_unknown_is_indeterminate(
    what: str, args: tuple[Any, ...]
) -> None:
    done = "settled it" if what == "ack" else "moved it to the dead letters"
    with pytest.raises(Indeterminate, match=f"delivery 7 .*the first {what} {done}"):
        _settle(what, *args, lost=_broke(sent=True), unknown=True)


@pytest.mark.parametrize(("what", "args"), ENDING, ids=["ack", "reject"])
def test_an_ending_settle_answered_unknown_at_its_first_send_was_taken_back(
    what: str, args: tuple[Any, ...]
) -> None:
    """Sent once, or sent again after a connection that broke before the request was
    written: the broker never saw another, so ``unknown`` means it was taken back."""
    for lost in (None, _broke(sent=False)):
        with pytest.raises(LocalProtocolError, match="so it was or will be redelivered"):
            _settle(what, *args, lost=lost, unknown=True)


@pytest.mark.parametrize(
    ("what", "args"), [("nack", (True, 0.0, "")), ("extend", (30.0,))], ids=["requeue", "extend"]
)
def test_a_resent_settle_that_leaves_the_message_to_come_back_still_says_so(
    what: str, args: tuple[Any, ...]
) -> None:
    """A requeueing nack or an extend does not end the delivery: whatever the first send
    did, a delivery the broker no longer holds comes back."""
    with pytest.raises(LocalProtocolError, match="so it was or will be redelivered"):
        _settle(what, *args, lost=_broke(sent=True), unknown=True)


def test_a_resent_settle_the_broker_applies_is_fine() -> None:
    """The first send never arrived: the repeat settles the delivery, nothing raised."""
    _settle("ack", lost=_broke(sent=True), unknown=False)


# --- over the wire: the broker's reply to the settle is lost -----------------------------


def _take_and_settle(what: str) -> Any:
    def run(q: Any) -> Any:
        def settle(m: Any) -> Any:
            return m.ack() if what == "ack" else m.nack(requeue=False, reason="poison")

        if isinstance(q, pigeon.AsyncQueue):

            async def main() -> None:
                await settle(await q.get_message(timeout=5))

            return main()
        return settle(q.get_message(timeout=5))

    return run


@pytest.mark.parametrize("face", FACES, ids=repr)
@pytest.mark.parametrize("what", ["ack", "reject"])
def test_a_settle_whose_reply_was_lost_is_indeterminate_and_the_message_stays_settled(
    face: Face, what: str
) -> None:
    """The broker applied the ACK (or the NACK to the dead letters); the connection broke
    before its OK came. The client sends it again on a new connection and the broker,
    which holds the delivery no more, answers ``unknown``: the call raises
    ``Indeterminate``, and the message indeed never comes back."""
    queue = f"lost-settle-{what}-{face.name}"
    with BrokerThread() as b:
        with pigeon.Queue(b.url(queue)) as direct:
            direct.put("only")
        proxy = CuttingProxy(b.port, cut=settle_ok)
        try:
            with pytest.raises(Indeterminate, match="the connection broke after the"):
                face.run(f"pigeon://127.0.0.1:{proxy.port}/{queue}", _take_and_settle(what))
        finally:
            proxy.close()
        assert proxy.cuts == 1
        with pigeon.Queue(b.url(queue)) as q, pigeon.Queue(b.url(f"{queue}.dead")) as dead:
            with pytest.raises(pigeon.Empty):
                q.get(timeout=0.5)  # the cut connection held nothing: no lease to wait for
            info = q._info()
            assert (info["depth"], info["in_flight"]) == (0, 0)
            assert (info["acked_total"], dead.qsize()) == ((1, 0) if what == "ack" else (0, 1))


def test_the_message_context_manager_lets_an_indeterminate_ack_through() -> None:
    """``with q.get_message() as m:``: the block succeeded and the ack's outcome is
    unknown; the caller is told (it is not nacked: there is nothing left to give back)."""
    with BrokerThread() as b:
        with pigeon.Queue(b.url("lost-settle-with")) as direct:
            direct.put("only")
        proxy = CuttingProxy(b.port, cut=settle_ok)
        try:
            url = f"pigeon://127.0.0.1:{proxy.port}/lost-settle-with"
            with (
                pigeon.Queue(url) as q,
                pytest.raises(Indeterminate),
                q.get_message(timeout=5) as m,
            ):
                assert m.body == "only"
        finally:
            proxy.close()
        with pigeon.Queue(b.url("lost-settle-with")) as q:
            assert q._info()["acked_total"] == 1


def test_indeterminate_is_a_broken_resource_error() -> None:
    """Code that catches a broken connection around a settle catches it too."""
    assert issubclass(pigeon.Indeterminate, pigeon.BrokenResourceError)
    assert pigeon.Indeterminate is Indeterminate
