"""pooled_proxy/fastio.py on real sockets: the same results and errors as trio's streams."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.lowlevel
import trio.testing

from pooled_proxy import fastio


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_a_large_write_waits_for_the_reader_and_arrives_whole() -> None:
    left, right = await _pair()
    payload = bytes(range(256)) * 16384  # 4 MiB: far more than the socket buffers hold
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(payload):
            chunk = await fastio.receive_some(right, 65536)
            assert chunk
            received.extend(chunk)

    with trio.fail_after(10):
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await fastio.send_all(left, payload)
    assert received == payload


async def test_end_of_stream_is_empty_bytes() -> None:
    left, right = await _pair()
    with trio.fail_after(5):
        async with right:
            await fastio.send_all(left, b"last words")
            await left.aclose()
            assert await fastio.receive_some(right, 100) == b"last words"
            assert await fastio.receive_some(right, 100) == b""


async def test_a_closed_stream_raises_closed_resource_error() -> None:
    left, right = await _pair()
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await fastio.send_all(left, b"x")
    with pytest.raises(trio.ClosedResourceError):
        await fastio.receive_some(left, 100)
    await right.aclose()


async def test_closing_the_socket_wakes_a_blocked_reader() -> None:
    left, right = await _pair()
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            await fastio.receive_some(right, 100)
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            right.socket.close()
    assert len(outcome) == 1
    await left.aclose()


async def test_a_reset_peer_is_an_os_error() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    server_sock, _ = await listener.accept()
    # SO_LINGER 0: close() sends RST instead of FIN.
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server_sock.close()
    listener.close()
    with trio.fail_after(5):
        with pytest.raises(OSError):
            await fastio.receive_some(client, 100)
    await client.aclose()


async def test_a_cancelled_read_consumes_nothing() -> None:
    left, right = await _pair()
    with trio.fail_after(5):
        async with left, right:
            with trio.move_on_after(0.05) as scope:
                await fastio.receive_some(right, 100)
            assert scope.cancelled_caught
            await fastio.send_all(left, b"after")
            assert await fastio.receive_some(right, 100) == b"after"


async def test_other_streams_use_their_own_methods() -> None:
    send, receive = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await fastio.send_all(send, b"memory")
        data = await fastio.receive_some(receive, 100)
    assert data == b"memory" and type(data) is bytes  # memory streams give bytearray


async def test_a_write_the_peer_does_not_take_times_out_at_its_timeout(autojump_clock) -> None:
    left, right = await _pair()
    async with left, right:
        start = trio.current_time()
        with trio.move_on_after(60) as guard, pytest.raises(trio.TooSlowError):
            await fastio.send_all(
                left, b"x" * 16_000_000, timeout=7.0
            )  # more than the buffers hold
        assert not guard.cancelled_caught
        assert trio.current_time() - start == pytest.approx(7.0)
        # A write the kernel takes at once never waits, whatever the timeout.
        await fastio.send_all(right, b"y", timeout=0.0)
        assert await fastio.receive_some(left, 10) == b"y"


async def test_a_read_with_nothing_to_read_times_out_at_its_deadline(autojump_clock) -> None:
    left, right = await _pair()
    async with left, right:
        start = trio.current_time()
        with trio.move_on_after(60) as guard, pytest.raises(trio.TooSlowError):
            await fastio.receive_some(left, 10, deadline=start + 3.0)
        assert not guard.cancelled_caught
        assert trio.current_time() - start == pytest.approx(3.0)
        # Bytes already there are read whatever the deadline, without waiting.
        await fastio.send_all(right, b"z")
        await trio.lowlevel.checkpoint()
        assert await fastio.receive_some(left, 10, deadline=trio.current_time() - 1) == b"z"
        # Told to wait first, a read still returns at once what is there.
        await fastio.send_all(right, b"w")
        await trio.lowlevel.checkpoint()
        assert await fastio.receive_some(left, 10, wait_first=True) == b"w"


async def test_receive_now_never_waits() -> None:
    left, right = await _pair()
    async with left, right:
        assert fastio.receive_now(left, 10) is None
        await fastio.send_all(right, b"abc")
        await trio.sleep(0.01)
        assert fastio.receive_now(left, 10) == b"abc"
        await right.aclose()
        await trio.sleep(0.01)
        assert fastio.receive_now(left, 10) == b""
