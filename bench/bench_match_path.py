"""The match path against its own search, side by side in one run (issue 32 item 4).

For each gallery size (``--sizes``, dimension ``--dim``), in one run and on the same vectors:

- **in-process FAISS**: ``IndexFlatIP``, one query per ``search`` call, k=10, in this process,
  with 1 and with 2 OpenMP threads (the better of the two is the reference: two threads are
  slower for single queries on a busy 2-core machine);
- **the service**: a real ``tcm-serve`` process (uvicorn, the SQLite store in a temporary
  directory, a random-weight model of that dimension: only embeddings are sent, the model never
  runs), the gallery enrolled through the API (base64, 5,000 items per request), answering
  ``/v1/match`` by embedding (k=10) from ``--clients`` concurrent clients for ``--seconds``.

The two alternate for ``--rounds`` rounds (in-process 1 thread, 2 threads, then the service),
so that a neighbour's load on a shared machine falls on both sides alike; each round gives a
ratio (service q/s / the better in-process q/s of that round), and the run reports their median.

**The clients** are lean, so that the load generator is not what binds: each is a thread of
this process holding one keep-alive HTTP/1.1 connection over a plain socket, sending request
bytes built before the clock starts (one per query: headers, API key, JSON body) and reading
the status line, ``Content-Length`` and the body, nothing parsed beyond that. The clients share
the cores with the server, so the run reports their CPU (this process's user+system seconds
during the load, over the wall time: a share of one core) beside the server's.

**The framework's floor**: the same clients against a bare FastAPI app under uvicorn
(:func:`floor_app`): one route taking the service's own ``MatchRequest`` and answering a fixed
``MatchResponse`` of k candidates, with no auth, middleware, search or record: what a request
costs before the service does anything. Its q/s over the in-process loop's is the best ratio a
one-process FastAPI service could reach.

**Where the server's CPU goes**: each load reports the server's CPU per request, split into its
main thread (the event loop: HTTP, middleware, auth, validation, the response, all under the
GIL) and its other threads (the searches, the store's writer, key lookups), from
``/proc/<pid>/task/<tid>/stat``.

**Search lanes**: the search batcher alone (:func:`batcher_lanes`: no HTTP, no record), 8
concurrent one-query callers over two tenants, with 1 and with 2 lanes (``TCM_SEARCH_LANES``),
alternating: what a second lane gives when the searches are the work.

**Exactness**: before the load, ``--check`` queries are matched one by one through the API and
their candidates compared with the in-process exact top-k (same item ids in order, cosines
within 1e-6); a difference fails the run.

    python -m bench.bench_match_path --json docs/results/bench_match_path.json
    python -m bench.bench_match_path --sizes 10000 --seconds 2 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
from fastapi import FastAPI

from bench.bench_scale import enrol, unit_rows
from bench.bench_service import random_artefact
from bench.soak import ServerProcess, free_port, rss_kib, serve
from service.api.schemas import Candidate, DecisionOut, MatchRequest, MatchResponse

K = 10
ENROL_BATCH = 5000
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def in_process_qps(
    index: faiss.Index, queries: np.ndarray, *, threads: int, seconds: float
) -> float:
    """One query per ``search`` call, as a lone caller would."""
    faiss.omp_set_num_threads(threads)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        index.search(queries[n % len(queries)][None], K)
        n += 1
    return n / (time.perf_counter() - started)


def faiss_batches(index: faiss.Index, queries: np.ndarray, *, seconds: float) -> dict[str, Any]:
    """FAISS's own batching lever, one thread: q/s at 1, 2, 4 and 8 queries per ``search``
    with the default ``distance_compute_blas_threshold`` and with BLAS forced (threshold 1),
    and whether the two answer alike."""
    faiss.omp_set_num_threads(1)
    default = faiss.cvar.distance_compute_blas_threshold
    out: dict[str, Any] = {"default_threshold": default, "qps": {}}
    answers = {}
    try:
        for threshold in (default, 1):
            faiss.cvar.distance_compute_blas_threshold = threshold
            answers[threshold] = index.search(queries[:4], K)
            for nq in (1, 2, 4, 8):
                n, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    lo = n % (len(queries) - nq)
                    index.search(queries[lo : lo + nq], K)
                    n += nq
                out["qps"][f"threshold={threshold} nq={nq}"] = n / (time.perf_counter() - started)
    finally:
        faiss.cvar.distance_compute_blas_threshold = default
    (d0, i0), (d1, i1) = answers[default], answers[1]
    out["same_ids"] = bool((i0 == i1).all())
    out["max_score_diff"] = float(np.abs(d0 - d1).max())
    return out


def batcher_lanes(
    gallery: np.ndarray, queries: np.ndarray, *, seconds: float, callers: int = 8
) -> dict[str, Any]:
    """The search batcher alone (no HTTP, no record): q/s of ``callers`` concurrent one-query
    searches spread over two tenants (the same gallery each), with 1 and with 2 lanes, in
    this process, alternating twice. What a second lane gives the batcher when its searches
    are the work; the service's own ratio above says what it gives behind the event loop."""
    from service.engine.index import IndexRegistry
    from service.engine.search import SearchBatcher

    registry = IndexRegistry(gallery.shape[1], "Flat", threads=1)
    for t in ("a", "b"):
        registry.get(t).add(
            np.arange(len(gallery)),
            [f"i{i}" for i in range(len(gallery))],
            [f"s{i // 4}" for i in range(len(gallery))],
            gallery,
        )

    async def load(lanes: int) -> float:
        batcher = SearchBatcher(registry, max_batch=256, lanes=lanes)
        done = [0]
        stop = time.perf_counter() + seconds

        async def caller(c: int) -> None:
            i = c
            while time.perf_counter() < stop:
                await batcher.search("ab"[c % 2], queries[i % len(queries)][None], K)
                done[0] += 1
                i += callers

        started = time.perf_counter()
        await asyncio.gather(*[caller(c) for c in range(callers)])
        rate = done[0] / (time.perf_counter() - started)
        batcher.close()
        return rate

    runs: dict[str, list[float]] = {"1": [], "2": []}
    for _ in range(2):
        for lanes in (1, 2):
            runs[str(lanes)].append(asyncio.run(load(lanes)))
    one, two = statistics.median(runs["1"]), statistics.median(runs["2"])
    return {"callers": callers, "tenants": 2, "qps": runs, "ratio_2_to_1": two / one}


def fsync_commit_ms(directory: Path, commits: int = 30) -> float:
    """One small SQLite commit with the store's pragmas (WAL, ``synchronous=FULL``): what a
    match's record waits for on this disk."""
    conn = sqlite3.connect(directory / "fsync.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        started = time.perf_counter()
        for i in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 200))
            conn.execute("COMMIT")
        return (time.perf_counter() - started) * 1e3 / commits
    finally:
        conn.close()


def request_bytes(host: str, api_key: str, query: np.ndarray) -> bytes:
    body = json.dumps({"embedding": query.tolist(), "k": K}, separators=(",", ":")).encode()
    head = (
        f"POST /v1/match HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection: send prepared bytes, read one response."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        m = _CONTENT_LENGTH.search(head)
        length = int(m.group(1)) if m else 0
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(head[9:12]), body

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (``/proc/<pid>/stat``), or of one of its
    threads (``/proc/<pid>/task/<tid>/stat``)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_load(
    host: str, port: int, requests: list[bytes], *, clients: int, seconds: float, server_pid: int
) -> dict[str, float]:
    conns = [Connection(host, port) for _ in range(clients)]
    lat: list[list[float]] = [[] for _ in range(clients)]
    bad = [0] * clients
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(w: int) -> None:
        conn, mine, i = conns[w], lat[w], w
        barrier.wait()
        while not stop.is_set():
            t = time.perf_counter()
            status, _ = conn.exchange(requests[i % len(requests)])
            mine.append(time.perf_counter() - t)
            bad[w] += status != 200
            i += clients

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    own0, server0, started = os.times(), cpu_seconds(server_pid), time.perf_counter()
    main0 = cpu_seconds(server_pid, server_pid)  # the main thread: the event loop
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    own1, server1 = os.times(), cpu_seconds(server_pid)
    main1 = cpu_seconds(server_pid, server_pid)
    for c in conns:
        c.close()
    ms = np.concatenate([np.asarray(x) for x in lat]) * 1e3
    return {
        "qps": len(ms) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(ms),
        "errors": sum(bad),
        "client_cpu_cores": (own1.user + own1.system - own0.user - own0.system) / elapsed,
        "server_cpu_cores": (server1 - server0) / elapsed,
        "server_cpu_ms_per_request": (server1 - server0) * 1e3 / max(1, len(ms)),
        # the event loop's thread (HTTP, middleware, auth, validation, the response: under
        # the GIL) and all the others (searches, the store's writer, key lookups)
        "server_main_thread_ms_per_request": (main1 - main0) * 1e3 / max(1, len(ms)),
        "server_other_threads_ms_per_request": (server1 - server0 - main1 + main0)
        * 1e3
        / max(1, len(ms)),
    }


def floor_app() -> FastAPI:
    """The framework's floor (uvicorn ``--factory``): the service's request and response
    models around no work at all. (The models are imported at module level: with postponed
    annotations FastAPI resolves a route's types in the module's globals, and a local import
    made the body a missing query parameter, every request a 422.)"""
    app = FastAPI()

    @app.post("/v1/match")
    async def match(body: MatchRequest) -> MatchResponse:
        return MatchResponse(
            match_id="0" * 32,
            decision=DecisionOut(accepted=False, subject=None, score=0.25),
            candidates=[
                Candidate(item_id=f"i{i}", subject=f"s{i // 4}", score=0.25) for i in range(body.k)
            ],
            threshold=0.5,
            model_version="floor",
        )

    return app


def floor_load(queries: np.ndarray, *, clients: int, seconds: float) -> dict[str, float]:
    """The same load against :func:`floor_app` in its own uvicorn process."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench.bench_match_path:floor_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the floor app did not start") from None
                time.sleep(0.1)
        requests = [request_bytes("127.0.0.1", "none", q) for q in queries]
        return service_load(
            "127.0.0.1", port, requests, clients=clients, seconds=seconds, server_pid=proc.pid
        )
    finally:
        proc.terminate()
        proc.wait(30)


def check_exact(
    base: str, auth: dict[str, str], index: faiss.Index, queries: np.ndarray
) -> dict[str, Any]:
    """The service's candidates against the in-process exact top-k, query by query."""
    faiss.omp_set_num_threads(1)
    worst = 0.0
    with httpx.Client(base_url=base, headers=auth, timeout=60) as client:
        for q in queries:
            r = client.post("/v1/match", json={"embedding": q.tolist(), "k": K})
            r.raise_for_status()
            cands = r.json()["candidates"]
            scores, ids = index.search(q[None], K)
            got = [c["item_id"] for c in cands]
            want = [f"i{i}" for i in ids[0]]
            if got != want:
                raise AssertionError(f"the service answered {got}, exact search {want}")
            diff = np.abs(np.array([c["score"] for c in cands]) - scores[0]).max()
            worst = max(worst, float(diff))
    if worst > 1e-6:
        raise AssertionError(f"cosines differ from exact search by {worst:.2e} (> 1e-6)")
    return {"queries": len(queries), "max_cosine_diff": worst}


@dataclass
class Served:
    """One ``tcm-serve`` under test: its source tree, process, tenant key and prepared requests."""

    name: str
    server: ServerProcess
    auth: dict[str, str]
    requests: list[bytes]

    @property
    def port(self) -> int:
        return int(self.server.base.rsplit(":", 1)[1])


@contextlib.contextmanager
def serve_from(
    tree: Path | None, artefact: Path, work: Path, env: dict[str, str], queries: np.ndarray
) -> Iterator[Served]:
    """A ``tcm-serve`` started from ``tree`` (a checkout, e.g. ``git worktree add`` of an
    older commit: ``python -m service.cli`` imports from its working directory), or from this
    one; with a fresh SQLite store and a tenant."""
    work.mkdir()
    here = Path.cwd()
    saved = os.environ.pop("PYTHONPATH", None)  # the tree's own packages, not this one's
    try:
        if tree is not None:
            os.chdir(tree)
        context = serve(artefact, f"sqlite:///{work / 'tcm.db'}", work, extra_env=env)
        server = context.__enter__()
    finally:
        os.chdir(here)
        if saved is not None:
            os.environ["PYTHONPATH"] = saved
    try:
        key = httpx.post(
            f"{server.base}/v1/tenants",
            json={"name": "bench"},
            headers={"Authorization": f"Bearer {server.admin_token}"},
            timeout=60,
        ).json()["api_key"]
        yield Served(
            str(tree) if tree is not None else "this tree",
            server,
            {"Authorization": f"Bearer {key}"},
            [request_bytes("127.0.0.1", key, q) for q in queries],
        )
    finally:
        context.__exit__(None, None, None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    sizes = sorted(args.sizes)
    gallery = unit_rows(sizes[-1], args.dim, seed=args.dim)
    queries = unit_rows(2000, args.dim, seed=args.dim + 1)
    rows: list[dict[str, Any]] = []
    env = {
        "TCM_MONITOR_ENABLED": "false",
        "TCM_MAX_BODY_BYTES": str(64 * 1024 * 1024),
        "TCM_MAX_ENROL_ITEMS": str(ENROL_BATCH),
        "TCM_STORE_TIMEOUT_S": "30",
        **dict(kv.split("=", 1) for kv in args.server_env),
    }
    with tempfile.TemporaryDirectory(prefix="tcm-match-path-") as tmp, contextlib.ExitStack() as st:
        work = Path(tmp)
        artefact = random_artefact(work / "model", dim=args.dim)
        fsync_ms = fsync_commit_ms(work)
        service = st.enter_context(serve_from(None, artefact, work / "this", env, queries))
        baseline = None
        if args.baseline_tree is not None:
            baseline = st.enter_context(
                serve_from(args.baseline_tree, artefact, work / "baseline", env, queries)
            )
        servers = [s for s in (service, baseline) if s is not None]
        done = 0
        for n in sizes:
            enrol_rate, *_ = [  # this tree's rate is the one reported
                enrol(s.server.base, s.auth, gallery[done:n], done, batch=ENROL_BATCH, clients=1)
                for s in servers
            ]
            done = n
            index = faiss.IndexFlatIP(args.dim)
            index.add(gallery[:n])
            exact = check_exact(service.server.base, service.auth, index, queries[: args.check])
            rounds = []
            for _ in range(args.rounds):
                one = {
                    t: in_process_qps(index, queries, threads=t, seconds=args.seconds / 2)
                    for t in (1, 2)
                }
                loads = {
                    s.name: service_load(
                        "127.0.0.1",
                        s.port,
                        s.requests,
                        clients=args.clients,
                        seconds=args.seconds,
                        server_pid=s.server.pid,
                    )
                    for s in servers
                }
                served = loads[service.name]
                best = max(one.values())
                rounds.append(
                    {
                        "in_process_qps": {str(t): q for t, q in one.items()},
                        "service": served,
                        "ratio": served["qps"] / best,
                        **(
                            {
                                "baseline": loads[baseline.name],
                                "baseline_ratio": loads[baseline.name]["qps"] / best,
                            }
                            if baseline is not None
                            else {}
                        ),
                    }
                )
            floor = floor_load(queries, clients=args.clients, seconds=args.seconds)
            failed = [("floor", floor)] + [
                (name, r[key])
                for r in rounds
                for name, key in (("service", "service"), ("baseline", "baseline"))
                if key in r
            ]
            for name, load in failed:
                if load["errors"]:  # a rate of error answers is not a rate of matches
                    raise AssertionError(f"{name}: {load['errors']} answers were not 200")
            batches = faiss_batches(index, queries, seconds=args.seconds / 8)
            lanes = batcher_lanes(gallery[:n], queries, seconds=args.seconds / 2)
            best_all = statistics.median(max(r["in_process_qps"].values()) for r in rounds)
            row = {
                "items": n,
                "dim": args.dim,
                "clients": args.clients,
                "enrol_items_per_s": enrol_rate,
                "exactness": exact,
                "rounds": rounds,
                "ratio_median": statistics.median(r["ratio"] for r in rounds),
                "framework_floor": floor,
                "floor_ratio": floor["qps"] / best_all,
                "faiss_batches": batches,
                "batcher_lanes": lanes,
                "server_rss_mib": rss_kib(service.server.pid) / 1024,
                "raw_vectors_mib": n * args.dim * 4 / 2**20,
            }
            if baseline is not None:
                row["baseline_tree"] = baseline.name
                row["baseline_ratio_median"] = statistics.median(
                    r["baseline_ratio"] for r in rounds
                )
            rows.append(row)
            print(summary(row), flush=True)
    return {
        "command": "python -m bench.bench_match_path " + " ".join(args.argv),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "faiss": faiss.__version__,
        "server_env": env,
        "sqlite_fsync_commit_ms": fsync_ms,
        "k": K,
        "rows": rows,
    }


def summary(row: dict[str, Any]) -> str:
    parts = [f"{row['items']:,} x {row['dim']}, {row['clients']} clients:"]
    for r in row["rounds"]:
        s, one = r["service"], r["in_process_qps"]
        parts.append(
            f"  in-process 1 thread {one['1']:,.0f} q/s, 2 threads {one['2']:,.0f} q/s | service "
            f"{s['qps']:,.0f} q/s (p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
            f"{s['errors']} errors; server CPU {s['server_cpu_cores']:.2f} cores = "
            f"{s['server_cpu_ms_per_request']:.2f} ms/request: main thread "
            f"{s['server_main_thread_ms_per_request']:.2f}, others "
            f"{s['server_other_threads_ms_per_request']:.2f}; clients "
            f"{s['client_cpu_cores']:.2f}) | ratio {r['ratio']:.2f}x"
        )
        if "baseline" in r:
            b = r["baseline"]
            parts.append(
                f"    baseline tree {b['qps']:,.0f} q/s (p50 {b['p50_ms']:.1f} ms, "
                f"{b['server_cpu_ms_per_request']:.2f} ms CPU/request) | ratio "
                f"{r['baseline_ratio']:.2f}x"
            )
    f = row["framework_floor"]
    parts.append(
        f"  framework floor (bare FastAPI route, same models, no work): {f['qps']:,.0f} q/s "
        f"({f['server_cpu_ms_per_request']:.2f} ms CPU/request) = {row['floor_ratio']:.2f}x the "
        "median best in-process loop"
    )
    b = row["faiss_batches"]

    def rates(threshold: int) -> str:
        return " / ".join(f"{b['qps'][f'threshold={threshold} nq={n}']:,.0f}" for n in (1, 2, 4, 8))

    parts.append(
        f"  FAISS, 1 thread, q/s at 1 / 2 / 4 / 8 queries per call: default BLAS threshold "
        f"({b['default_threshold']}) {rates(b['default_threshold'])}; BLAS forced {rates(1)} "
        f"(same ids {b['same_ids']}, max score diff {b['max_score_diff']:.1e})"
    )
    if "baseline_ratio_median" in row:
        speedup = statistics.median(
            r["service"]["qps"] / r["baseline"]["qps"] for r in row["rounds"]
        )
        parts.append(
            f"  baseline ({row['baseline_tree']}): ratio (median) "
            f"{row['baseline_ratio_median']:.2f}x; this tree / baseline q/s {speedup:.2f}x"
        )
    lanes = row["batcher_lanes"]
    parts.append(
        f"  search batcher alone, {lanes['callers']} callers over 2 tenants: 1 lane "
        f"{statistics.median(lanes['qps']['1']):,.0f} q/s, 2 lanes "
        f"{statistics.median(lanes['qps']['2']):,.0f} q/s = {lanes['ratio_2_to_1']:.2f}x"
    )
    parts.append(
        f"  ratio (median of {len(row['rounds'])} rounds): {row['ratio_median']:.2f}x; "
        f"exact on {row['exactness']['queries']} queries (max cosine diff "
        f"{row['exactness']['max_cosine_diff']:.1e}); server RSS {row['server_rss_mib']:,.0f} MiB"
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0, help="service load per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", type=int, default=50, help="queries checked against exact search")
    p.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="TCM_X=V",
        help="extra settings for the server (e.g. to measure one lever)",
    )
    p.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="also serve from this checkout (e.g. a git worktree of an older commit), "
        "measured in the same rounds",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
