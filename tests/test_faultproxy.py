"""The fault proxy itself (tests/faultproxy.py): a clean round trip, and each cut delivering
exactly the bytes it promises, against small servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.faultproxy import Cut, FaultProxy

TIMEOUT_S = 10.0
PAYLOAD = os.urandom(300_000)  # several of the proxy's 64 KiB reads


@contextmanager
def serve(handler: Callable[[socket.socket], None]) -> Iterator[tuple[str, int]]:
    """A server on 127.0.0.1 running ``handler`` on each connection in its own thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(s: socket.socket) -> None:
        with s:
            s.settimeout(TIMEOUT_S)
            handler(s)

    def accept() -> None:
        while not stop.is_set():
            try:
                s, _ = listener.accept()
            except TimeoutError:
                continue
            threads.append(threading.Thread(target=run, args=(s,), daemon=True))
            threads[-1].start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield ("127.0.0.1", listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(TIMEOUT_S)
        for t in threads:
            t.join(TIMEOUT_S)
        listener.close()


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while data := s.recv(65536):
        out += data
    return bytes(out)


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT_S)


def echo(s: socket.socket) -> None:
    while data := s.recv(65536):
        s.sendall(data)


def test_round_trip_through_an_echo_server() -> None:
    with serve(echo) as target, FaultProxy(target) as proxy, connect(proxy) as c:
        sender = threading.Thread(target=lambda: (c.sendall(PAYLOAD), c.shutdown(socket.SHUT_WR)))
        sender.start()
        assert read_all(c) == PAYLOAD
        sender.join(TIMEOUT_S)
        c.close()
        proxy.wait_closed()
        (conn,) = proxy.connections
        assert (conn.upstream, conn.downstream, conn.was_cut) == (len(PAYLOAD), len(PAYLOAD), False)


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 65537, len(PAYLOAD) - 1])
def test_upstream_cut_delivers_exactly_n_bytes(n: int) -> None:
    received = bytearray()
    with serve(lambda s: received.extend(read_all(s))) as target, FaultProxy(target) as proxy:
        proxy.arm(Cut(upstream=n))
        with connect(proxy) as c:
            c.sendall(PAYLOAD)  # the proxy drops what comes after the cut, so this completes
            assert read_all(c) == b""  # the client's end of stream
        proxy.wait_closed()
        (conn,) = proxy.connections
        assert conn.was_cut and conn.upstream == n
    assert bytes(received) == PAYLOAD[:n]  # the server saw exactly n bytes, then end of stream


def source(s: socket.socket) -> None:
    s.sendall(PAYLOAD)
    s.shutdown(socket.SHUT_WR)
    read_all(s)


@pytest.mark.parametrize("m", [0, 1, 65536, len(PAYLOAD) - 1])
def test_downstream_cut_delivers_exactly_m_bytes(m: int) -> None:
    with serve(source) as target, FaultProxy(target) as proxy:
        proxy.arm(Cut(downstream=m))
        with connect(proxy) as c:
            assert read_all(c) == PAYLOAD[:m]
        proxy.wait_closed()
        (conn,) = proxy.connections
        assert conn.was_cut and conn.downstream == m


def test_a_limit_past_the_end_is_no_cut() -> None:
    with serve(echo) as target, FaultProxy(target) as proxy, connect(proxy) as c:
        proxy.arm(Cut(upstream=3, downstream=3))  # c was accepted before: whole
        c.sendall(b"abc")
        c.shutdown(socket.SHUT_WR)
        assert read_all(c) == b"abc"


def upper_lines(seen: list[bytes]) -> Callable[[socket.socket], None]:
    """A request/reply server: each line it reads is recorded and answered in capitals."""

    def handle(s: socket.socket) -> None:
        with s.makefile("rb") as f:
            for line in f:
                seen.append(line)
                s.sendall(line.upper())

    return handle


def test_lost_reply_the_server_gets_the_request_the_client_no_reply() -> None:
    seen: list[bytes] = []
    with serve(upper_lines(seen)) as target, FaultProxy(target) as proxy:
        proxy.arm(Cut(lose_reply_after=len(b"one\ntwo\n")))
        with connect(proxy) as c, c.makefile("rb") as f:
            c.sendall(b"one\n")
            assert f.readline() == b"ONE\n"  # a reply to an earlier request still arrives
            c.sendall(b"two\n")
            assert f.read() == b""  # cut: the reply to the last request is lost
        proxy.wait_closed()
        (conn,) = proxy.connections
        assert conn.was_cut and (conn.upstream, conn.downstream) == (8, 4)
    assert seen == [b"one\n", b"two\n"]  # ...though the server got and answered it


def test_arming_applies_to_the_connections_accepted_after_it() -> None:
    seen: list[bytes] = []

    def echo_and_record(s: socket.socket) -> None:
        got = bytearray()
        while data := s.recv(65536):
            got += data
            s.sendall(data)
        seen.append(bytes(got))

    with serve(echo_and_record) as target, FaultProxy(target) as proxy:
        before = connect(proxy)
        before.sendall(b"1")
        assert before.recv(1) == b"1"  # a round trip: accepted before arming
        proxy.arm(Cut(upstream=2), connections=1)
        with before, connect(proxy) as armed, connect(proxy) as after:
            for c, text in ((before, b"-one"), (armed, b"two"), (after, b"three")):
                c.sendall(text)
                c.shutdown(socket.SHUT_WR)
            assert read_all(before) == b"-one" and read_all(after) == b"three"
            assert b"tw".startswith(read_all(armed))  # at most echoes from before the cut
        proxy.wait_closed()
        assert [(c.upstream, c.was_cut) for c in proxy.connections] == [
            (5, False),
            (2, True),
            (5, False),
        ]
    assert sorted(seen) == [b"1-one", b"three", b"tw"]


def test_close_closes_every_connection_and_thread() -> None:
    with serve(echo) as target:
        proxy = FaultProxy(target)
        c = connect(proxy)
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        proxy.close()  # with the connection still open
        assert read_all(c) == b""
        c.close()
        prefix = f"faultproxy:{proxy.port}-"
        assert not [t for t in threading.enumerate() if t.name.startswith(prefix)]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT_S).close()
