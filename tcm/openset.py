"""1:N open-set identification in NIST's terms (FPIR, FNIR at a gallery size) from held-out
classes, so that a threshold can be chosen, and read, for how the service is used: a probe is
compared with every item of a gallery of N photos, not with one.

The evidence is kept per probe (:class:`ProbeTails`): each held-out image, as a probe, against
every other held-out image of another class (its impostors, ``m_i`` of them) keeps its
``k`` highest impostor scores, and its best score against its own class (its mate). A
stranger's gallery is modelled as N draws from that probe's impostors (an unseen tenant's
gallery is other photos of other classes):

* ``FPIR(tau, N) = mean_i [1 - (1 - p_i(tau))^N]``, ``p_i(tau)`` = the share of probe i's
  impostor scores at or above tau. Averaging per probe keeps what a pooled FAR loses: a probe
  that resembles many classes (a Summer Tanager among red birds) fails at every gallery size,
  so FPIR grows slower than ``1 - (1 - FAR)^N`` for a fixed pair FAR, and its worst probes
  dominate.
* ``FNIR(tau, N) = 1 - mean_j [1{s_j >= tau} (1 - q_j(s_j))^N]`` over mated probes, ``s_j``
  the mate score and ``q_j(s)`` the share of probe j's impostors scoring above ``s``: the mate
  must clear tau and rank first among N impostors (rank-1 identification).

Only the top ``k`` impostor scores per probe are kept: ``p_i(tau)`` is exact while at most
``k`` of a probe's scores reach tau, which holds for every tau in the tail a target FPIR
selects (:func:`tau_at_fpir` refuses a target the tails cannot resolve).

A tenant's gallery is not N photos of N strangers but a few photos of each of G subjects, and
photos of one subject hit a probe together or not at all (a Summer Tanager probe is accepted by
every photo of a Scarlet Tanager, and by none of a wren's). Tails that keep the class of each
kept score (``top_class``, ``class_sizes``) give the expected FPIR for a gallery *shape*,
``P_s`` photos of each subject s (:func:`fpir_gallery`): subjects are unseen classes drawn from
the held-out ones, photos drawn from their class,

    FPIR = mean_i [1 - prod_s m_i(P_s)],  m_i(P) = mean over classes c != c_i of (1 - p_ic)^P,

``p_ic`` = the share of class c's photos scoring at or above tau against probe i. With one
photo per subject and equal class sizes it equals :func:`fpir` at N = G; with several photos per
subject it is lower than :func:`fpir` at N = sum P_s (measured on the bird default's held-out
species: 0.335 against 0.427 for 15 subjects x 8 photos, where galleries drawn from those
species gave 0.37; ``docs/results.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tcm._pairs import prepare

DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class ProbeTails:
    """Per probe: its ``k`` highest impostor scores (descending; ``-inf`` pads a probe with
    fewer impostors), its number of impostors, and its best mate score (NaN: no mate)."""

    top: np.ndarray  # (P, k) float
    impostors: np.ndarray  # (P,) int
    mate: np.ndarray  # (P,) float
    # optional (tails written before they existed lack them): the class code of each kept
    # score (-1 pads), each probe's own class, and every class's photo count
    top_class: np.ndarray | None = None  # (P, k) int
    probe_class: np.ndarray | None = None  # (P,) int
    class_sizes: np.ndarray | None = None  # (C,) int

    def __post_init__(self) -> None:
        if self.top.ndim != 2 or self.top.shape[0] != self.impostors.shape[0]:
            raise ValueError("top must be (probes, k) with one impostor count per probe")
        if self.mate.shape != self.impostors.shape:
            raise ValueError("one mate score per probe")
        if (self.impostors < 1).any():
            raise ValueError("every probe needs at least one impostor")
        parts = (self.top_class, self.probe_class, self.class_sizes)
        if any(x is not None for x in parts):
            if any(x is None for x in parts):
                raise ValueError("top_class, probe_class and class_sizes come together")
            assert self.top_class is not None and self.probe_class is not None
            assert self.class_sizes is not None
            if self.top_class.shape != self.top.shape:
                raise ValueError("top_class must have top's shape")
            if self.probe_class.shape != self.impostors.shape:
                raise ValueError("one class per probe")
            if len(self.class_sizes) < 2 or (self.class_sizes < 1).any():
                raise ValueError("class_sizes needs two or more classes of at least one photo")

    @property
    def has_classes(self) -> bool:
        """Whether the kept scores carry their classes (:func:`fpir_gallery` needs them)."""
        return self.class_sizes is not None

    @property
    def k(self) -> int:
        return int(self.top.shape[1])

    def exceed(self, tau: float) -> np.ndarray:
        """Per probe, how many impostor scores are at or above ``tau`` (exact while below k)."""
        return (self.top >= tau).sum(axis=1)

    def resolved(self, tau: float) -> bool:
        """Whether every probe's count at ``tau`` is exact (fewer than k of its kept scores
        reach tau, or it kept all of its impostors)."""
        c = self.exceed(tau)
        return bool(((c < self.k) | (self.impostors <= self.k)).all())

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"top": self.top, "impostors": self.impostors, "mate": self.mate}
        if self.has_classes:
            assert self.top_class is not None and self.probe_class is not None
            assert self.class_sizes is not None
            out |= {
                "top_class": self.top_class,
                "probe_class": self.probe_class,
                "class_sizes": self.class_sizes,
            }
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ProbeTails:
        def ints(key: str) -> np.ndarray | None:
            return np.asarray(arrays[key], np.int64) if key in arrays else None

        return cls(
            np.asarray(arrays["top"], np.float64),
            np.asarray(arrays["impostors"], np.int64),
            np.asarray(arrays["mate"], np.float64),
            ints("top_class"),
            ints("probe_class"),
            ints("class_sizes"),
        )


def probe_tails(
    embeddings: object,
    labels: object,
    *,
    k: int = DEFAULT_TOP_K,
    block_size: int = 1024,
    resolve_at: float | None = None,
) -> ProbeTails:
    """Every image of a labelled held-out set as a probe against all the others, blockwise
    (memory O(block_size x N)): its top ``k`` impostor scores, impostor count, best mate.
    ``resolve_at`` raises ``k`` until every probe keeps all its impostor scores at or above
    that tau (an artefact's own tau: the FPIR there must be exact; a probe that resembles a
    whole genus can have far more than 64 impostors above a pair-FAR tau)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ps = prepare(embeddings, labels)
    emb, codes = ps.emb, ps.codes
    n = emb.shape[0]
    sizes = torch.as_tensor(ps.class_sizes, dtype=torch.int64)
    impostors = (n - sizes[codes]).numpy()
    if (impostors < 1).any():
        raise ValueError("need at least two classes: a probe needs impostors")
    if resolve_at is not None:
        most = 0
        for start in range(0, n, block_size):
            s = emb[start : start + block_size] @ emb.T
            other = codes[start : start + block_size, None] != codes[None, :]
            most = max(most, int(((s >= resolve_at) & other).sum(dim=1).max()))
        k = max(k, most + 1)
    kk = min(k, int(impostors.max()))
    tops, top_classes, mates = [], [], []
    for start in range(0, n, block_size):
        s = emb[start : start + block_size] @ emb.T  # (b, N)
        same = codes[start : start + block_size, None] == codes[None, :]
        rows = torch.arange(s.shape[0])
        mate = s.masked_fill(~same, -torch.inf)
        mate[rows, rows + start] = -torch.inf  # not against itself
        best = mate.max(dim=1).values
        mates.append(torch.where(torch.isinf(best), torch.nan, best))
        best_k = torch.topk(s.masked_fill(same, -torch.inf), kk, dim=1)
        tops.append(best_k.values)
        top_classes.append(codes[best_k.indices])
    top = torch.cat(tops).double().numpy()
    top_class = torch.cat(top_classes).numpy().astype(np.int64)
    top_class[~np.isfinite(top)] = -1  # padding of a probe with fewer than k impostors
    return ProbeTails(
        top,
        impostors.astype(np.int64),
        torch.cat(mates).double().numpy(),
        top_class,
        codes.cpu().numpy().astype(np.int64),
        np.asarray(ps.class_sizes, np.int64),
    )


def _check_n(gallery_size: float) -> float:
    n = float(gallery_size)
    if not (np.isfinite(n) and n >= 1):
        raise ValueError(f"a gallery size must be >= 1, got {gallery_size}")
    return n


def fpir(tails: ProbeTails, tau: float, gallery_size: float) -> float:
    """Expected FPIR at ``tau`` against a gallery of ``gallery_size`` photos (module doc)."""
    n = _check_n(gallery_size)
    p = tails.exceed(tau) / tails.impostors
    return float(np.mean(1.0 - (1.0 - p) ** n))


def gallery_shape(photos_per_subject: object) -> dict[int, int]:
    """A gallery's shape, ``{photos: subjects with that many photos}``, from each subject's
    photo count (an iterable of ints) or from such a mapping (checked)."""
    if isinstance(photos_per_subject, dict):
        shape = {int(p): int(g) for p, g in photos_per_subject.items() if int(g) != 0}
    else:
        shape = {}
        for p in photos_per_subject:  # type: ignore[attr-defined]
            shape[int(p)] = shape.get(int(p), 0) + 1
    if not shape or any(p < 1 or g < 1 for p, g in shape.items()):
        raise ValueError("a gallery shape needs at least one subject, each of >= 1 photos")
    return shape


@dataclass(frozen=True)
class GalleryFpir:
    """:func:`fpir_gallery` at one tau, with the tails' part computed once: call it with a
    gallery shape (the service evaluates every tenant's shape against one tau)."""

    probe: np.ndarray  # (E,) the probe of each (probe, class) pair with exceedances
    p: np.ndarray  # (E,) the share of that class's photos at or above tau
    n_probes: int
    n_classes: int

    @classmethod
    def at(cls, tails: ProbeTails, tau: float) -> GalleryFpir:
        if not tails.has_classes:
            raise ValueError(
                "these open-set tails do not keep their classes: re-run tcm-train openset"
            )
        assert tails.top_class is not None and tails.class_sizes is not None
        n_probes, n_classes = len(tails.impostors), len(tails.class_sizes)
        rows, cols = np.nonzero(tails.top >= tau)
        key = rows * n_classes + tails.top_class[rows, cols]
        pairs, hits = np.unique(key, return_counts=True)
        return cls(
            pairs // n_classes, hits / tails.class_sizes[pairs % n_classes], n_probes, n_classes
        )

    def __call__(self, photos_per_subject: object) -> float:
        log_miss = np.zeros(self.n_probes)
        for photos, subjects in gallery_shape(photos_per_subject).items():
            # per probe, the sum over the classes it reaches of 1 - (1 - p)^P (others add 0)
            reached = np.bincount(
                self.probe, weights=1.0 - (1.0 - self.p) ** photos, minlength=self.n_probes
            )
            with np.errstate(divide="ignore"):
                log_miss += subjects * np.log(1.0 - reached / (self.n_classes - 1))
        return float(np.mean(1.0 - np.exp(log_miss)))


def fpir_gallery(tails: ProbeTails, tau: float, photos_per_subject: object) -> float:
    """Expected FPIR at ``tau`` against a gallery of subjects with the given photo counts
    (module doc; ``photos_per_subject`` as :func:`gallery_shape` takes it). Needs tails that
    keep their classes (``has_classes``)."""
    return GalleryFpir.at(tails, tau)(photos_per_subject)


def fnir(tails: ProbeTails, tau: float, gallery_size: float) -> float:
    """Expected rank-1 FNIR at ``tau`` with ``gallery_size`` impostor photos beside the mate
    (module doc), over the probes that have a mate; NaN when none has."""
    n = _check_n(gallery_size)
    mated = ~np.isnan(tails.mate)
    if not mated.any():
        return float("nan")
    s = tails.mate[mated]
    above = (tails.top[mated] > s[:, None]).sum(axis=1) / tails.impostors[mated]
    hit = (s >= tau) * (1.0 - above) ** n
    return float(1.0 - hit.mean())


def tau_at_fpir(tails: ProbeTails, target_fpir: float, gallery_size: float) -> float:
    """The smallest tau whose expected FPIR at ``gallery_size`` is at most ``target_fpir``
    (FPIR only changes at kept scores: the search runs over them). Raises when the kept
    tails cannot resolve that tau (keep more scores per probe, or hold out more classes)."""
    if not (0.0 < float(target_fpir) < 1.0):
        raise ValueError(f"target_fpir must lie in (0, 1), got {target_fpir}")
    n = _check_n(gallery_size)
    scores = np.unique(tails.top[np.isfinite(tails.top)])  # ascending
    candidates = np.append(scores, np.nextafter(scores[-1], np.inf))
    lo, hi = 0, len(candidates) - 1  # FPIR at candidates[hi] is 0 <= target
    if fpir(tails, candidates[0], n) <= target_fpir:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fpir(tails, candidates[mid], n) <= target_fpir:
            hi = mid
        else:
            lo = mid
    tau = float(candidates[hi])
    if not tails.resolved(tau):
        raise ValueError(
            f"FPIR {target_fpir:g} at a gallery of {n:g} needs tau {tau:.4f}, where some "
            f"probes have more than the {tails.k} impostor scores kept above it: keep more "
            "(k) or hold out more classes"
        )
    return tau


def fpir_from_pair_far(pair_far: float, gallery_size: float) -> float:
    """What a pooled pair FAR implies under independence, ``1 - (1 - FAR)^N``: the textbook
    compounding, for comparison with :func:`fpir`."""
    return float(1.0 - (1.0 - float(pair_far)) ** _check_n(gallery_size))


__all__ = [
    "DEFAULT_TOP_K",
    "GalleryFpir",
    "ProbeTails",
    "fnir",
    "fpir",
    "fpir_from_pair_far",
    "fpir_gallery",
    "gallery_shape",
    "probe_tails",
    "tau_at_fpir",
]
