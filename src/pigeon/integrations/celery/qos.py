"""Unacked accounting for the pigeon transport: kombu's QoS, settled by pigeon's broker.

# Strategy:
# kombu's virtual QoS counts what a channel holds (``prefetch_count``) and, on ack or
# reject, only forgets it; the Redis transport adds its own bookkeeping of unacked
# messages and a visibility timeout to give them back (kombu/transport/redis.py). Here the
# broker keeps that state already: each message is taken unacked (``get_message``), so
# kombu's ack is pigeon's ack, a reject is a nack (requeue, or ``NAME.dead`` with reason
# ``rejected``), and what a dead worker held returns the moment its connection drops.
# A lease keeper thread extends every held delivery each third of the lease, so a task
# that runs for hours, or waits in the worker's prefetch, is never redelivered while its
# worker lives: only a worker frozen for longer than the lease loses its hold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kombu.transport import virtual

from pigeon._queue_base import Message
from pigeon.errors import BrokenResourceError, ClosedResourceError, PigeonError

__all__ = ["QoS"]

logger = logging.getLogger(__name__)


def _requeue(message: Message[bytes]) -> Callable[[], None]:
    return lambda: message.nack(True)


def _dead_letter(message: Message[bytes]) -> Callable[[], None]:
    # to NAME.dead with reason "rejected", where RabbitMQ would use a dead-letter exchange
    return lambda: message.nack(False)


class QoS(virtual.QoS):
    """Holds each delivery until kombu settles it; ``restore_unacked`` gives them back."""

    def __init__(self, channel: Any, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        self._held: dict[str, Message[bytes]] = {}
        self._lost: set[str] = set()  # held, but the broker took them back: not extended
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
        self.lease: float = channel.lease
        # called after every ack or reject: the transport wakes a drain waiting for room
        self.on_room: Callable[[], None] = lambda: None

    # --- holding --------------------------------------------------------------------------

    def hold(self, delivery_tag: str, message: Message[bytes]) -> None:
        """Keep ``message`` (taken unacked) until ``delivery_tag`` is settled."""
        with self._lock:
            self._held[delivery_tag] = message
            if self._keeper is None and not self._stop.is_set():
                self._keeper = threading.Thread(
                    target=self._keep_leases, name="pigeon-lease-keeper", daemon=True
                )
                self._keeper.start()

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _release(self, delivery_tag: str) -> Message[bytes] | None:
        with self._lock:
            self._lost.discard(delivery_tag)
            return self._held.pop(delivery_tag, None)

    # --- settling (kombu's names) -------------------------------------------------------

    def ack(self, delivery_tag: str) -> None:
        try:
            message = self._release(delivery_tag)
            if message is not None:
                self.settle(message, "ack", message.ack)
        finally:
            super().ack(delivery_tag)
            self.on_room()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            message = self._release(delivery_tag)
            if message is not None:
                if requeue:
                    self.settle(message, "requeue", _requeue(message))
                else:
                    self.settle(message, "reject", _dead_letter(message))
        finally:
            super().ack(delivery_tag)  # kombu forgets it either way
            self.on_room()

    @staticmethod
    def settle(message: Message[bytes], what: str, settle: Callable[[], None]) -> bool:
        """``settle()`` ``message``; False (and a warning) if the broker refused it."""
        # A settle the broker refuses concerns a delivery it already took back (its lease
        # ran out, its connection dropped): that message was or will be delivered again,
        # which is at-least-once, not an error of the task. Say so, and carry on.
        try:
            settle()
        except PigeonError as exc:
            logger.warning(
                "pigeon: could not %s a task message (delivery %s of it): %s",
                what,
                message.delivery_count,
                exc,
            )
            return False
        return True

    def give_back(self, delivery_tag: str) -> None:
        """Requeue a delivery taken but never handed to kombu (the worker is stopping)."""
        message = self._release(delivery_tag)
        if message is not None:
            self.settle(message, "give back", _requeue(message))
        self.on_room()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Give every held delivery back to its queue at once (a channel closing)."""
        self._flush()
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
            self._lost.clear()
        for n, message in enumerate(held):
            try:
                message.nack(True)
            except (BrokenResourceError, ClosedResourceError) as exc:
                # The broker is out of reach (or the handle closed): it gives them back
                # itself when their connection drops - now, or already. Trying the others
                # would wait out a reconnect each: a warm shutdown in a broker outage
                # would outlive its grace period.
                logger.warning(
                    "pigeon: could not give back %d held task message(s): %s; the broker "
                    "gives them back when this worker's connection drops",
                    len(held) - n,
                    exc,
                )
                break
            except PigeonError as exc:
                logger.warning("pigeon: could not give back a task message: %s", exc)
        self._delivered.clear()
        return []

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the broker redelivers by itself (kombu calls this for Redis)."""

    # --- the lease keeper -----------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        keeper = self._keeper
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout=5)

    def _keep_leases(self) -> None:
        period = self.lease / 3
        while not self._stop.wait(period):
            with self._lock:
                held = [(t, m) for t, m in self._held.items() if t not in self._lost]
            for tag, message in held:
                try:
                    message.extend(self.lease)
                except PigeonError as exc:
                    with self._lock:
                        still_held = tag in self._held
                        if still_held:  # else: acked meanwhile, nothing to extend
                            self._lost.add(tag)
                    if still_held:
                        logger.warning(
                            "pigeon: could not extend the lease of a held task message: %s; "
                            "if the broker took it back it will be delivered again",
                            exc,
                        )
