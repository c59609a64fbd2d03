"""Closing a listening asyncio server without losing a connection it has just accepted.

# Strategy:
# asyncio's own event loop accepts a connection in one turn of the loop and builds its
# transport in a task that runs in the next (``_accept_connection2``). A ``Server.close()``
# between the two - a broker stopping while a client connects - makes that transport fail
# half-built (``Server._attach`` asserts the server is still open; CPython gh-109564,
# open up to 3.13): the error is swallowed, the protocol never hears ``connection_made``,
# and the accepted socket is left open for the garbage collector, which reports it, in
# whatever runs then, as ``ResourceWarning: unclosed transport <_SelectorSocketTransport>``.
# So the listening sockets are first taken out of the selector (nothing new is accepted),
# the connections accepted already get the one turn their transports need to be built on
# the open server, and only then is the server closed. The broker's connections then
# close as any other that arrives while it stops. uvloop builds a transport in the same
# callback that accepts it: there is no such turn to wait for.
"""

from __future__ import annotations

import asyncio

__all__ = ["close_listener"]


async def close_listener(server: asyncio.Server) -> None:
    """Stop accepting on ``server`` and close it, once the connections it has accepted
    have their transports."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.SelectorEventLoop) and server.is_serving():
        for sock in server.sockets:
            loop.remove_reader(sock)
        await asyncio.sleep(0)  # the accepted connections' transports are built now
    server.close()
