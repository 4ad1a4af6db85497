"""Live threshold-consistency monitoring, run in the background of the service.

Every ``interval_s`` a :class:`Monitor` reads each tenant's labelled pairs from the store
(feedback in the sliding window, a deterministic sample of gallery pairs), computes the snapshot
(:func:`service.monitoring.compute_snapshot`: per-tenant FAR/FRR/utility at tau, OPIS and
eps-OPIS across tenants vs the model's baseline, score histograms) in a worker thread, stores it
(``Store.put_monitor_snapshot``) and exposes it on ``/metrics``. Nothing of this runs on the
request path: the request path only counts ``tcm_decisions_total`` (``Matcher.feedback``).

Replicas sharing a store share the snapshot: a replica adopts the stored one while it is younger
than half an interval and was computed for the same model and configuration, else computes and
stores its own. Two replicas racing compute the same numbers from the same store (gallery samples
are seeded by tenant and model), so the race is harmless. Between its own refreshes a replica
polls the store (every ``poll_s``, a few seconds) and publishes a newer stored snapshot at once:
without that, replicas whose schedules are out of phase would each report a different snapshot,
taking turns to compute, and never agree; with it they report the same one within ``poll_s`` of
its computation.

``GET /v1/monitor`` serves the snapshot (a tenant sees only its own row) and a what-if view at a
candidate threshold, computed from the snapshot's pairs: those the monitor just computed from are
kept in memory (up to ``whatif_cache_pairs``), others are reloaded once per snapshot, so a
what-if costs O(tenants * log pairs) once loaded and at most one bounded reload per tenant and
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.domain.model_registry import ModelRegistry
from service.errors import StoreUnavailableError
from service.metrics import ServiceMetrics
from service.monitoring import (
    LabelledScores,
    MonitorConfig,
    MonitorMetrics,
    compute_snapshot,
    feedback_scores,
    gallery_scores,
    seed_for,
    tenant_view,
    what_if,
)
from service.monitoring.snapshot import grid_of
from service.monitoring.snapshot_schema import (
    MonitorSnapshot,
    TenantMonitorSnapshot,
    TenantsReference,
    from_stored,
    to_stored,
)
from service.monitoring.subjects import (
    DEVIATION_KIND,
    TenantSubjects,
    tenant_reference,
    tenant_subjects,
)
from service.store import Store
from tcm import Manifest, load_cohort, load_reference, utility
from tcm.asnorm import Cohort, CohortStats
from tcm.drift import Summary, matched_reference

log = logging.getLogger(__name__)

Pairs = dict[str, LabelledScores]  # source -> labelled scores of one tenant
REFERENCE_CACHE = 1024  # (tenant, gallery shape)s whose count-matched reference draws are kept


class PairCache:
    """Tenants' pairs of one snapshot, least recently used first out, at most ``budget``
    pairs in all (a tenant larger than the budget is not cached)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._key: Hashable = None
        self._entries: OrderedDict[str, Pairs] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def reset(self, key: Hashable, pairs: Mapping[str, Pairs] | None = None) -> None:
        with self._lock:
            self._reset(key)
            for t, parts in (pairs or {}).items():
                self._put(t, parts)

    def get_many(
        self, key: Hashable, tenants: Sequence[str], load: Callable[[list[str]], dict[str, Pairs]]
    ) -> dict[str, Pairs]:
        """The tenants' pairs for snapshot ``key``, loading those not cached (outside the
        lock). ``key=None`` (no snapshot yet) loads without caching."""
        found: dict[str, Pairs] = {}
        with self._lock:
            if key is None or key != self._key:
                self._reset(key)
            for t in tenants:
                if t in self._entries:
                    self._entries.move_to_end(t)
                    found[t] = self._entries[t]
        missing = [t for t in tenants if t not in found]
        if missing:
            loaded = load(missing)
            with self._lock:
                if key is not None and key == self._key:
                    for t in missing:
                        self._put(t, loaded[t])
            found.update(loaded)
        return {t: found[t] for t in tenants}

    def _reset(self, key: Hashable) -> None:
        self._key = key
        self._entries.clear()
        self._size = 0

    def _put(self, tenant: str, parts: Pairs) -> None:
        size = sum(p.size for p in parts.values())
        if size > self.budget or tenant in self._entries:
            return
        while self._entries and self._size + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self._size -= sum(p.size for p in old.values())
        self._entries[tenant] = parts
        self._size += size


class Monitor:
    """Recomputes the snapshot on a schedule in a worker thread and publishes it.

    ``refresh()`` is the blocking unit of work (tests call it directly); ``start()`` /
    ``close()`` run it every ``config.interval_s`` (with a little jitter so that replicas
    spread out) on an asyncio task that never blocks the event loop.
    """

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        metrics: ServiceMetrics,
        config: MonitorConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        artefact_path: Path | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.config = config or MonitorConfig(tenant_label_cap=metrics.tenant_label.cap)
        if self.config.tenant_label_cap != metrics.tenant_label.cap:
            raise ValueError(
                "the monitor's tenant_label_cap must be the service metrics' one "
                f"({self.config.tenant_label_cap} != {metrics.tenant_label.cap})"
            )
        self.clock = clock
        self.labels = metrics.tenant_label
        self.metrics = MonitorMetrics(metrics.registry, manifest, self.config)
        self.pairs = PairCache(self.config.whatif_cache_pairs)
        self._key = self.config.key(manifest.model_version)
        self._refresh_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._wake = asyncio.Event()  # a model switch: refresh now
        self._reference_lock = threading.Lock()
        self._reference_cache: OrderedDict[tuple[str, tuple[int, ...]], list[Summary]] = (
            OrderedDict()
        )
        self._cohort = self._load_cohort(artefact_path)
        self._reference_data = self._load_reference(artefact_path)

    def _load_cohort(self, path: Path | None) -> Cohort | None:
        """The artefact's AS-norm cohort: with one, every pair the monitor scores is scored
        as the service decides it (AS-normalised, in the threshold's units). The service
        refused the artefact already if the cohort does not fit it."""
        return None if path is None else load_cohort(path, self.manifest)

    def _reference_stats(self) -> CohortStats | None:
        ref = self._reference_data
        if ref is None or self._cohort is None:
            return None
        x = ref[0] / np.maximum(np.linalg.norm(ref[0], axis=1, keepdims=True), 1e-12)
        return self._cohort.stats(x)

    def _load_reference(self, path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The artefact's held-out embeddings (None: an older artefact without them)."""
        if path is None:
            return None
        try:
            ref = load_reference(path, self.manifest)
        except Exception as exc:  # an unreadable file: the baseline fallback, said in the log
            log.warning(
                "cannot read the artefact's reference embeddings (%s); OPIS across "
                "subjects falls back to the manifest baseline",
                exc,
            )
            return None
        return None if ref is None else (ref[0].numpy(), ref[1].numpy())

    def set_manifest(self, manifest: Manifest, path: Path | None = None) -> None:
        """After a model switch: the new model's baseline, threshold and version; the
        snapshot is recomputed at once (the old one was computed for the old model). Called
        on the event loop; a refresh already running finishes for the old model and the one
        woken here follows it."""
        self.manifest = manifest
        self.metrics.snapshot.manifest = manifest
        self._key = self.config.key(manifest.model_version)
        self.pairs.reset(None)
        self.metrics.snapshot.snapshot = None
        with self._reference_lock:
            self._reference_cache.clear()
            self._cohort = self._load_cohort(path)
            self._reference_data = self._load_reference(path)
        self._wake.set()

    # -- the current numbers --
    @property
    def snapshot(self) -> MonitorSnapshot | None:
        return self.metrics.snapshot.snapshot

    def view(self, tenant_id: str | None = None) -> MonitorSnapshot | TenantMonitorSnapshot | None:
        """The snapshot (admin), or what ``tenant_id`` may see of it; None before the first."""
        snap = self.snapshot
        if snap is None or tenant_id is None:
            return snap
        return tenant_view(snap, tenant_id)

    # -- blocking work (worker thread) --
    def load_scores(self, tenant_ids: Sequence[str], *, now: float) -> dict[str, Pairs]:
        """Each tenant's labelled pairs as of ``now``: feedback on decisions made in
        ``(now - window, now]`` and labelled by ``now``, and its gallery's sampled pairs."""
        return {t: self._load(t, now=now, subjects=False)[0] for t in tenant_ids}

    def _load(self, t: str, *, now: float, subjects: bool) -> tuple[Pairs, TenantSubjects | None]:
        cfg, version = self.config, self.manifest.model_version
        decisions = self.store.list_decisions(t, since=now - cfg.window_s, labelled_only=True)
        vectors = self.store.gallery_vectors(t, model_version=version)
        seed = seed_for(t, version)
        pairs = {
            "feedback": feedback_scores(
                decisions,
                model_version=version,
                until=now,
                max_pairs=cfg.max_pairs,
                bounded=self._cohort is None,
            ),
            "gallery": gallery_scores(
                vectors.subjects,
                vectors.vectors,
                max_items=cfg.max_gallery_items,
                max_pairs=cfg.max_pairs,
                seed=seed,
                cohort=self._cohort,
            ),
        }
        per_subject = None
        if subjects:
            per_subject = tenant_subjects(
                vectors.subjects,
                vectors.vectors,
                decisions,
                grid=grid_of(self.manifest),
                max_items=cfg.max_gallery_items,
                seed=seed,
                model_version=version,
                until=now,
                cohort=self._cohort,
            )
        return pairs, per_subject

    def reference_draws(self, tenant: str, counts: tuple[int, ...]) -> list[Summary]:
        """Count-matched reference draws for a tenant's gallery shape, seeded by tenant and
        shape: two tenants of one shape get independent draws, so the pooled reference (draw r
        of every tenant) narrows as tenants are added, as the pooled live value does. Cached
        per (tenant, shape), least recently used first out (galleries change slowly; the cache
        is cleared at a model switch)."""
        ref = self._reference_data
        assert ref is not None
        key = (tenant, counts)
        with self._reference_lock:
            if key in self._reference_cache:
                self._reference_cache.move_to_end(key)
                return self._reference_cache[key]
        draws = matched_reference(
            ref[0],
            ref[1],
            counts,
            grid_of(self.manifest),
            self.config.rules,
            draws=self.config.reference_draws,
            seed=self.reference_seed(tenant, counts),
            stats=self._reference_stats(),
        )
        with self._reference_lock:
            self._reference_cache[key] = draws
            while len(self._reference_cache) > REFERENCE_CACHE:
                self._reference_cache.popitem(last=False)
        return draws

    def reference_seed(self, tenant: str, counts: tuple[int, ...]) -> int:
        """The seed of a tenant's reference draws (every replica derives it alike)."""
        return seed_for(self.manifest.model_version, "reference", tenant, repr(tuple(counts)))

    def exportable_ratio(self, tenant: str) -> float | None:
        """Share of the tenant's gallery items with a stored image (what ``export-dataset``
        can train on; items enrolled as embeddings cannot be); None without items. One pass
        over the items' headers (no embeddings, no images)."""
        total = with_image = 0
        after = 0
        while True:
            page = self.store.list_items(tenant, after_seq=after, limit=1000)
            if not page:
                break
            total += len(page)
            with_image += sum(1 for it in page if it.has_image)
            after = page[-1].seq
        return with_image / total if total else None

    def compute(self) -> MonitorSnapshot:
        now = self.clock()
        tenants = [t.tenant_id for t in self.store.list_tenants()]
        loaded = {t: self._load(t, now=now, subjects=True) for t in tenants}
        scores = {t: v[0] for t, v in loaded.items()}
        subjects = {t: v[1] for t, v in loaded.items() if v[1] is not None}
        reference = self.reference_draws if self._reference_data is not None else None
        snap = compute_snapshot(
            scores,
            manifest=self.manifest,
            config=self.config,
            tenant_order=tenants,
            now=now,
            subjects=subjects,
            reference=reference,
        )
        for t in tenants:
            ratio = self.exportable_ratio(t)
            if ratio is not None and t in snap.tenants:
                snap.tenants[t].exportable_ratio = ratio
        ref, members = self._stored_reference()
        if ref is None:  # first snapshot of this version where it is defined: measure it
            ref = self.store_tenants_reference(snap, subjects, only_if_missing=True)
        elif ref.deviation_kind != DEVIATION_KIND or self.members_changed(members, snap):
            # tenants joined or left (or an earlier version measured it): re-measure
            ref = self.store_tenants_reference(
                snap, subjects, only_if_missing=False, replace=True, previous=members
            )
        snap.tenants_reference = ref
        self.pairs.reset(self._snapshot_id(snap), scores)
        return snap

    # -- the across-tenants reference (in the model registry) --
    def tenants_reference(self) -> TenantsReference | None:
        """This version's across-tenants reference from the registry (None: not measured)."""
        return self._stored_reference()[0]

    def _stored_reference(self) -> tuple[TenantsReference | None, list[str] | None]:
        """This version's reference and the tenants it was measured on (None: measured before
        the registry kept them)."""
        doc, _ = self.store.get_model_registry()
        version = self.manifest.model_version
        ref = ((doc or {}).get("tenant_references") or {}).get(version)
        members = ((doc or {}).get("tenant_reference_members") or {}).get(version)
        return (None if ref is None else TenantsReference.model_validate(ref)), members

    @staticmethod
    def members_changed(members: Sequence[str] | None, snap: MonitorSnapshot) -> bool:
        """Whether the eligible tenants differ from those the reference was measured on: one
        joined, or left (deleted, or too few pairs now). Then the reference is re-measured at
        once, so that it follows the fleet: a healthy fleet that grew does not keep a bound
        measured on 2 tenants, and a bound an outlier widened does not outlive it. A drifting
        tenant that joins does not become the reference: the measurement leaves out a tenant
        that would alert against the others (:func:`tenant_reference`, 3 or more tenants). A
        reference stored without its members (by an earlier version) is re-measured once."""
        if members is None:
            return True
        eligible = {t for t, row in snap.tenants.items() if row.eligible}
        return eligible != set(members)

    def measure_tenants_reference(
        self, snap: MonitorSnapshot, subjects: Mapping[str, TenantSubjects]
    ) -> TenantsReference | None:
        measured = self._measure_tenants_reference(snap, subjects)
        return None if measured is None else measured[0]

    def _measure_tenants_reference(
        self, snap: MonitorSnapshot, subjects: Mapping[str, TenantSubjects]
    ) -> tuple[TenantsReference, list[str]] | None:
        """The reference on ``snap``'s data, and the tenants it was measured on (sorted)."""
        cal = self.manifest.calibration
        cal_error = 1.0 - float(
            utility(np.array([1.0 - cal.frr_at_tau]), np.array([1.0 - cal.far_at_tau]), cal.beta)[0]
        )
        eligible = [t for t, row in snap.tenants.items() if row.eligible]
        ref = tenant_reference(
            subjects,
            eligible,
            grid=grid_of(self.manifest),
            eps=self.manifest.baseline.eps,
            level=self.config.interval_level,
            resamples=self.config.bootstrap_resamples,
            seed=seed_for(self.manifest.model_version, "tenants"),
            calibration_error=cal_error,
            outlier_factor=self.config.outlier_factor,
            outlier_floor=self.config.outlier_floor,
        )
        if ref is None:
            return None
        ref.pop("members")
        members = sorted(eligible)
        fb = snap.global_.by_source.feedback
        return TenantsReference(
            **ref,
            model_version=self.manifest.model_version,
            measured_at=snap.computed_at,
            feedback_pairs=fb.genuine_pairs + fb.impostor_pairs,
            min_pairs=self.config.min_pairs,
        ), members

    def store_tenants_reference(
        self,
        snap: MonitorSnapshot,
        subjects: Mapping[str, TenantSubjects],
        *,
        only_if_missing: bool,
        replace: bool = False,
        previous: list[str] | None = None,
    ) -> TenantsReference | None:
        """Measures the across-tenants reference on ``snap``'s data and writes it to the
        registry with the tenants it was measured on (``tenant_reference_members``), and
        returns the stored one. ``only_if_missing``: unless a replica already stored one.
        ``replace``: after a departure, replaces the reference measured on ``previous`` (a
        replica that replaced it first wins); a departure that leaves it undefined (fewer than
        2 tenants) removes it, to be measured again once defined."""
        measured = self._measure_tenants_reference(snap, subjects)
        version = self.manifest.model_version
        if measured is None and not replace:
            return None
        ref = None if measured is None else measured[0].model_dump(mode="json")
        members = None if measured is None else measured[1]

        def put(doc: dict[str, Any]) -> dict[str, Any]:
            refs = dict(doc.get("tenant_references") or {})
            who = dict(doc.get("tenant_reference_members") or {})
            if replace:
                write = version in refs and who.get(version) == previous
            else:
                write = not (only_if_missing and version in refs)
            if write:
                if ref is None:
                    refs.pop(version, None)
                    who.pop(version, None)
                else:
                    refs[version], who[version] = ref, members
            keep = set(doc["versions"]) | {version}
            doc["tenant_references"] = {v: r for v, r in refs.items() if v in keep}
            doc["tenant_reference_members"] = {
                v: m for v, m in who.items() if v in keep and v in refs
            }
            return doc

        doc = ModelRegistry(self.store).update(put)
        stored = doc["tenant_references"].get(version)
        return None if stored is None else TenantsReference.model_validate(stored)

    def remeasure_tenants_reference(self) -> TenantsReference | None:
        """On demand (admin): the across-tenants reference from the data as of now, replacing
        the stored one; the snapshot is recomputed against it. None when undefined."""
        with self._refresh_lock:
            now = self.clock()
            tenants = [t.tenant_id for t in self.store.list_tenants()]
            loaded = {t: self._load(t, now=now, subjects=True) for t in tenants}
            scores = {t: v[0] for t, v in loaded.items()}
            subjects = {t: v[1] for t, v in loaded.items() if v[1] is not None}
            snap = compute_snapshot(
                scores, manifest=self.manifest, config=self.config, tenant_order=tenants, now=now
            )
            ref = self.store_tenants_reference(snap, subjects, only_if_missing=False)
        if ref is not None:
            self.refresh(force=True)
        return ref

    def is_current(self, snap: MonitorSnapshot | None) -> bool:
        """Computed for this model and configuration less than half an interval ago: a
        replica's fresh snapshot is adopted, but one that would be an interval old by the next
        cycle is recomputed, so the numbers are never much more than an interval stale."""
        if snap is None or snap.config_key != self._key:
            return False
        age = self.clock() - snap.computed_at
        return -self.config.interval_s < age < 0.5 * self.config.interval_s

    def stored_snapshot(self) -> MonitorSnapshot | None:
        """The store's snapshot if it was computed for this model and configuration (the key
        is read before the rest: another configuration's, or another format's, is not ours to
        parse), else None."""
        doc = self.store.get_monitor_snapshot()
        if doc is None or doc.get("config_key") != self._key:
            return None
        return from_stored(doc)

    def refresh(self, *, force: bool = False) -> MonitorSnapshot:
        """Adopts the stored snapshot if current (unless ``force``), else computes and stores
        one; publishes it. Raises (and counts a failed run) when the store is unavailable."""
        with self._refresh_lock:
            try:
                stored = None if force else self.stored_snapshot()
                if stored is not None and self.is_current(stored):
                    self.publish(stored)
                    self.metrics.runs.labels(result="adopted").inc()
                    return stored
                started = time.perf_counter()
                snap = self.compute()
                self.metrics.compute_seconds.observe(time.perf_counter() - started)
                self.store.put_monitor_snapshot(to_stored(snap))
            except Exception:
                self.metrics.runs.labels(result="failed").inc()
                raise
            self.publish(snap)
            self.metrics.runs.labels(result="computed").inc()
            return snap

    @property
    def poll_s(self) -> float:
        """How often, between refreshes, the store is checked for a replica's newer snapshot."""
        return max(0.2, min(5.0, self.config.interval_s / 4))

    def adopt_newer(self) -> bool:
        """Publishes the stored snapshot if a replica computed it after the reported one (for
        this model and configuration); one store read, no pairs. Skipped while a refresh is
        under way (it publishes the newest anyway)."""
        if not self._refresh_lock.acquire(blocking=False):
            return False
        try:
            stored = self.stored_snapshot()
            if stored is None:
                return False
            current = self.snapshot
            stored_at = stored.computed_at
            if current is not None and stored_at <= current.computed_at:
                return False
            if stored_at - self.clock() > self.config.interval_s:  # from a clock far ahead
                return False
            self.publish(stored)
            self.metrics.runs.labels(result="adopted").inc()
            return True
        finally:
            self._refresh_lock.release()

    def publish(self, snap: MonitorSnapshot) -> None:
        """Makes ``snap`` the reported one, and re-applies the tenant label policy to the
        snapshot's tenants so that the request-path counters use the same labels."""
        self.labels.sync(list(snap.tenants))
        self.metrics.snapshot.snapshot = snap

    def what_if(self, threshold: float, tenant_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-tenant FAR/FRR at ``threshold`` from the current snapshot's pairs (all tenants,
        or only ``tenant_ids``; pooled over tenants only for all). Blocking: run it in a
        thread pool. Before the first snapshot the pairs are read as of now, uncached."""
        snap = self.snapshot
        if snap is not None:
            key: Hashable = self._snapshot_id(snap)
            now = snap.computed_at
            everyone = list(snap.tenants)
        else:
            key, now = None, self.clock()
            everyone = [t.tenant_id for t in self.store.list_tenants()]
        wanted = everyone if tenant_ids is None else list(dict.fromkeys(tenant_ids))
        pairs = self.pairs.get_many(key, wanted, lambda ts: self.load_scores(ts, now=now))
        cal = self.manifest.calibration
        result = what_if(
            pairs,
            threshold,
            tau=cal.tau,
            beta=cal.beta,
            include_pooled=tenant_ids is None,
            units=self.manifest.threshold_units,
        )
        result.update(
            in_calibration_range=cal.tau_lo <= threshold <= cal.tau_hi,
            tau_lo=cal.tau_lo,
            tau_hi=cal.tau_hi,
            pairs_as_of=now,
            window_s=self.config.window_s,
        )
        return result

    @staticmethod
    def _snapshot_id(snap: MonitorSnapshot) -> Hashable:
        return (snap.config_key, snap.computed_at)

    # -- the schedule --
    async def start(self) -> Monitor:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="tcm-monitor")
        return self

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stops the schedule, letting a refresh in progress finish (up to ``timeout_s``) so
        that it does not outlive the store it reads."""
        if self._task is None:
            return
        assert self._stop is not None
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.warning("monitor refresh still running after %.0fs; abandoning it", timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _run(self) -> None:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:
                unavailable = isinstance(exc, StoreUnavailableError)
                log.warning(
                    "monitor refresh failed, retrying next interval: %s",
                    exc.message if unavailable else exc,  # type: ignore[attr-defined]
                    exc_info=not unavailable,
                )
            next_refresh = loop.time() + self.config.interval_s * random.uniform(0.95, 1.05)
            while not self._stop.is_set():
                if self._wake.is_set():
                    self._wake.clear()
                    break
                wait = min(self.poll_s, next_refresh - loop.time())
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
                if self._stop.is_set() or loop.time() >= next_refresh:
                    break
                try:  # a replica's newer snapshot, published now rather than next interval
                    await asyncio.to_thread(self.adopt_newer)
                except Exception as exc:  # the next refresh reports (and counts) failures
                    log.debug("polling the store for a newer snapshot failed: %s", exc)
