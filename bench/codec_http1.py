"""The HTTP/1.1 codec alone, in process: microseconds per proxied request.

    PYTHONPATH=. .venv/bin/python bench/codec_http1.py [--requests 20000] [--rounds 5]

One request as the proxy handles it, with no sockets or trio: the front end's
ServerConnection reads a client's request, the upstream's ClientConnection writes it and
reads the upstream's response, and the ServerConnection writes that response; both
connections are kept for the next request. Rows: GET (no body) and POST (100-byte body,
a 2-byte response). With ``PYTHONPATH=.`` it imports the codec of the working directory's
tree (not the virtualenv's), so that a tree with the codec compiled in place (mypyc) can be
measured against another.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pooled_proxy.protocol import http1

GET = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
POST = (
    b"POST /echo HTTP/1.1\r\nHost: example.com\r\nUser-Agent: wrk\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
)
RESPONSE_GET = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 612\r\nConnection: keep-alive\r\n\r\n" + b"y" * 612
)
RESPONSE_POST = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Length: 2\r\n\r\nok"
)


def run(request: bytes, response: bytes, count: int) -> float:
    """Microseconds per request over ``count`` requests on one pair of connections."""
    server = http1.ServerConnection(max_head_bytes=16384, max_header_count=100)
    client = http1.ClientConnection(max_head_bytes=16384)
    start = time.perf_counter()
    for _ in range(count):
        server.receive_data(request)
        event = server.next_event()
        assert isinstance(event, http1.Request), event
        body = event.whole_body or b""
        client.send_request(
            event.method,
            event.target,
            [(b"host", event.authority or b""), *event.headers],
            body=body,
            end=True,
        )
        client.receive_data(response)
        head = client.next_event()
        assert isinstance(head, http1.ResponseHead), head
        content, ended = client.buffered_body()
        assert ended, content
        server.send_response(head.status_code, head.headers, content, end=True)
        assert server.reusable() and client.reusable()
        server.start_next_cycle()
        client.start_next_cycle()
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    compiled = http1.connection.__file__.endswith(".so")
    print(f"codec: {'compiled' if compiled else 'pure Python'} ({http1.connection.__file__})")
    for name, request, response in (("GET", GET, RESPONSE_GET), ("POST", POST, RESPONSE_POST)):
        run(request, response, 1000)  # warm-up
        times = [run(request, response, args.requests) for _ in range(args.rounds)]
        print(f"{name:5} {statistics.median(times):6.2f} us/request (min {min(times):.2f})")


if __name__ == "__main__":
    main()
