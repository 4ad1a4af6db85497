"""The service's Prometheus metrics, created against a registry owned by the app.

Names follow ``tcm_<noun>_<unit>``; counters end in ``_total``. A tenant label is capped
(``tenant_label_cap``): the oldest tenants keep their id as label value, later ones are reported
as ``other``, so a large deployment cannot blow up the series count. The monitor's metrics
(``service.monitoring``) use the same :class:`TenantLabels`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OTHER_TENANTS = "other"

# Where a labelled 1:N decision falls in the confusion matrix: the one definition of the outcome
# names (the store's feedback records, the API's feedback response, the ``outcome`` label of
# tcm_decisions_total and the monitor's counts all use it). A 1:N decision is on a *probe*:
#
#   genuine probe (its subject is enrolled)     impostor probe (its subject is not enrolled)
#     true_accept   accepted as its own subject   false_accept  accepted (as anyone)
#     wrong_accept  accepted as another subject   true_reject   rejected
#     false_reject  rejected (whoever ranked first)
#
# FRR = false_reject / genuine probes; wrong-accept rate = wrong_accept / genuine probes;
# FPIR (false positive identification rate) = false_accept / impostor probes. ``wrong_accept``
# is last so that the older four keep their order.
Outcome = Literal["true_accept", "false_accept", "true_reject", "false_reject", "wrong_accept"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
GENUINE_PROBE_OUTCOMES: tuple[Outcome, ...] = ("true_accept", "wrong_accept", "false_reject")
IMPOSTOR_PROBE_OUTCOMES: tuple[Outcome, ...] = ("false_accept", "true_reject")


def decision_outcome(*, accepted: bool, genuine: bool) -> Outcome:
    """The outcome of a decision (accepted or not) on a genuine or impostor pair (a pair has
    no wrong accept: see :func:`probe_outcome` for a 1:N probe)."""
    if accepted:
        return "true_accept" if genuine else "false_accept"
    return "false_reject" if genuine else "true_reject"


def probe_outcome(*, accepted: bool, enrolled: bool, top_is_own_subject: bool) -> Outcome:
    """The outcome of a 1:N decision on a probe: ``enrolled`` says whether the probe's subject
    is in the gallery (a genuine probe), ``top_is_own_subject`` whether the best candidate is of
    the probe's subject (the confusion matrix above)."""
    if not enrolled:
        return "false_accept" if accepted else "true_reject"
    if not accepted:
        return "false_reject"
    return "true_accept" if top_is_own_subject else "wrong_accept"


class TenantLabels:
    """Maps tenant ids to label values, at most ``cap`` distinct ones (plus ``other``).

    The policy is "the ``cap`` oldest tenants keep their id": at start-up the indexes are
    registered oldest first, and :meth:`sync` (called by the monitor with the store's tenant
    list) re-applies it, so that every replica, and every metric, folds the same tenants into
    ``other``. Between syncs a new tenant keeps its id while the cap has room.
    ``on_new_label`` is called once per label value handed out (to create series at 0).
    """

    def __init__(self, cap: int, *, on_new_label: Callable[[str], None] | None = None) -> None:
        self.cap = cap
        self._seen: set[str] = set()
        self._issued: set[str] = set()
        self._lock = threading.Lock()
        self._on_new_label = on_new_label

    def __call__(self, tenant_id: str) -> str:
        with self._lock:
            if tenant_id in self._seen:
                label = tenant_id
            elif len(self._seen) < self.cap:
                self._seen.add(tenant_id)
                label = tenant_id
            else:
                label = OTHER_TENANTS
        self._issue(label)
        return label

    def sync(self, tenant_ids_oldest_first: Sequence[str]) -> dict[str, str]:
        """Re-applies the policy to the current tenants; returns their label values."""
        ids = list(dict.fromkeys(tenant_ids_oldest_first))
        labels = tenant_label_values(ids, self.cap)
        with self._lock:
            self._seen = set(ids[: self.cap])
        for label in dict.fromkeys(labels.values()):
            self._issue(label)
        return labels

    def _issue(self, label: str) -> None:
        if label in self._issued:
            return
        with self._lock:
            if label in self._issued:
                return
            self._issued.add(label)
        if self._on_new_label is not None:
            self._on_new_label(label)


def tenant_label_values(tenant_ids_oldest_first: Sequence[str], cap: int) -> dict[str, str]:
    """The labelling policy as a pure function: the first ``cap`` tenants keep their id."""
    return {
        t: (t if i < cap else OTHER_TENANTS)
        for i, t in enumerate(dict.fromkeys(tenant_ids_oldest_first))
    }


class TenantInfoCollector:
    """``tcm_tenant_info{tenant, name} 1``: the name of each tenant that keeps its id as label
    value (at most the label cap), so that dashboards and alerts show names with
    ``* on(tenant) group_left(name) tcm_tenant_info``; tenants folded into ``other`` share the
    name ``other``. Set from the store's tenant list (:meth:`ServiceMetrics.set_tenant_names`)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.names: dict[str, str] = {}
        self.updated_at: float | None = None  # time.monotonic() of the last update

    def set(self, tenants_oldest_first: Sequence[tuple[str, str]]) -> None:
        labels = tenant_label_values([t for t, _ in tenants_oldest_first], self.cap)
        self.names = {
            labels[t]: (name if labels[t] == t else OTHER_TENANTS)
            for t, name in tenants_oldest_first
        }
        self.updated_at = time.monotonic()

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for label, name in sorted(self.names.items()):
            fam.add_metric([label, name], 1.0)
        yield fam

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "tcm_tenant_info",
            "a tenant's name (value 1) for each value of the capped tenant label "
            "(TCM_TENANT_LABEL_CAP; the tenants folded into 'other' are named 'other'): join "
            "it with * on(tenant) group_left(name) tcm_tenant_info",
            labels=["tenant", "name"],
        )


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry, *, tenant_label_cap: int) -> None:
        self.registry = registry
        self.tenant_label = TenantLabels(tenant_label_cap, on_new_label=self._init_tenant)
        self.tenant_info = TenantInfoCollector(tenant_label_cap)
        registry.register(self.tenant_info)
        self.request_seconds = Histogram(
            "tcm_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embed_batch_images = Histogram(
            "tcm_embed_batch_images",
            "images per forward pass of the embedding model",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.embed_queue_wait_seconds = Histogram(
            "tcm_embed_queue_wait_seconds",
            "time a request waited for its forward pass",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embed_forward_seconds = Histogram(
            "tcm_embed_forward_seconds",
            "duration of one batched forward pass",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embedded_images = Counter(
            "tcm_embedded_images_total", "images embedded by the model", registry=registry
        )
        self.index_search_seconds = Histogram(
            "tcm_index_search_seconds",
            "FAISS search latency",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gallery_items = Gauge(
            "tcm_gallery_items",
            "enrolled gallery items indexed for the active model",
            ["tenant"],
            registry=registry,
        )
        self.tenants = Gauge("tcm_tenants", "tenants known to this replica", registry=registry)
        self.match_decisions = Counter(
            "tcm_match_decisions_total",
            "1:N match decisions at the global threshold",
            ["tenant", "decision"],
            registry=registry,
        )
        self.verify_decisions = Counter(
            "tcm_verify_decisions_total",
            "1:1 verify decisions at the global threshold",
            ["tenant", "decision"],
            registry=registry,
        )
        self.decisions = Counter(
            "tcm_decisions_total",
            "1:N decisions labelled by feedback, by outcome at the decision's own threshold: "
            "genuine probes (subject enrolled) true_accept / wrong_accept (another subject) / "
            "false_reject, impostor probes (not enrolled) false_accept / true_reject. Per-tenant "
            "FPIR and FRR of probes: recording rules (tenant:tcm_fpir:*, tenant:tcm_frr:*)",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "tcm_rate_limited_total",
            "requests refused with 429 by the per-tenant rate limit",
            ["tenant"],
            registry=registry,
        )
        self.store_errors = Counter(
            "tcm_store_errors_total",
            "requests failed because the store was unavailable",
            registry=registry,
        )
        self.forwarded = Counter(
            "tcm_forwarded_requests_total",
            "requests of another shard group's tenant sent on to a replica of that group "
            "(outcome: answered, whatever its status; unreachable: no replica of it could be "
            "reached, a 503)",
            ["group", "outcome"],
            registry=registry,
        )
        self.match_records_deferred = Gauge(
            "tcm_match_records_deferred",
            "match records answered but not yet stored because their tenant's Redis Cluster "
            "shard had no master (a failover); written once it is back",
            registry=registry,
        )
        self.match_records_dropped = Counter(
            "tcm_match_records_dropped_total",
            "match records never stored: more than the cap per tenant waited for their shard "
            "(feedback on those matches answers 404)",
            registry=registry,
        )
        self.feed_resyncs = Counter(
            "tcm_change_feed_resyncs_total",
            "full index rebuilds because the store's change "
            "feed had lost entries this replica had not read yet",
            registry=registry,
        )
        self.quarantined = Counter(
            "tcm_quarantined_total",
            "stored data this replica could not put in an index and "
            "skipped so that the rest serves (logged with tenant and items): stage "
            "'startup' is a tenant's gallery at rebuild, 'change_feed' one feed entry",
            ["stage"],
            registry=registry,
        )
        for stage in ("startup", "change_feed"):
            self.quarantined.labels(stage=stage)
        self.model = Info("tcm_model", "the served model", registry=registry)
        self.model_activation_items = Gauge(
            "tcm_model_activation_items",
            "the activation in progress on this replica: "
            "gallery items in all (total), re-embedded with the new model (embedded), without "
            "a stored image to re-embed (skipped)",
            ["state"],
            registry=registry,
        )
        for state in ("total", "embedded", "skipped"):
            self.model_activation_items.labels(state=state)
        self.model_activation_running = Gauge(
            "tcm_model_activation_running",
            "1 while this replica prepares a model switch",
            registry=registry,
        )
        self.model_activations = Counter(
            "tcm_model_activations_total",
            "model switches on this replica by result",
            ["result"],
            registry=registry,
        )
        for result in ("completed", "failed"):
            self.model_activations.labels(result=result)
        self.threshold = Gauge(
            "tcm_model_threshold_score",
            "global cosine threshold tau of the served model",
            registry=registry,
        )
        self.expected_fpir = Gauge(
            "tcm_tenant_expected_fpir_ratio",
            "the FPIR the served model is expected to have at tau against this tenant's gallery "
            "(its subjects and their photo counts; tcm.openset.fpir_gallery), measured on its "
            "held-out classes; the FPIR target of tenant:tcm_fpir_target:ratio. Absent for an "
            "artefact without an open-set section, and for the folded 'other' label",
            ["tenant"],
            registry=registry,
        )
        self._openset: tuple[Any, float] | None = None  # (tcm.openset.ProbeTails, tau)
        self._gallery_fpir: Any | None = None  # tcm.openset.GalleryFpir at tau, or None
        self._fpir_by_shape: dict[tuple[tuple[int, int], ...], float] = {}
        self._gallery_totals: dict[str, int] = {}
        self._gallery_shapes: dict[str, dict[int, int]] = {}

    def _init_tenant(self, label: str) -> None:
        """The four outcome series start at 0, so FAR/FRR ratios exist before the first error
        (a missing series would make the rate ratio vanish instead of reading 0)."""
        for outcome in OUTCOMES:
            self.decisions.labels(tenant=label, outcome=outcome)

    def set_tenant_names(self, tenants_oldest_first: Sequence[tuple[str, str]]) -> None:
        """(tenant id, name) of every tenant, oldest first: sets ``tcm_tenant_info``."""
        self.tenant_info.set(tenants_oldest_first)

    def tenant_names_age(self) -> float | None:
        """Seconds since the tenant names were last set (None: never)."""
        at = self.tenant_info.updated_at
        return None if at is None else time.monotonic() - at

    def set_gallery_size(
        self, sizes: dict[str, int], shapes: dict[str, dict[int, int]] | None = None
    ) -> None:
        """Sets gallery sizes; tenants folded into ``other`` are summed. ``shapes`` (each
        tenant's ``{photos: subjects}``) makes the expected FPIR follow the gallery's subjects,
        not only its photo count (``tcm.openset.fpir_gallery``)."""
        totals: dict[str, int] = {}
        kept_shapes: dict[str, dict[int, int]] = {}
        for tenant, n in sizes.items():
            label = self.tenant_label(tenant)
            totals[label] = totals.get(label, 0) + n
            if shapes is not None and label != OTHER_TENANTS and tenant in shapes:
                kept_shapes[label] = shapes[tenant]
        for label, n in totals.items():
            self.gallery_items.labels(tenant=label).set(n)
        self.tenants.set(len(sizes))
        self._gallery_totals = totals
        self._gallery_shapes = kept_shapes
        self._publish_expected_fpir()

    def set_openset(self, tails: Any | None, tau: float) -> None:
        """The served model's open-set tails (``tcm.load_openset``; None: it has none) and
        tau: the expected FPIR at each tenant's gallery size follows from them."""
        from tcm.openset import GalleryFpir

        self._openset = None if tails is None else (tails, tau)
        self._gallery_fpir = (
            GalleryFpir.at(tails, tau) if tails is not None and tails.has_classes else None
        )
        self._fpir_by_shape = {}
        self._publish_expected_fpir()

    def _expected_fpir(self, label: str, n: int) -> float:
        """At the tenant's gallery shape where both it and class-keeping tails are known;
        otherwise as n photos of n subjects (tails written before they kept classes)."""
        from tcm.openset import fpir

        assert self._openset is not None
        shape = self._gallery_shapes.get(label)
        if self._gallery_fpir is None or not shape:
            tails, tau = self._openset
            return fpir(tails, tau, n)
        key = tuple(sorted(shape.items()))
        value = self._fpir_by_shape.get(key)
        if value is None:
            if len(self._fpir_by_shape) >= 4096:  # shapes change as galleries grow: bounded
                self._fpir_by_shape.clear()
            value = self._fpir_by_shape[key] = self._gallery_fpir(shape)
        return value

    def _publish_expected_fpir(self) -> None:
        self.expected_fpir.clear()
        if self._openset is None:
            return
        for label, n in self._gallery_totals.items():
            if label != OTHER_TENANTS and n >= 1:
                self.expected_fpir.labels(tenant=label).set(self._expected_fpir(label, n))

    def forget_tenant(self, tenant_id: str) -> None:
        label = self.tenant_label(tenant_id)
        if label != OTHER_TENANTS:
            with contextlib.suppress(KeyError):
                self.gallery_items.remove(label)
            with contextlib.suppress(KeyError):
                self.expected_fpir.remove(label)
            self._gallery_totals.pop(label, None)
            self._gallery_shapes.pop(label, None)


class RequestMetricsMiddleware:
    """Observes each request's latency under its route template (``/v1/gallery/{item_id}``),
    never the raw path, so ids do not become label values."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(
                method=scope.get("method", ""), route=template, status=str(status)
            ).observe(time.perf_counter() - start)
