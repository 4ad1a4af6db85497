"""The service's one settings class, read from ``TCM_*`` environment variables.

Every knob the service has lives here so that a deployment is described by its environment alone
and a bad value stops the process at start-up instead of at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

STORE_SCHEMES = (
    "sqlite:///",
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "redis+cluster://",
)


SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"


def store_location(url: str) -> str:
    """The store ``url`` fit for a log line: scheme, host(s), port and path (a SQLite file, a
    Redis database or Sentinel service), never the user, password or query (a Redis URL may
    carry a password: ``redis://:pw@host``, ``?password=``, ``?sentinel_password=``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "(unparsable store URL)"
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, slash, path = rest.partition("/")
    host = netloc.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path}"


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: the
    Sentinels to ask, the name of the monitored primary, the database; the credentials are the
    primary's (Sentinels that need their own: ``?sentinel_password=...``)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        if not url.startswith(SENTINEL_SCHEME):
            raise ValueError(f"not a {SENTINEL_SCHEME} URL")
        rest, _, query = url.removeprefix(SENTINEL_SCHEME).partition("?")
        userinfo, _, hostpath = rest.rpartition("@")
        hosts, _, path = hostpath.partition("/")
        sentinels = []
        for hp in hosts.split(","):
            host, _, port = hp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"Sentinel address {hp!r} is not host:port")
            sentinels.append((host, int(port)))
        parts = [unquote(p) for p in path.split("/") if p]
        if not 1 <= len(parts) <= 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(
                "a Sentinel URL names the primary's service, and optionally a "
                "database: redis+sentinel://host:26379/mymaster/0"
            )
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
        params = parse_qs(query)
        unknown = set(params) - {"sentinel_password"}
        if unknown:
            raise ValueError(f"unknown Sentinel URL parameters {sorted(unknown)}")
        return cls(
            tuple(sentinels),
            parts[0],
            int(parts[1]) if len(parts) == 2 else 0,
            unquote(username) or None,
            unquote(password) or None,
            params["sentinel_password"][0] if "sentinel_password" in params else None,
        )


@dataclass(frozen=True)
class ClusterURL:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]``: some of the cluster's
    nodes (the client learns the rest, and every move of a slot, from them)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        if not url.startswith(CLUSTER_SCHEME):
            raise ValueError(f"not a {CLUSTER_SCHEME} URL")
        rest = url.removeprefix(CLUSTER_SCHEME)
        if "?" in rest or "/" in rest.rstrip("/"):
            raise ValueError(
                "a Cluster URL lists nodes only (Cluster has one database): "
                "redis+cluster://host:6379[,host:6379]"
            )
        userinfo, _, hosts = rest.rstrip("/").rpartition("@")
        nodes = []
        for hp in hosts.split(","):
            host, _, port = hp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"Cluster node address {hp!r} is not host:port")
            nodes.append((host, int(port)))
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
        return cls(tuple(nodes), unquote(username) or None, unquote(password) or None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TCM_", extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------------
    artefact_path: Path = Field(
        Path("artefacts/default"), description="exported artefact directory (manifest.json)"
    )
    device: Literal["cpu", "cuda", "auto"] = "auto"
    model_retain_versions: int = Field(
        2,
        ge=1,
        description="model versions whose gallery embeddings are kept: the active one "
        "and the last ones before it (a rollback to a kept version only switches indexes)",
    )
    model_poll_s: float = Field(
        2.0, gt=0, description="how often a replica checks the model registry for a switch"
    )
    model_heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="an activation's heartbeat; one silent for 3 beats was cut "
        "short (its process died) and another replica, or the restarted one, resumes it",
    )
    model_retire_grace_s: float = Field(
        5.0,
        ge=0,
        description="how long the previous model keeps serving requests that "
        "started before a switch",
    )

    # --- store -----------------------------------------------------------------------------
    store_url: str = Field(
        "sqlite:///./data/tcm.db",
        description="sqlite:///relative/path.db, sqlite:////absolute/path.db, redis://..., or "
        "redis+sentinel://host:26379[,host:26379]/service[/db] (the primary Sentinel names), "
        "or redis+cluster://host:6379[,host:6379] (Redis Cluster: each tenant's data in its "
        "own hash slot)",
    )
    redis_key_prefix: str = Field("tcm:", min_length=1, max_length=64)
    store_timeout_s: float = Field(2.0, gt=0, description="socket/busy timeout of the store")
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Redis replicas that must hold a write of record (tenants, keys, gallery "
        "writes, feedback) before it is confirmed (WAIT); else 503 and the write stays on the "
        "primary for a retry. 0: confirmed by the primary alone (replication is asynchronous)",
    )
    shard_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="this replica's shard group (issue 31): it loads and follows only the "
        "tenants the placement table gives its group, and forwards requests for others to a "
        "replica of their group (needs a Redis store and advertise_url); unset: every tenant",
    )
    advertise_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/?#]+$",
        description="the base URL other replicas forward requests to this one at "
        "(http://host:port), with shard_group",
    )
    forward_timeout_s: float = Field(
        60.0, gt=0, description="how long a request forwarded to another shard group may take"
    )
    placement_poll_s: float = Field(
        1.0,
        gt=0,
        description="how often a grouped replica reads the placement table and "
        "says it is alive (peers forget a replica silent for 3 polls)",
    )
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, description="how long a write waits for redis_wait_replicas replicas"
    )

    # --- security and request limits -------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin API; tcm-serve generates one when unset"
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_batch_items: int = Field(256, ge=1, description="items or images per request")
    max_enrol_items: int = Field(
        10_000,
        ge=1,
        description="items per enrolment request when each brings its embedding "
        "(bulk import); items with an image still count against max_batch_items",
    )
    max_k: int = Field(100, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width*height cap per image")
    max_request_pixels: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="width*height summed over one request's images "
        "(from their headers, before decoding); more is a 413 too_many_pixels",
    )
    max_list_limit: int = Field(1000, ge=1)
    max_verify_pairs: int = Field(
        50_000_000,
        ge=1,
        description="pairs one verify may compare (subject vs subject: the "
        "product of their sizes); more is a 422 too_many_pairs",
    )
    rate_limit_per_s: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="work units per second per tenant (token bucket refill rate); 0 = no "
        "limit. A request costs its work: POST /v1/gallery one unit per item, POST "
        "/v1/match/batch one per query, POST /v1/embed one per image; every other tenant "
        "request (match, verify, get, list, delete, PUT, uploads, feedback, monitor) one",
    )
    rate_limit_burst: int = Field(
        0,
        ge=0,
        description="bucket capacity per tenant in work units: the most one request "
        "may cost (more is a 422 too_many_items); 0 = one second's worth (at least 1)",
    )

    # --- index and embedding ---------------------------------------------------------------
    index_factory: str = Field(
        "Flat",
        min_length=1,
        description="faiss index_factory string (Flat, HNSW32, "
        "IVF1024,Flat, ...), or Torch: exact search in torch (CPU or CUDA); see "
        "docs/benchmarks.md for the measured choice",
    )
    index_threads: int = Field(
        1,
        ge=0,
        description="OpenMP threads of each FAISS search (0: faiss's default, one per "
        "core). 1 by default: concurrent requests (and search batching) already use the cores, "
        "and on a busy machine FAISS's threads wait on each other: a single-query search took "
        "26 ms with 2 threads and 0.8 ms with 1 (10k x 128, shared 2-core VM)",
    )
    index_search_params: str = Field(
        "",
        description="faiss search parameters of approximate indexes, e.g. 'efSearch=128' "
        "(HNSW) or 'nprobe=32' (IVF); empty: faiss's defaults",
    )
    embed_max_batch: int = Field(32, ge=1, description="images per forward pass")
    cpu_traced_forward: bool = Field(
        True,
        description="on a CPU, serve an optimised forward of the model (ONNX Runtime, else "
        "TorchScript traced and frozen in channels_last; see cpu_onnxruntime), each checked at "
        "start-up against the eager model (embeddings within 1e-4) and skipped when it "
        "differs; false: the eager model",
    )
    cpu_onnxruntime: bool = Field(
        True,
        description="try ONNX Runtime first for the optimised CPU forward (3.3-4.5x the "
        "TorchScript forward of the bird model on the shared 2-core VM, docs/benchmarks.md); "
        "false, or onnxruntime/onnx not installed: TorchScript",
    )
    embed_max_wait_ms: float = Field(
        5.0, ge=0, description="how long a forward pass waits for more requests to join it"
    )
    decode_processes: int = Field(
        -1,
        ge=-1,
        description="worker processes that decode and stage image files, so that decoding "
        "runs on every core beside the server's GIL (each ~150-250 MiB: torch imported); 0: "
        "the request's thread; -1: on a CUDA device one per core but one (left to the server), "
        "1-8; none on a CPU (where the forward binds)",
    )

    search_max_batch: int = Field(
        256,
        ge=1,
        description="query rows per batched index search (concurrent matches of a "
        "tenant coalesce into one search); tenants with waiting queries take turns round robin, "
        "one such search per turn, so no tenant waits behind another's backlog",
    )
    consistency_wait_ms: float = Field(
        2000.0,
        ge=0,
        le=60_000,
        description="how long a match or verify carrying X-Consistency-Token (a gallery write's "
        "token) waits for this replica's indexes to reach that write before answering 503 "
        "not_caught_up",
    )
    search_lanes: int = Field(
        0,
        ge=0,
        description="batched index searches running at once (each in its own thread, one "
        "OpenMP thread each by default), so that one busy tenant's searches use several cores "
        "while the event loop answers; a tenant's waiting queries are shared among the free "
        "lanes. 0: one per core but one, left to the event loop (so 1 on a 2-core machine; "
        "always 1 on a GPU FAISS index, whose resources are not for concurrent use)",
    )
    search_max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="how long a batched search waits for more queries (until its "
        "oldest has waited this long); 0: only queries that arrived while earlier searches ran "
        "join it",
    )

    # --- metrics and monitoring ------------------------------------------------------------
    tenant_label_cap: int = Field(
        50, ge=0, description="distinct tenant label values in metrics; the rest are 'other'"
    )
    monitor_enabled: bool = Field(
        True, description="compute live FAR/FRR and OPIS in the background (/v1/monitor)"
    )
    monitor_interval_s: float = Field(
        60.0, gt=0, description="how often the monitor recomputes (or adopts) its snapshot"
    )
    monitor_window_s: float = Field(
        24 * 3600.0, gt=0, description="sliding window of feedback the snapshot covers"
    )
    idempotency_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="how long an enrolment's Idempotency-Key is remembered: a "
        "resend within it gets the first answer",
    )
    match_retention_days: float = Field(
        90.0,
        gt=0,
        description="match records (with their feedback) older than this are "
        "deleted, checked every few minutes; at least the monitor's window",
    )
    match_retention_per_tenant: int = Field(
        1_000_000, ge=1, description="match records kept per tenant at most (the oldest go first)"
    )
    monitor_min_pairs: int = Field(
        20, ge=1, description="genuine and impostor pairs a tenant needs to enter OPIS"
    )
    monitor_max_gallery_items: int = Field(
        1000, ge=2, description="gallery items per tenant sampled for gallery pairs"
    )
    monitor_max_pairs: int = Field(
        20_000, ge=1, description="labelled pairs kept per tenant, kind and source"
    )
    monitor_min_subjects: int = Field(
        5,
        ge=2,
        description="eligible subjects (2+ images, or feedback pairs) OPIS across "
        "subjects needs, per tenant and pooled",
    )
    monitor_reference_draws: int = Field(
        20,
        ge=2,
        description="held-out galleries, shaped like a live one, the across-subjects "
        "reference is measured on",
    )

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(STORE_SCHEMES):
            raise ValueError(
                f"store_url must start with one of {STORE_SCHEMES} (got {v!r}); e.g. "
                "sqlite:///./data/tcm.db or redis://localhost:6379/0"
            )
        if v.startswith("sqlite:///") and v.removeprefix("sqlite:///") in ("", ":memory:"):
            raise ValueError("store_url needs a file path: an in-memory SQLite would lose data")
        if v.startswith(SENTINEL_SCHEME):
            SentinelURL.parse(v)  # a malformed one stops the process at start-up
        if v.startswith(CLUSTER_SCHEME):
            ClusterURL.parse(v)
        return v

    @model_validator(mode="after")
    def _retention_covers_the_window(self) -> Settings:
        if self.match_retention_days * 86400.0 < self.monitor_window_s:
            raise ValueError(
                f"match_retention_days ({self.match_retention_days}) must cover "
                f"monitor_window_s ({self.monitor_window_s} s): the monitor reads "
                "the feedback of its window"
            )
        return self

    @model_validator(mode="after")
    def _cluster_prefix_has_no_hash_tag(self) -> Settings:
        if self.store_url.startswith(CLUSTER_SCHEME) and any(
            c in self.redis_key_prefix for c in "{}"
        ):
            raise ValueError(
                f"redis_key_prefix {self.redis_key_prefix!r} must not contain braces on Redis "
                "Cluster: each tenant's keys carry the tenant as their hash tag"
            )
        return self

    @model_validator(mode="after")
    def _groups_need_a_shared_store(self) -> Settings:
        if self.shard_group is not None:
            if self.store_url.startswith("sqlite:///"):
                raise ValueError(
                    "shard_group needs a shared Redis store (store_url redis://, "
                    "redis+sentinel:// or redis+cluster://): one SQLite file serves one process"
                )
            if self.advertise_url is None:
                raise ValueError(
                    "shard_group needs advertise_url, the http://host:port other replicas "
                    "forward this group's requests to"
                )
        return self

    @model_validator(mode="after")
    def _wait_fits_the_socket_timeout(self) -> Settings:
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.store_timeout_s * 1000:
            raise ValueError(
                f"redis_wait_timeout_ms ({self.redis_wait_timeout_ms}) must be shorter than "
                f"store_timeout_s ({self.store_timeout_s} s): the socket would give up first"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_one_image(self) -> Settings:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) must be at least "
                f"max_image_pixels ({self.max_image_pixels}): one image of the "
                "largest size must fit a request"
            )
        return self

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("admin_token must be at least 16 characters long")
        return v

    @field_validator("index_factory")
    @classmethod
    def _no_idmap_in_factory(cls, v: str) -> str:
        if "IDMap" in v:
            raise ValueError("index_factory must not contain IDMap: the service adds IDMap2")
        return v
