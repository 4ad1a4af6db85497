"""Bounded soak: N concurrent clients mixing enrol/match/verify/feedback against a real tcm-serve.

Starts ``tcm-serve`` (``python -m service.cli``) as a subprocess on a free loopback port, with
its own SQLite file (or ``--store-url redis://...`` under a fresh key prefix, deleted after),
creates tenants with a starting gallery, then runs ``--clients`` asyncio clients (httpx), each
bound to one tenant, for ``--warmup`` + ``--duration`` seconds. Each client picks, at random
(seeded), an enrolment (1-4 items, images or embeddings), a 1:N match (image or embedding), a
1:1 verify (subject, item, embedding) or feedback on one of its own earlier matches.

It reports, for the measured phase (after the warm-up): errors (any answer other than the
expected 201/200/200/201, or a transport failure; must be 0), request counts and p50/p99
latency per operation, and the server's RSS after the warm-up and at the end (plus the peak of
1 Hz samples). Afterwards it checks that every acknowledged enrolment is in the gallery, and
that the server's log has no traceback and no secret (API keys, admin token).

    python -m bench.soak                                   # 60 s, 8 clients, artefacts/default
    python -m bench.soak --duration 600 --clients 16 --json soak.json
    python -m bench.soak --store-url redis://127.0.0.1:6379/0

Exit status 0 only if there were no errors and all checks passed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

OPS = ("enrol", "match", "verify", "feedback")
EXPECTED = {"enrol": 201, "match": 200, "verify": 200, "feedback": 201}
WEIGHTS = {"enrol": 0.2, "match": 0.4, "verify": 0.2, "feedback": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def png_b64(seed: int, size: int = 28) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unit_vector(rng: np.random.Generator, dim: int) -> list[float]:
    v = rng.standard_normal(dim)
    return (v / np.linalg.norm(v)).tolist()


# --- the server ------------------------------------------------------------------------------
@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base: str
    admin_token: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    artefact: Path,
    store_url: str,
    workdir: Path,
    *,
    redis_prefix: str | None = None,
    extra_env: dict[str, str] | None = None,
    start_timeout_s: float = 120.0,
    admin_token: str | None = None,
) -> Iterator[ServerProcess]:
    """Runs ``tcm-serve`` until the block exits (SIGTERM, then SIGKILL after 20 s)."""
    port = free_port()
    token = admin_token or secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCM_")}
    env |= {
        "TCM_ARTEFACT_PATH": str(artefact),
        "TCM_STORE_URL": store_url,
        "TCM_ADMIN_TOKEN": token,
        "TCM_DEVICE": "cpu",
        **(extra_env or {}),
    }
    if redis_prefix is not None:
        env["TCM_REDIS_KEY_PREFIX"] = redis_prefix
    log_path = workdir / "tcm-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "info",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", token, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if not server.alive():
                raise RuntimeError(f"tcm-serve exited at start-up:\n{server.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tcm-serve not ready after {start_timeout_s:.0f}s")
            time.sleep(0.1)
        yield server
    finally:
        if server.alive():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --- the load --------------------------------------------------------------------------------
@dataclass
class TenantState:
    tenant_id: str
    api_key: str
    subjects: list[str]
    item_ids: list[str]
    acknowledged: set[str] = field(default_factory=set)  # items the service said it stored

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class Stats:
    measuring: bool = False
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    errors: list[dict[str, Any]] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_errors: list[dict[str, Any]] = field(default_factory=list)

    def record(self, op: str, seconds: float, error: dict[str, Any] | None) -> None:
        if not self.measuring:
            self.warmup_requests += 1
            if error is not None:
                self.warmup_errors.append(error)
            return
        self.counts[op] += 1
        self.latencies[op].append(seconds)
        if error is not None:
            self.errors.append(error)


async def client(
    worker: int,
    base: str,
    tenant: TenantState,
    dim: int,
    images: list[str],
    stats: Stats,
    stop: asyncio.Event,
    seed: int,
) -> None:
    rng = random.Random(seed * 1000 + worker)
    nrng = np.random.default_rng(seed * 1000 + worker)
    open_matches: list[str] = []
    async with httpx.AsyncClient(base_url=base, headers=tenant.auth, timeout=60) as c:
        n = 0
        while not stop.is_set():
            n += 1
            op = rng.choices(OPS, weights=[WEIGHTS[o] for o in OPS])[0]
            if op == "feedback" and not open_matches:
                op = "match"
            body: dict[str, Any]
            new_ids: list[str] = []
            if op == "enrol":
                items = []
                for _ in range(rng.randint(1, 4)):
                    iid = f"w{worker}-{n}-{len(items)}"
                    new_ids.append(iid)
                    subject = rng.choice(tenant.subjects)
                    src = (
                        {"image": rng.choice(images)}
                        if rng.random() < 0.5
                        else {"embedding": unit_vector(nrng, dim)}
                    )
                    items.append({"subject": subject, "item_id": iid, **src})
                body, path = {"items": items}, "/v1/gallery"
            elif op == "match":
                src = (
                    {"image": rng.choice(images)}
                    if rng.random() < 0.5
                    else {"embedding": unit_vector(nrng, dim)}
                )
                body, path = {**src, "k": 5}, "/v1/match"
            elif op == "verify":
                a = {"subject": rng.choice(tenant.subjects)}
                b = rng.choice(
                    [
                        {"item_id": rng.choice(tenant.item_ids)},
                        {"embedding": unit_vector(nrng, dim)},
                        {"image": rng.choice(images)},
                    ]
                )
                body, path = {"a": a, "b": b}, "/v1/verify"
            else:
                mid = open_matches.pop(rng.randrange(len(open_matches)))
                label = rng.choice(
                    [
                        {"correct": rng.random() < 0.5},
                        {"true_subject": rng.choice(tenant.subjects)},
                        {"true_subject": None},
                    ]
                )
                body, path = {"match_id": mid, **label}, "/v1/feedback"
            t0 = time.perf_counter()
            error: dict[str, Any] | None = None
            try:
                r = await c.post(path, json=body)
                elapsed = time.perf_counter() - t0
                if r.status_code != EXPECTED[op]:
                    error = {"op": op, "status": r.status_code, "body": r.text[:300]}
                elif op == "enrol":
                    tenant.acknowledged.update(r.json()["item_ids"])
                    tenant.item_ids.extend(new_ids)
                elif op == "match":
                    open_matches.append(r.json()["match_id"])
            except httpx.HTTPError as exc:
                elapsed = time.perf_counter() - t0
                error = {"op": op, "status": None, "body": f"{type(exc).__name__}: {exc}"}
            stats.record(op, elapsed, error)


async def _sample_rss(pid: int, stop: asyncio.Event, samples: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError, RuntimeError):
            samples.append(rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def drive(
    server: ServerProcess,
    tenants: list[TenantState],
    dim: int,
    *,
    clients: int,
    warmup_s: float,
    duration_s: float,
    seed: int,
) -> dict[str, Any]:
    images = [png_b64(seed * 10_000 + i) for i in range(64)]
    stats = Stats()
    stop, sampling = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            client(w, server.base, tenants[w % len(tenants)], dim, images, stats, stop, seed)
        )
        for w in range(clients)
    ]
    await asyncio.sleep(warmup_s)
    rss_before = rss_kib(server.pid)
    samples: list[int] = [rss_before]
    sampler = asyncio.create_task(_sample_rss(server.pid, sampling, samples))
    stats.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(duration_s)
    stop.set()
    await asyncio.gather(*tasks)
    measured_s = time.perf_counter() - started
    rss_after = rss_kib(server.pid)
    sampling.set()
    await sampler
    return {
        "stats": stats,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_peak_kib": max([*samples, rss_after]),
        "rss_samples_kib": samples,
        "measured_s": measured_s,
    }


def _setup(
    server: ServerProcess, n_tenants: int, subjects: int, dim: int, seed: int
) -> list[TenantState]:
    rng = np.random.default_rng(seed)
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    out = []
    with httpx.Client(base_url=server.base, timeout=120) as c:
        for t in range(n_tenants):
            r = c.post("/v1/tenants", json={"name": f"soak-{t}"}, headers=admin)
            r.raise_for_status()
            created = r.json()
            state = TenantState(
                created["tenant_id"],
                created["api_key"],
                [f"subject-{s}" for s in range(subjects)],
                [],
            )
            items = []
            for s, subject in enumerate(state.subjects):
                items.append(
                    {
                        "subject": subject,
                        "item_id": f"init-{s}-img",
                        "image": png_b64(seed * 100_000 + t * 1000 + s),
                    }
                )
                items.append(
                    {
                        "subject": subject,
                        "item_id": f"init-{s}-emb",
                        "embedding": unit_vector(rng, dim),
                    }
                )
            for i in range(0, len(items), 64):
                r = c.post("/v1/gallery", json={"items": items[i : i + 64]}, headers=state.auth)
                r.raise_for_status()
                state.acknowledged.update(r.json()["item_ids"])
            state.item_ids = sorted(state.acknowledged)
            out.append(state)
    return out


def _missing_acknowledged(server: ServerProcess, tenants: list[TenantState]) -> int:
    missing = 0
    with httpx.Client(base_url=server.base, timeout=120) as c:
        for t in tenants:
            seen: set[str] = set()
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                r = c.get("/v1/gallery", params=params, headers=t.auth)
                r.raise_for_status()
                page = r.json()
                seen.update(i["item_id"] for i in page["items"])
                cursor = page["next_cursor"]
                if not cursor:
                    break
            missing += len(t.acknowledged - seen)
    return missing


@dataclass
class SoakResult:
    clients: int
    tenants: int
    duration_s: float
    warmup_s: float
    store: str
    requests: int
    requests_per_s: float
    errors: int
    warmup_errors: int
    error_samples: list[dict[str, Any]]
    per_op: dict[str, dict[str, float]]
    rss_before_mib: float
    rss_after_mib: float
    rss_peak_mib: float
    rss_growth_mib: float
    rss_samples_mib: list[float]
    acknowledged_items: int
    missing_acknowledged: int
    server_alive: bool
    log_tracebacks: int
    log_secrets: int
    machine: str

    @property
    def ok(self) -> bool:
        return (
            self.errors == 0
            and self.warmup_errors == 0
            and self.missing_acknowledged == 0
            and self.server_alive
            and self.log_tracebacks == 0
            and self.log_secrets == 0
        )


@contextlib.contextmanager
def scratch_store(store_url: str | None, name: str) -> Iterator[tuple[Path, str, str | None]]:
    """A temporary work folder and a store for one run: ``(workdir, store_url, redis_prefix)``.
    SQLite inside the folder when ``store_url`` is None; else that Redis under a fresh key
    prefix, whose keys are dropped when the block exits."""
    with tempfile.TemporaryDirectory(prefix=f"tcm-{name}-") as tmp:
        workdir = Path(tmp)
        prefix = None
        if store_url is None:
            store_url = f"sqlite:///{workdir / 'tcm.db'}"
        elif store_url.startswith(("redis://", "rediss://", "unix://")):
            prefix = f"tcm{name}:{uuid.uuid4().hex}:"
        try:
            yield workdir, store_url, prefix
        finally:
            if prefix is not None:
                _drop_redis_prefix(store_url, prefix)


def run_soak(
    *,
    artefact: Path,
    duration_s: float = 60.0,
    clients: int = 8,
    tenants: int = 4,
    subjects: int = 20,
    warmup_s: float = 5.0,
    store_url: str | None = None,
    seed: int = 0,
    monitor_interval_s: float = 5.0,
) -> SoakResult:
    with (
        scratch_store(store_url, "soak") as (workdir, url, prefix),
        serve(
            artefact,
            url,
            workdir,
            redis_prefix=prefix,
            extra_env={"TCM_MONITOR_INTERVAL_S": str(monitor_interval_s)},
        ) as server,
    ):
        dim = int(httpx.get(f"{server.base}/v1/model", timeout=10).json()["embedding_dim"])
        states = _setup(server, tenants, subjects, dim, seed)
        out = asyncio.run(
            drive(
                server,
                states,
                dim,
                clients=clients,
                warmup_s=warmup_s,
                duration_s=duration_s,
                seed=seed,
            )
        )
        missing = _missing_acknowledged(server, states)
        alive = server.alive()
        log = server.log()
    stats: Stats = out["stats"]
    secrets_ = [server.admin_token, *(t.api_key for t in states)]
    per_op = {}
    for op in OPS:
        lat = np.asarray(stats.latencies[op]) * 1e3
        per_op[op] = {
            "count": int(stats.counts[op]),
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
        }
    requests = sum(stats.counts.values())
    mib = 1024.0
    return SoakResult(
        clients=clients,
        tenants=tenants,
        duration_s=duration_s,
        warmup_s=warmup_s,
        store=url.split(":", 1)[0],
        requests=requests,
        requests_per_s=requests / out["measured_s"],
        errors=len(stats.errors),
        warmup_errors=len(stats.warmup_errors),
        error_samples=(stats.warmup_errors + stats.errors)[:10],
        per_op=per_op,
        rss_before_mib=out["rss_before_kib"] / mib,
        rss_after_mib=out["rss_after_kib"] / mib,
        rss_peak_mib=out["rss_peak_kib"] / mib,
        rss_growth_mib=(out["rss_after_kib"] - out["rss_before_kib"]) / mib,
        rss_samples_mib=[s / mib for s in out["rss_samples_kib"]],
        acknowledged_items=sum(len(t.acknowledged) for t in states),
        missing_acknowledged=missing,
        server_alive=alive,
        log_tracebacks=log.count("Traceback"),
        log_secrets=sum(log.count(s) for s in secrets_),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    )


def _drop_redis_prefix(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            r.unlink(*keys[i : i + 500])
    finally:
        r.close()


def report(res: SoakResult) -> str:
    lines = [
        f"# soak: {res.clients} clients over {res.tenants} tenants, {res.duration_s:.0f}s "
        f"measured after {res.warmup_s:.0f}s warm-up, store {res.store}; {res.machine}",
        f"requests {res.requests} ({res.requests_per_s:.1f}/s), errors {res.errors} "
        f"(warm-up {res.warmup_errors})",
        f"{'op':<10} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for op, s in res.per_op.items():
        lines.append(
            f"{op:<10} {s['count']:>7} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}"
        )
    lines += [
        f"server RSS: {res.rss_before_mib:.1f} MiB after warm-up -> {res.rss_after_mib:.1f} MiB "
        f"at the end ({res.rss_growth_mib:+.1f} MiB), peak {res.rss_peak_mib:.1f} MiB",
        f"acknowledged items {res.acknowledged_items}, missing afterwards "
        f"{res.missing_acknowledged}; server alive {res.server_alive}; log: "
        f"{res.log_tracebacks} tracebacks, {res.log_secrets} secrets",
    ]
    for e in res.error_samples:
        lines.append(f"  error: {e}")
    lines.append("OK" if res.ok else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artefact", type=Path, default=Path("artefacts/default"))
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--subjects", type=int, default=20, help="per tenant, 2 items each at start")
    p.add_argument("--store-url", default=None, help="default: a fresh SQLite file")
    p.add_argument("--monitor-interval", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    res = run_soak(
        artefact=args.artefact,
        duration_s=args.duration,
        clients=args.clients,
        tenants=args.tenants,
        subjects=args.subjects,
        warmup_s=args.warmup,
        store_url=args.store_url,
        seed=args.seed,
        monitor_interval_s=args.monitor_interval,
    )
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=1))
    return 0 if res.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
