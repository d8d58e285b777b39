"""A stale pooled connection that fails while an upload waits for the client's body.

The retry on a fresh connection is only safe while the client's body has not been asked
for: a read cancelled midway ends the body's iterator, and a retry would send an empty
body under the client's Content-Length.
"""

from __future__ import annotations

import logging

import trio

from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.one_shot_upstream import OneShotUpstream


async def test_reset_while_the_upload_waits_for_the_body_is_a_502_not_a_broken_retry(
    nursery, caplog
):
    upstream = OneShotUpstream()  # resets a connection when its second request arrives
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/first")).status == 200
            # The POST's head goes up on the pooled connection; its body is not sent yet,
            # so the proxy is waiting for it when the upstream resets that connection.
            await client.stream.send_all(
                b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += await client.stream.receive_some(65536)
    assert reply.startswith(b"HTTP/1.1 502 "), reply
    assert upstream.connections == 1  # no retry with a body that can no longer be read
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
