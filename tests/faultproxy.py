"""A TCP proxy for fault-injection tests: it cuts a connection at an exact byte, never at a time.

``FaultProxy(("127.0.0.1", port))`` listens on 127.0.0.1 (an ephemeral port) and forwards each
connection to the target; ``arm(cut)`` applies a :class:`Cut` to the connections accepted from
then on. A cut leaves both peers with the bytes forwarded before it followed by an end of stream
(FIN, never RST: nothing the proxy already passed on is lost); whatever either peer sends after
it, the answer to the last bytes forwarded included, is read and dropped. Three cuts:

* ``Cut(upstream=n)``: the client's first ``n`` bytes reach the server, the rest never does
  (the cut happens when byte ``n + 1`` arrives).
* ``Cut(downstream=m)``: the same for the server's bytes to the client.
* ``Cut(lose_reply_after=n)``: the client's first ``n`` bytes all reach the server (later ones
  never do); the first byte the server sends after it has them cuts the connection, so the
  server's reply to them is lost, whatever the server did with them. Decided by causality, not
  timing: a server byte that reaches the proxy before byte ``n`` was handed to the server's
  socket answers earlier bytes and is forwarded; any later one waits until byte ``n`` is sent,
  then cuts (and is dropped).

``record=True`` keeps the forwarded bytes (count the bytes of a clean run to find offsets).
A connection counts as accepted when the proxy's accept loop takes it, which can be after the
client's ``connect()`` returned: make a round trip on a connection before arming if it must
stay whole. Stdlib only: three threads per connection (named ``faultproxy:<port>-...``), at
most ``max_connections`` connections, a side idle for ``idle_timeout_s`` closed; ``close()``
(or leaving the ``with`` block) closes every socket the proxy opened and joins its threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType

_CHUNK = 65536


@dataclass(frozen=True)
class Cut:
    """Where a connection is cut (see the module); ``None``: no limit of that kind."""

    upstream: int | None = None
    downstream: int | None = None
    lose_reply_after: int | None = None


@dataclass
class Connection:
    """One proxied connection: the bytes forwarded each way (the bytes themselves when the proxy
    records), and whether it was cut."""

    index: int
    cut: Cut | None
    upstream: int = 0
    downstream: int = 0
    was_cut: bool = False
    upstream_data: bytearray | None = field(default=None, repr=False)
    downstream_data: bytearray | None = field(default=None, repr=False)
    closed: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass
class _Link:
    """What the two pumps of a connection share."""

    conn: Connection
    client: socket.socket
    server: socket.socket
    cut: threading.Event = field(default_factory=threading.Event)
    handed: int = 0  # client bytes handed to the server socket (counted before sendall)
    # set once the first lose_reply_after client bytes have been sent (or never will be)
    delivered: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target``, cutting armed connections (see the module)."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        record: bool = False,
        max_connections: int = 32,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.target = target
        self._record = record
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._cut: Cut | None = None
        self._armed_for: int | None = None
        self._connections: list[Connection] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # how often the accept loop looks at _stop
        self.host: str = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"faultproxy:{self.port}-accept"
        )
        self._accept_thread.start()

    # --- API -------------------------------------------------------------------------------
    def arm(self, cut: Cut | None, *, connections: int | None = None) -> None:
        """The next ``connections`` connections accepted (``None``: all of them, until armed
        again) get ``cut``; ``arm(None)`` forwards them whole."""
        with self._lock:
            self._cut, self._armed_for = cut, connections

    @property
    def connections(self) -> list[Connection]:
        """The connections accepted so far, oldest first."""
        with self._lock:
            return list(self._connections)

    def wait_closed(self, timeout_s: float = 10.0) -> None:
        """Waits until every connection accepted so far is closed (its counts are final)."""
        for conn in self.connections:
            if not conn.closed.wait(timeout_s):
                raise TimeoutError(f"proxied connection still open: {conn}")

    def close(self) -> None:
        """Stops accepting, closes every socket and joins every thread."""
        self._stop.set()
        self._accept_thread.join(5)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            _shutdown(s, socket.SHUT_RDWR)  # wakes the threads blocked in recv
        for t in threads:
            t.join(5)
        for s in sockets:
            s.close()
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                index = len(self._connections)
                if index >= self._max_connections:
                    client.close()
                    continue
                conn = Connection(index, self._cut)
                if self._armed_for is not None:
                    self._armed_for -= 1
                    if self._armed_for <= 0:
                        self._cut = None
                if self._record:
                    conn.upstream_data, conn.downstream_data = bytearray(), bytearray()
                self._connections.append(conn)
            try:
                server = socket.create_connection(self.target, timeout=self._idle_timeout_s)
            except OSError:
                client.close()
                conn.closed.set()
                continue
            client.settimeout(self._idle_timeout_s)
            link = _Link(conn, client, server)
            if conn.cut is not None and conn.cut.lose_reply_after == 0:
                link.delivered.set()
            name = f"faultproxy:{self.port}-{index}"
            threads = [
                threading.Thread(
                    target=self._pump,
                    args=(link, up),
                    daemon=True,
                    name=f"{name}-{'up' if up else 'down'}",
                )
                for up in (True, False)
            ]
            threads.append(
                threading.Thread(
                    target=self._closer, args=(link, threads[:2]), name=f"{name}-close", daemon=True
                )
            )
            with self._lock:
                self._sockets += [client, server]
                self._threads += threads
            for t in threads:
                t.start()

    def _pump(self, link: _Link, upstream: bool) -> None:
        """Copies one way until end of stream, cutting where the connection's cut says; once
        the connection is cut (either way), reads and drops."""
        conn, cut = link.conn, link.conn.cut or Cut()
        src, dst = (link.client, link.server) if upstream else (link.server, link.client)
        lose = cut.lose_reply_after
        limit = cut.upstream if upstream else cut.downstream
        if upstream and lose is not None:
            limit = lose if limit is None else min(limit, lose)
        count = 0
        try:
            while data := src.recv(_CHUNK):
                if link.cut.is_set():
                    continue
                if not upstream and lose is not None:
                    with self._lock:
                        reply = link.handed >= lose  # the server may have all n bytes
                    if reply:
                        link.delivered.wait()  # until they have all been sent to it
                        self._cut_link(link)
                        continue
                forward = data if limit is None else data[: max(0, limit - count)]
                past_limit = len(forward) < len(data)
                if past_limit:  # cut before sending: the answer to these bytes is dropped
                    link.cut.set()
                if forward:
                    if upstream:
                        with self._lock:
                            link.handed += len(forward)
                    try:
                        dst.sendall(forward)
                    except OSError:
                        if not link.cut.is_set():
                            raise
                        forward = b""  # cut meanwhile (dst shut down): dropped
                    count += len(forward)
                    self._count(conn, upstream, forward)
                    if upstream and lose is not None and count >= lose:
                        link.delivered.set()
                if past_limit:
                    self._cut_link(link)
        except OSError:
            pass  # a peer reset, the idle timeout, or close()
        finally:
            _shutdown(dst, socket.SHUT_WR)  # pass the end of stream on
            if upstream:
                link.delivered.set()  # nothing more will be sent: never wait for it

    def _count(self, conn: Connection, upstream: bool, data: bytes) -> None:
        with self._lock:
            if upstream:
                conn.upstream += len(data)
            else:
                conn.downstream += len(data)
            recorded = conn.upstream_data if upstream else conn.downstream_data
            if recorded is not None:
                recorded += data

    def _cut_link(self, link: _Link) -> None:
        """Both peers: what was forwarded, then end of stream (a write after it fails)."""
        with self._lock:
            link.conn.was_cut = True
        link.cut.set()
        _shutdown(link.client, socket.SHUT_WR)
        _shutdown(link.server, socket.SHUT_WR)

    def _closer(self, link: _Link, pumps: list[threading.Thread]) -> None:
        for t in pumps:
            t.join()
        with self._lock:
            for s in (link.client, link.server):
                s.close()
                self._sockets.remove(s)
        link.conn.closed.set()


def _shutdown(s: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # already shut down, or the peer is gone
        s.shutdown(how)
