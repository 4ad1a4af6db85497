"""1:N match, 1:1 verify, and feedback on past matches.

One rule decides everywhere: a pair is accepted iff its score >= tau, the model's global
threshold. The score is the cosine, or, when the artefact carries an AS-norm cohort, the
AS-normalised cosine (``tcm.asnorm``: each side standardised by its top-k cohort scores; tau is
then calibrated in those units). Candidates are ranked by cosine either way, and a match is
decided by its best candidate (the best by cosine, at its normalised score). In verify, a
subject stands for its best matching enrolled item (the best cosine over the subject's items,
the same rule 1:N matching applies), so "is this the person enrolled as S?" gets the answer
match would give if S were the only subject in the gallery.

Every decision is stored (the monitor reads the store's records, on every replica alike).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.domain.inputs import InputResolver
from service.engine.index import Hit, IndexRegistry
from service.engine.metadata_filter import matches
from service.engine.pairwise import best_pair, max_inner_product
from service.engine.search import SearchBatcher
from service.errors import InvalidInputError, NotFoundError
from service.metrics import Outcome, ServiceMetrics, decision_outcome, probe_outcome
from service.store import Feedback, MatchRecord, Store
from tcm.asnorm import Cohort, as_norm

log = logging.getLogger(__name__)


def label_decision(
    match: MatchRecord,
    *,
    true_subject: str | None,
    subject_given: bool,
    correct: bool | None,
    enrolled: bool | None = None,
) -> tuple[bool | None, Outcome]:
    """Ground truth for a match -> (genuine, outcome).

    ``genuine`` is about the *pair* (query, best candidate): do they share a subject (None
    without a candidate or when only ``correct`` was given for a reject)? With ``true_subject``
    it is ``true_subject == top_subject``. With ``correct``, an accept that was correct is
    genuine and a wrong one is not; a reject that was correct is an impostor pair, a wrong one
    genuine.

    ``outcome`` is about the *probe*, the 1:N confusion matrix (``service.metrics``). With
    ``true_subject``: null means the probe's subject is not enrolled (an impostor probe); a
    subject that is the best candidate's is enrolled; any other names an enrolled subject iff
    ``enrolled`` (the caller looks it up in the gallery), so a probe of an enrolled subject
    ranked to someone else is a ``wrong_accept`` when accepted and a ``false_reject`` when
    rejected. With ``correct`` alone a wrong accept cannot be told from a false accept (is the
    probe's subject enrolled?): it counts as ``false_accept``; send ``true_subject`` to tell
    them apart.
    """
    top = match.top_subject
    if subject_given:
        own = top is not None and true_subject is not None and true_subject == top
        known: bool | None = own if top is not None else None
        probe_enrolled = true_subject is not None and (own or bool(enrolled))
        return known, probe_outcome(
            accepted=match.accepted, enrolled=probe_enrolled, top_is_own_subject=own
        )
    assert correct is not None
    genuine = correct if match.accepted else not correct
    known = genuine if top is not None else None
    return known, decision_outcome(accepted=match.accepted, genuine=genuine)


class VerifyOperand(Protocol):
    """One side of a verify (the API's ``VerifyInput``): exactly one of an image, an
    embedding, a gallery item or a whole subject."""

    @property
    def image(self) -> str | None: ...
    @property
    def embedding(self) -> Sequence[float] | None: ...
    @property
    def item_id(self) -> str | None: ...
    @property
    def subject(self) -> str | None: ...


class Matcher:
    def __init__(
        self,
        *,
        store: Store,
        indexes: IndexRegistry,
        resolver: InputResolver,
        metrics: ServiceMetrics,
        threshold: float,
        model_version: str,
        max_k: int,
        max_verify_pairs: int = 50_000_000,
        search: SearchBatcher | None = None,
        cohort: Cohort | None = None,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.search = search or SearchBatcher(indexes, max_batch=256)
        self.resolver = resolver
        self.metrics = metrics
        self.threshold = threshold
        self.model_version = model_version
        self.max_k = max_k
        self.max_verify_pairs = max_verify_pairs
        self.cohort = cohort

    def accepts(self, score: float) -> bool:
        return score >= self.threshold

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise InvalidInputError(
                f"k must lie in 1..{self.max_k}, got {k}",
                code="invalid_k",
                detail={"k": k, "max_k": self.max_k},
            )
        return k

    async def match(
        self, tenant_id: str, query: np.ndarray, k: int, where: Mapping[str, Any] | None = None
    ) -> tuple[MatchRecord, list[Hit]]:
        """``where``: a metadata filter, applied inside the index search (the k best among the
        items that pass it); the decision is the usual one over those candidates."""
        ((record, hits),) = await self.match_many(tenant_id, query.reshape(1, -1), k, where)
        return record, hits

    async def match_many(
        self, tenant_id: str, queries: np.ndarray, k: int, where: Mapping[str, Any] | None = None
    ) -> list[tuple[MatchRecord, list[Hit]]]:
        """1:N match of each row: one (batched) index search, one store write for all records,
        a match id per query. Filtered searches (``where``) go to the index directly: each
        filter is its own search, so they do not join the batch."""
        self.check_k(k)
        started = time.perf_counter()
        if where:
            all_hits, stored = await run_in_threadpool(
                self._search_and_store, tenant_id, queries, k, where
            )
        else:  # the records are written in the search's own thread hop, a turn at a time
            all_hits, stored = await self.search.search_then(
                tenant_id, queries, k, self._store_records
            )
        records = [record for record, _ in stored]
        searched = stored[0][1] if stored else time.perf_counter()
        self.metrics.index_search_seconds.observe(searched - started)  # not the record write
        label = self.metrics.tenant_label(tenant_id)
        for record in records:
            self.metrics.match_decisions.labels(
                tenant=label, decision="accept" if record.accepted else "reject"
            ).inc()
        return list(zip(records, all_hits, strict=True))

    def _search_and_store(
        self, tenant_id: str, queries: np.ndarray, k: int, where: Mapping[str, Any]
    ) -> tuple[list[list[Hit]], list[tuple[MatchRecord, float]]]:
        """A filtered search (its own, not batched) and its records (blocking)."""
        all_hits = self.indexes.get(tenant_id).search(queries, k, where)
        return all_hits, self._store_records(tenant_id, all_hits)

    def _store_records(
        self, tenant_id: str, all_hits: list[list[Hit]]
    ) -> list[tuple[MatchRecord, float]]:
        """A record per query row, stored in one write (blocking: in the search's worker
        thread), each with the ``perf_counter`` time its search ended (for the search metric)."""
        searched = time.perf_counter()
        now = time.time()
        records = [self._record(tenant_id, hits, now) for hits in all_hits]
        self.store.add_matches(records)
        return [(r, searched) for r in records]

    def _record(self, tenant_id: str, hits: list[Hit], now: float) -> MatchRecord:
        top = hits[0] if hits else None
        accepted = top is not None and self.accepts(top.score)
        return MatchRecord(
            match_id=uuid.uuid4().hex,
            tenant_id=tenant_id,
            accepted=accepted,
            subject=top.subject if accepted and top else None,
            top_item_id=top.item_id if top else None,
            top_subject=top.subject if top else None,
            score=top.score if top else None,
            threshold=self.threshold,
            model_version=self.model_version,
            created_at=now,
        )

    async def vectors(
        self,
        tenant_id: str,
        inp: VerifyOperand,
        *,
        where: str,
        upload: bytes | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """One verify input -> its vectors (several for a subject). ``filter`` restricts
        gallery inputs to items whose metadata passes it (others are as if absent)."""
        if upload is not None or inp.image is not None:
            data: bytes | str = upload if upload is not None else inp.image  # type: ignore[assignment]
            return await self.resolver.images([(f"{where}.image", data)])
        if inp.embedding is not None:
            return self.resolver.embedding(inp.embedding, where=f"{where}.embedding")[None]
        if inp.item_id is not None:
            return await self.resolver.item_vector(
                tenant_id,
                inp.item_id,
                accept=None if not filter else (lambda meta: matches(meta, filter)),
            )
        assert inp.subject is not None
        allowed = None
        if filter:
            allowed = await run_in_threadpool(self.indexes.get(tenant_id).matching, filter)
        return await self.resolver.subject_vectors(tenant_id, inp.subject, seqs=allowed)

    async def verify(
        self, tenant_id: str, a: np.ndarray, b: np.ndarray
    ) -> tuple[float, bool, float | None]:
        """Best cosine over all pairs of a's and b's vectors (one pair unless subjects), in
        tiles (bounded memory) and at most ``max_verify_pairs`` pairs (bounded CPU) ->
        (score, accepted, cosine). With an AS-norm cohort the score is that pair's normalised
        score and the cosine comes beside it; without, the score is the cosine (and None)."""
        pairs = len(a) * len(b)
        if pairs > self.max_verify_pairs:
            raise InvalidInputError(
                f"verifying these inputs compares {len(a)} x {len(b)} = {pairs} pairs, the limit "
                f"is {self.max_verify_pairs} (TCM_MAX_VERIFY_PAIRS); verify against one item or "
                "an image instead of a whole subject",
                code="too_many_pairs",
                detail={"pairs": pairs, "max_verify_pairs": self.max_verify_pairs},
            )
        cosine: float | None = None
        if self.cohort is None:
            best = await run_in_threadpool(max_inner_product, a, b)
            score = float(np.clip(best, -1.0, 1.0))
        else:
            score, cosine = await run_in_threadpool(self._normalised_best, a, b)
        accepted = self.accepts(score)
        self.metrics.verify_decisions.labels(
            tenant=self.metrics.tenant_label(tenant_id), decision="accept" if accepted else "reject"
        ).inc()
        return score, accepted, cosine

    def _normalised_best(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        """(AS-normalised score, cosine) of the best pair by cosine. A gallery item's
        statistics are computed from its stored vector here: the same numbers the index keeps
        for it (``tcm.asnorm`` statistics do not depend on the batch)."""
        assert self.cohort is not None
        best, i, j = best_pair(a, b)
        cosine = float(np.clip(best, -1.0, 1.0))
        left, right = self.cohort.stats(a[i : i + 1]), self.cohort.stats(b[j : j + 1])
        return float(as_norm(np.array([cosine]), left, right)[0]), cosine

    def subject_enrolled(self, tenant_id: str, subject: str) -> bool:
        """Whether the tenant's gallery holds an item of ``subject`` now (blocking)."""
        vectors = self.store.gallery_vectors(
            tenant_id, model_version=self.model_version, subject=subject
        )
        return len(vectors.vectors) > 0

    async def feedback(
        self,
        tenant_id: str,
        match_id: str,
        *,
        true_subject: str | None,
        subject_given: bool,
        correct: bool | None,
    ) -> Feedback:
        match = await run_in_threadpool(self.store.get_match, tenant_id, match_id)
        if match is None:
            raise NotFoundError(f"no match {match_id!r}", detail={"match_id": match_id})
        enrolled = None
        if subject_given and true_subject is not None and true_subject != match.top_subject:
            enrolled = await run_in_threadpool(self.subject_enrolled, tenant_id, true_subject)
        genuine, outcome = label_decision(
            match,
            true_subject=true_subject,
            subject_given=subject_given,
            correct=correct,
            enrolled=enrolled,
        )
        fb = Feedback(
            match_id=match_id,
            tenant_id=tenant_id,
            true_subject=true_subject if subject_given else None,
            correct=correct,
            genuine=genuine,
            outcome=outcome,
            created_at=time.time(),
        )
        await run_in_threadpool(self.store.add_feedback, fb)
        self.metrics.decisions.labels(
            tenant=self.metrics.tenant_label(tenant_id), outcome=outcome
        ).inc()
        return fb
