"""The broker's settings and what follows from them."""

from __future__ import annotations

from pigeon.server.config import ServerConfig


def test_max_reply_bytes_is_sane_for_small_frames() -> None:
    # It was min(max_frame_size, max_pending_output) - 64 KiB, at least 1: with a frame
    # size of 1024 no message of 2 bytes could be delivered.
    assert ServerConfig(max_frame_size=1024).max_reply_bytes == 1024
    assert ServerConfig().max_reply_bytes == 16 * 2**20
    small_output = ServerConfig(max_pending_output=100_000)
    assert small_output.max_reply_bytes == 50_000  # half of it stays free for the rest
    assert ServerConfig(max_pending_output=0).max_reply_bytes == 16 * 2**20
