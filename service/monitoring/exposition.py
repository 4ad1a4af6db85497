"""The monitor's Prometheus metrics.

The snapshot's numbers are exposed by a custom collector that reads the current snapshot at
scrape time: swapping the snapshot is one reference assignment, so a scrape sees the old numbers
or the new ones, never a mix. Every replica mirrors the same stored snapshot, so these gauges are
identical across replicas: aggregate them with ``max``, not ``sum``.

Score distributions are gauge histograms (``_bucket{le}``, ``_gcount``, ``_gsum``) of the pairs
in the monitor's window, not counters: read them directly, never with ``rate()``. FAR at a
threshold t that is a bucket bound: ``1 - bucket{le="t"} / gcount`` (scores equal to t count as
accepted, as the service decides, so for t on a bound this is exact only when no score equals t);
FRR at t: ``bucket{le="t"} / gcount`` up to the same tie.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric

from service.monitoring.pairs import KINDS
from service.monitoring.snapshot import POOLED, MonitorConfig
from service.monitoring.snapshot_schema import MonitorSnapshot, Rates, SubjectsReference
from tcm import Manifest

COMPUTE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _le(bound: float) -> str:
    return repr(float(bound))


class SnapshotCollector:
    """Exposes the model's reference points always, and the current snapshot once there is
    one (nothing is made up before the first snapshot; OPIS is absent while it cannot be
    computed, so alerts on it stay quiet)."""

    def __init__(self, manifest: Manifest, config: MonitorConfig) -> None:
        self.manifest = manifest
        self.config = config
        self.snapshot: MonitorSnapshot | None = None

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        cal, base = self.manifest.calibration, self.manifest.baseline
        fams["opis_baseline"].add_metric([], base.opis)
        fams["eps_baseline"].add_metric([], base.eps_opis)
        fams["target_far"].add_metric([], cal.target_far)
        fams["cal_far"].add_metric([], cal.far_at_tau)
        fams["cal_frr"].add_metric([], cal.frr_at_tau)
        fams["range"].add_metric(["lo"], cal.tau_lo)
        fams["range"].add_metric(["hi"], cal.tau_hi)
        fams["interval"].add_metric([], self.config.interval_s)
        snap = self.snapshot
        if snap is not None:
            _add_snapshot(fams, snap)
        yield from fams.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        rate = ["tenant", "source"]
        return {
            "opis": GaugeMetricFamily(
                "tcm_opis",
                "live OPIS across tenants over the model's calibration range "
                "(lower is more consistent); absent with fewer than 2 eligible tenants",
            ),
            "eps_opis": GaugeMetricFamily("tcm_eps_opis", "live eps-OPIS across tenants"),
            "opis_baseline": GaugeMetricFamily(
                "tcm_opis_baseline", "the model's OPIS on held-out classes (manifest)"
            ),
            "eps_baseline": GaugeMetricFamily(
                "tcm_eps_opis_baseline", "the model's eps-OPIS on held-out classes (manifest)"
            ),
            "far": GaugeMetricFamily(
                "tcm_tenant_far_ratio",
                "pair FAR at the global tau: share of a tenant's labelled impostor pairs "
                "scoring >= tau in the monitor's window, by source: gallery = pairs within the "
                "gallery, the pair FAR to compare with tcm_model_target_far_ratio; feedback = "
                "(probe, best candidate) of labelled 1:N decisions, best-of-N impostors (an "
                "identification rate: compare with an FPIR target, tenant:tcm_fpir_target:ratio); "
                "pooled = both. No alert reads it (TCMTenantFPIRHigh reads tcm_decisions_total)",
                labels=rate,
            ),
            "frr": GaugeMetricFamily(
                "tcm_tenant_frr_ratio",
                "pair FRR at the global tau: share of a tenant's labelled genuine pairs scoring "
                "< tau in the monitor's window, by pair source (feedback, gallery, pooled)",
                labels=rate,
            ),
            "utility": GaugeMetricFamily(
                "tcm_tenant_utility_ratio",
                "a tenant's F-beta utility of TPR and TNR at the global tau, by pair source",
                labels=rate,
            ),
            "pairs": GaugeMetricFamily(
                "tcm_tenant_pairs",
                "labelled pairs in the monitor's window behind a tenant's numbers",
                labels=["tenant", "kind", "source"],
            ),
            "tenants": GaugeMetricFamily(
                "tcm_monitor_tenants",
                "tenants in OPIS (eligible) or not (excluded: too few labelled pairs)",
                labels=["status"],
            ),
            "genuine": GaugeHistogramMetricFamily(
                "tcm_genuine_score",
                "scores of genuine pairs in the monitor's window (gauge "
                "histogram: FRR at t = bucket{le=t} / gcount)",
                labels=["tenant", "source"],
            ),
            "impostor": GaugeHistogramMetricFamily(
                "tcm_impostor_score",
                "scores of impostor pairs in the monitor's window (gauge "
                "histogram: FAR at t = 1 - bucket{le=t} / gcount)",
                labels=["tenant", "source"],
            ),
            "ts": GaugeMetricFamily(
                "tcm_monitor_snapshot_timestamp_seconds",
                "when the reported snapshot was computed (Unix time)",
            ),
            "window": GaugeMetricFamily(
                "tcm_monitor_window_seconds", "sliding window of feedback the snapshot covers"
            ),
            "interval": GaugeMetricFamily(
                "tcm_monitor_interval_seconds", "how often the snapshot is recomputed"
            ),
            "info": GaugeMetricFamily(
                "tcm_monitor_snapshot_info",
                "the model version the reported snapshot was computed for (value 1)",
                labels=["model_version"],
            ),
            "target_far": GaugeMetricFamily(
                "tcm_model_target_far_ratio",
                "the pair FAR the global tau was calibrated for (impostor pairs scoring >= tau): "
                "the target of the gallery pair FAR; a 1:N FPIR is compared with "
                "tenant:tcm_fpir_target:ratio = 1 - (1 - this)^(gallery items)",
            ),
            "cal_far": GaugeMetricFamily(
                "tcm_model_calibration_far_ratio", "global FAR at tau on the calibration set"
            ),
            "cal_frr": GaugeMetricFamily(
                "tcm_model_calibration_frr_ratio", "global FRR at tau on the calibration set"
            ),
            "range": GaugeMetricFamily(
                "tcm_model_calibration_range_score",
                "bounds of the calibration range OPIS averages over",
                labels=["bound"],
            ),
            # across subjects (classes = a tenant's subjects): live and count-matched reference
            "subj": GaugeMetricFamily(
                "tcm_subjects_opis",
                "live OPIS across a tenant's subjects (gallery and "
                "feedback pairs); absent with too few eligible subjects",
                labels=["tenant"],
            ),
            "subj_ref": GaugeMetricFamily(
                "tcm_subjects_opis_reference",
                "OPIS across held-out classes subsampled to the "
                "tenant's images per subject: interval bounds over the draws (lo, mid, hi)",
                labels=["tenant", "bound"],
            ),
            "subj_pooled": GaugeMetricFamily(
                "tcm_subjects_opis_pooled", "live OPIS across every tenant's subjects together"
            ),
            "subj_pooled_ref": GaugeMetricFamily(
                "tcm_subjects_opis_pooled_reference",
                "count-matched reference of the pooled OPIS across subjects (lo, mid, hi)",
                labels=["bound"],
            ),
            "subj_count": GaugeMetricFamily(
                "tcm_monitor_subjects",
                "subjects over all tenants with a utility curve "
                "(eligible) or not (excluded: too few pairs)",
                labels=["status"],
            ),
            # across tenants: the reference measured on the served galleries (registry)
            "ten_ref": GaugeMetricFamily(
                "tcm_tenants_opis_reference",
                "OPIS across tenants measured on the served "
                "galleries when the model started serving: lo/hi of its subject-bootstrap "
                "interval, mid = the measured value",
                labels=["bound"],
            ),
            "ten_eps_ref": GaugeMetricFamily(
                "tcm_tenants_eps_opis_reference",
                "eps-OPIS across tenants at the same time (lo, mid, hi)",
                labels=["bound"],
            ),
            "ten_dev_ref": GaugeMetricFamily(
                "tcm_tenants_deviation_reference",
                "the largest tenant shortfall below the other tenants' median utility "
                "curve in the across-tenants reference (bootstrap upper bound)",
            ),
            "deviation": GaugeMetricFamily(
                "tcm_tenant_deviation",
                "mean square over the calibration range of how far a tenant's utility "
                "curve lies below the median curve of the other tenants (0 where above: "
                "only worse than the fleet counts); absent for tenants not in OPIS",
                labels=["tenant"],
            ),
            "level_ref": GaugeMetricFamily(
                "tcm_tenant_gallery_reference_ratio",
                "FRR or utility at tau (rate) over every pair of count-matched reference "
                "galleries shaped like the tenant's (held-out classes at its images per "
                "subject): lo, mid, hi over the draws; compare with "
                'tcm_tenant_{frr,utility}_ratio{source="gallery"}',
                labels=["tenant", "rate", "bound"],
            ),
            "exportable": GaugeMetricFamily(
                "tcm_tenant_exportable_ratio",
                "share of a tenant's gallery items with a stored image, which "
                "export-dataset can retrain on (items enrolled as embeddings cannot be)",
                labels=["tenant"],
            ),
            "bound": GaugeMetricFamily(
                "tcm_monitor_score_bound",
                "each bucket bound (le) of the score histograms, as "
                "its value: dashboards order what-if thresholds by distance from tau",
                labels=["le"],
            ),
            "ten_ref_ts": GaugeMetricFamily(
                "tcm_tenants_reference_timestamp_seconds",
                "when the across-tenants reference was measured (Unix time)",
            ),
        }


def _add_interval(fam: Metric, labels: list[str], lo: float, mid: float, hi: float) -> None:
    for bound, value in (("lo", lo), ("mid", mid), ("hi", hi)):
        fam.add_metric([*labels, bound], value)


def _add_reference(fam: Metric, labels: list[str], ref: SubjectsReference | None) -> None:
    """A count-matched reference interval (the baseline fallback is not comparable: left out)."""
    if ref is not None and ref.matched:
        _add_interval(fam, labels, ref.lo, ref.mid, ref.hi)


def _add_drift(fams: dict[str, Metric], snap: MonitorSnapshot) -> None:
    """OPIS across subjects (tenants keeping their own label only: an ``other`` row would mix
    tenants) with count-matched references, and the across-tenants reference."""
    if snap.subjects is not None:
        pooled = snap.subjects.pooled
        if pooled.opis is not None:
            fams["subj_pooled"].add_metric([], pooled.opis)
        _add_reference(fams["subj_pooled_ref"], [], pooled.reference)
        rows = [r.subjects for r in snap.tenants.values() if r.subjects is not None]
        eligible = sum(r.eligible_subjects for r in rows)
        fams["subj_count"].add_metric(["eligible"], eligible)
        fams["subj_count"].add_metric(["excluded"], sum(r.subjects for r in rows) - eligible)
        for t, row in snap.tenants.items():
            if row.deviation is not None and row.label == t:
                fams["deviation"].add_metric([t], row.deviation)
            sub = row.subjects
            if sub is None or row.label != t:
                continue
            if sub.opis is not None:
                fams["subj"].add_metric([t], sub.opis)
            _add_reference(fams["subj_ref"], [t], sub.reference)
            lvl = sub.level_reference
            if lvl is not None and sub.reference is not None and sub.reference.matched:
                for rate, q in (("frr", lvl.frr), ("utility", lvl.utility)):
                    _add_interval(fams["level_ref"], [t, rate], q["lo"], q["mid"], q["hi"])
    ten = snap.tenants_reference
    if ten is not None:
        for name, value, interval in (
            ("ten_ref", ten.opis, ten.opis_interval),
            ("ten_eps_ref", ten.eps_opis, ten.eps_opis_interval),
        ):
            if interval is not None:
                _add_interval(fams[name], [], interval[0], value, interval[1])
        fams["ten_dev_ref"].add_metric([], ten.deviation["hi"])
        fams["ten_ref_ts"].add_metric([], ten.measured_at)


def _add_rates(fams: dict[str, Metric], labels: list[str], rates: Rates) -> None:
    for name, value in (("far", rates.far), ("frr", rates.frr), ("utility", rates.utility)):
        if value is not None:
            fams[name].add_metric(labels, value)


def _add_snapshot(fams: dict[str, Metric], snap: MonitorSnapshot) -> None:
    _add_drift(fams, snap)
    for t, row in snap.tenants.items():  # tenants keeping their own label only
        if row.exportable_ratio is not None and row.label == t:
            fams["exportable"].add_metric([t], row.exportable_ratio)
    if snap.opis is not None:
        fams["opis"].add_metric([], snap.opis)
    if snap.eps_opis is not None:
        fams["eps_opis"].add_metric([], snap.eps_opis)
    fams["ts"].add_metric([], snap.computed_at)
    fams["window"].add_metric([], snap.window_s)
    fams["info"].add_metric([snap.model_version], 1.0)
    fams["tenants"].add_metric(["eligible"], snap.eligible_tenants)
    fams["tenants"].add_metric(["excluded"], snap.tenants_total - snap.eligible_tenants)
    bounds = [_le(b) for b in snap.score_buckets]
    for le, b in zip(bounds, snap.score_buckets, strict=True):
        fams["bound"].add_metric([le], b)
    for label, row in snap.labels.items():
        by_source = list(row.by_source)  # (source, rates), in pairs.SOURCES order
        for src, rates in [*by_source, (POOLED, row.pooled)]:
            _add_rates(fams, [label, src], rates)
        for src, rates in by_source:
            fams["pairs"].add_metric([label, "genuine", src], rates.genuine_pairs)
            fams["pairs"].add_metric([label, "impostor", src], rates.impostor_pairs)
        for kind in KINDS:
            for src, h in row.histograms[kind].items():
                buckets = [(le, float(c)) for le, c in zip(bounds, h.buckets, strict=True)]
                buckets.append(("+Inf", float(h.count)))
                fams[kind].add_metric([label, src], buckets, gsum_value=h.sum)


class MonitorMetrics:
    """The monitor's own metrics, created once against the registry passed in."""

    def __init__(
        self, registry: CollectorRegistry, manifest: Manifest, config: MonitorConfig
    ) -> None:
        self.runs = Counter(
            "tcm_monitor_runs_total",
            "monitor cycles: computed a snapshot, adopted a replica's, or failed",
            ["result"],
            registry=registry,
        )
        for result in ("computed", "adopted", "failed"):
            self.runs.labels(result=result)
        self.compute_seconds = Histogram(
            "tcm_monitor_compute_duration_seconds",
            "time to compute one snapshot",
            buckets=COMPUTE_BUCKETS,
            registry=registry,
        )
        self.snapshot = SnapshotCollector(manifest, config)
        registry.register(self.snapshot)
