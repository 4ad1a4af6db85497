"""The pure parts of live monitoring: labelled pairs, the snapshot, and its exposition.

``pairs`` turns feedback and galleries into labelled scores, ``snapshot`` turns those into
per-tenant rates and OPIS across tenants (a ``snapshot_schema.MonitorSnapshot``, the one
definition of the snapshot), ``exposition`` shows a snapshot to Prometheus. The
scheduling, the store and the what-if cache live in :mod:`service.monitoring.monitor`.
"""

from service.monitoring.exposition import MonitorMetrics, SnapshotCollector
from service.monitoring.pairs import (
    KINDS,
    SOURCES,
    LabelledScores,
    feedback_scores,
    gallery_scores,
    seed_for,
)
from service.monitoring.snapshot import (
    POOLED,
    MonitorConfig,
    compute_snapshot,
    error_rates,
    score_buckets,
    tenant_view,
    what_if,
)

__all__ = [
    "KINDS",
    "POOLED",
    "SOURCES",
    "LabelledScores",
    "MonitorConfig",
    "MonitorMetrics",
    "SnapshotCollector",
    "compute_snapshot",
    "error_rates",
    "feedback_scores",
    "gallery_scores",
    "score_buckets",
    "seed_for",
    "tenant_view",
    "what_if",
]
