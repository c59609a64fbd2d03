"""Sans-IO broker protocol: frame bodies <-> typed commands and replies.

Every frame is a 4-byte big-endian length and a body; the body is a MessagePack array
whose first element is the command code (see docs/protocol.md). This package turns bodies
into the typed messages below and back, validating every field; it never touches a socket.
"""

from __future__ import annotations

from pigeon.protocol.messages import (
    MAGIC,
    VERSION,
    Ack,
    Cancel,
    ClientMessage,
    Declare,
    Deliver,
    Delivery,
    Error,
    Extend,
    Get,
    Goodbye,
    Hello,
    Info,
    Join,
    Nack,
    Ok,
    Ping,
    Pong,
    Put,
    PutBatch,
    QueueShutdown,
    ServerMessage,
    Shutdown,
    Stats,
    TaskDone,
    Welcome,
)
from pigeon.protocol.wire import ClientCodec, ServerCodec, encode_message

__all__ = [
    "MAGIC",
    "VERSION",
    "Ack",
    "Cancel",
    "ClientCodec",
    "ClientMessage",
    "Declare",
    "Deliver",
    "Delivery",
    "Error",
    "Extend",
    "Get",
    "Goodbye",
    "Hello",
    "Info",
    "Join",
    "Nack",
    "Ok",
    "Ping",
    "Pong",
    "Put",
    "PutBatch",
    "QueueShutdown",
    "ServerCodec",
    "ServerMessage",
    "Shutdown",
    "Stats",
    "TaskDone",
    "Welcome",
    "encode_message",
]
