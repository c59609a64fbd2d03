"""The protocol's messages. Each is a MessagePack array: ``[code, field, field, ...]``.

Codes: 0x01-0x0F handshake, 0x10-0x1F publishing, 0x20-0x2F consuming, 0x30-0x3F
settling, 0x40-0x4F queue management, 0x50 stats, 0x60-0x6F liveness, 0x70 goodbye,
0x80-0x9F server replies and notices. Unknown codes are a protocol error; new fields are
only ever appended, with defaults, so older peers keep decoding (docs/protocol.md).
"""

from __future__ import annotations

from typing import Any

import msgspec

MAGIC = "PGN"
VERSION = 1


FEATURES = ["options"]  # what this version adds to version 1, announced in WELCOME


class _Msg(msgspec.Struct, array_like=True, tag_field="type"):
    pass


# --- handshake ---------------------------------------------------------------------------


class Hello(_Msg, tag=0x01):
    magic: str
    version: int
    client: str
    token: str | None = None


class Welcome(_Msg, tag=0x02):
    version: int
    server: str
    heartbeat: float  # seconds between the server's heartbeats on a busy connection
    max_frame_size: int
    features: list[str] = []  # (added) e.g. "options": PUT's options field is honoured


# --- client -> server -------------------------------------------------------------------


class PutOptions(msgspec.Struct, omit_defaults=True):
    """A put's per-message options (a MessagePack map; absent keys take these defaults).
    An older broker ignores it (a trailing field), so a client sends it only to a broker
    whose WELCOME lists the ``options`` feature."""

    delay: float = 0.0  # seconds before it can be taken
    ttl: float = 0.0  # seconds it may wait to be taken (after its delay); 0: forever
    dedup_id: str = ""  # a repeat within the queue's dedup window is confirmed, not stored
    priority: int = 0  # 0-9, higher first
    headers: dict[str, str] = {}


class Put(_Msg, tag=0x10):
    req: int
    queue: str
    payload: bytes
    wait: float | None = 0.0  # seconds to wait for room in a full queue; None: forever
    options: PutOptions | None = None  # (added)


class PlainPut(_Msg, tag=0x10):
    """A PUT without options, encoded byte for byte as before the options field was
    appended (sent by clients; decoded as ``Put``)."""

    req: int
    queue: str
    payload: bytes
    wait: float | None = 0.0


class PutBatch(_Msg, tag=0x11):
    req: int
    queue: str
    payloads: list[bytes]
    wait: float | None = 0.0
    options: PutOptions | None = None  # (added) applied to each message
    dedup_ids: list[str] | None = None  # (added) one per payload


class RawPut(_Msg, tag=0x10):
    """A PUT as the broker reads it when ``Put`` does not decode: ``options`` kept as its
    MessagePack bytes, read an entry at a time (``option_map``), so an entry of the wrong
    type is a bad request, not a malformed frame. Its fields are ``Put``'s."""

    req: int
    queue: str
    payload: bytes
    wait: float | None = 0.0
    options: msgspec.Raw = msgspec.Raw()


class RawPutBatch(_Msg, tag=0x11):
    """``PutBatch`` as ``RawPut`` is ``Put``."""

    req: int
    queue: str
    payloads: list[bytes]
    wait: float | None = 0.0
    options: msgspec.Raw = msgspec.Raw()
    dedup_ids: list[str] | None = None


class Get(_Msg, tag=0x20):
    req: int
    queue: str
    max_items: int
    wait: float | None  # seconds to wait for a first item; None: until one comes
    manual_ack: bool = False  # False: the broker forgets the items as it sends them
    lease: float | None = None  # seconds before an unacked item is redelivered
    message_ids: bool = False  # (added) each DELIVER entry carries its message's id


class Cancel(_Msg, tag=0x21):
    """Withdraw a parked GET, PUT or JOIN (the client stopped waiting for it)."""

    req: int


class Ack(_Msg, tag=0x30):
    req: int
    queue: str
    ids: list[int]
    quiet: bool = False  # true: no OK wanted (a client acking what it received)


class Nack(_Msg, tag=0x31):
    req: int
    queue: str
    ids: list[int]
    requeue: bool = True
    delay: float = 0.0
    # Why, for a message that goes to the dead-letter queue (requeue false): kept with
    # the dead letter. "" means "rejected".
    reason: str = ""
    quiet: bool = False  # true: no OK wanted


class Extend(_Msg, tag=0x32):
    req: int
    queue: str
    ids: list[int]
    seconds: float


class Declare(_Msg, tag=0x40):
    req: int
    queue: str
    maxsize: int | None = None
    lease: float | None = None
    max_deliveries: int | None = None
    dedup_window: float | None = None  # (added) seconds a dedup id is remembered


class Info(_Msg, tag=0x41):
    req: int
    queue: str


class TaskDone(_Msg, tag=0x42):
    req: int
    queue: str
    count: int = 1


class Join(_Msg, tag=0x43):
    req: int
    queue: str
    wait: float | None = None


class Shutdown(_Msg, tag=0x44):
    req: int
    queue: str
    immediate: bool = False


class Purge(_Msg, tag=0x45):
    """Drop every message waiting in the queue (not those in flight)."""

    req: int
    queue: str


class Delete(_Msg, tag=0x46):
    """Drop the queue: its messages (in flight too), its settings, its waiters."""

    req: int
    queue: str


class Peek(_Msg, tag=0x47):
    """Show up to ``max_items`` waiting messages without delivering them."""

    req: int
    queue: str
    max_items: int = 10


class Move(_Msg, tag=0x48):
    """Move up to ``limit`` waiting messages (all: nil) to the tail of ``to``, counted
    afresh there: replays dead letters."""

    req: int
    queue: str
    to: str
    limit: int | None = None


class Stats(_Msg, tag=0x50):
    req: int


class Ping(_Msg, tag=0x60):
    nonce: int


class Pong(_Msg, tag=0x61):
    nonce: int


class Goodbye(_Msg, tag=0x70):
    reason: str = ""


# --- server -> client -------------------------------------------------------------------


class PlainDelivery(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A delivery without headers, encoded as before headers were appended (sent by the
    broker; decoded as ``Delivery``). Made by the hundred per batch, so untracked by the
    garbage collector: numbers, bytes and a dict of strings make no reference cycle."""

    id: int  # 0 when the item was acked on delivery (manual_ack false)
    delivery_count: int
    payload: bytes


class HeadedDelivery(PlainDelivery, frozen=True, gc=False):
    """A delivery with headers, without its message's id (sent by the broker; decoded as
    ``Delivery``)."""

    headers: dict[str, str] | None = None  # (added) absent when there are none


class Delivery(HeadedDelivery, frozen=True, gc=False):
    """A DELIVER entry as clients read it: absent elements take their defaults. The
    broker sends the message id only to a GET that asked (``message_ids``), with nil
    headers when there are none."""

    # (added) the message's number in the broker: the same on every delivery of one
    # message, unlike ``id``; 0 when not sent
    message_id: int = 0


class Ok(_Msg, tag=0x80):
    req: int
    value: Any = None


class Confirmed(Ok, tag=0x80):
    """The OK that confirms a PUT or PUT_BATCH: on the wire exactly an OK (value: the
    count); in the broker, the reply the server holds for the store's commit and turns into
    ``unavailable`` when the store cannot commit (the broker says so; no guessing from the
    shape of a reply)."""


class Joined(Ok, tag=0x80):
    """The OK that answers a JOIN (no task of the queue is left): on the wire exactly an
    OK (value 0); in the broker, held like a put's confirmation while a change is not yet
    committed - the TASK_DONE that emptied the count may be among them, and "all done"
    must not go out before it is durable - and turned into ``unavailable`` when the store
    cannot commit."""


class Deliver(_Msg, tag=0x81):
    req: int
    messages: list[Delivery]  # the broker sends PlainDelivery for those without headers


class Error(_Msg, tag=0x8F):
    req: int  # 0: about the connection, not a request
    code: str
    message: str


class QueueShutdown(_Msg, tag=0x90):
    queue: str
    immediate: bool = False


ClientMessage = (
    Hello
    | Put
    | PutBatch
    | Get
    | Cancel
    | Ack
    | Nack
    | Extend
    | Declare
    | Info
    | TaskDone
    | Join
    | Shutdown
    | Purge
    | Delete
    | Peek
    | Move
    | Stats
    | Ping
    | Pong
    | Goodbye
)
ServerMessage = Welcome | Ok | Deliver | Error | QueueShutdown | Ping | Pong | Goodbye
