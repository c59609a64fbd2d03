"""Raw-socket helper shared by the hostile-input and wedge tests."""

from __future__ import annotations

import asyncio
import time


async def send_until_closed(port: int, data: bytes, *, timeout: float) -> float:
    """Connect, write ``data``, read until the broker hangs up; return seconds taken.

    Raises ``TimeoutError`` if the broker keeps the connection open longer than
    ``timeout`` — the failure both callers are testing for.
    """
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            writer.write(data)
            await writer.drain()
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass  # until the broker closes it
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass
    return time.monotonic() - start
