"""Training a head on descriptors: it must learn what the raw descriptor gets wrong."""

from __future__ import annotations

import numpy as np

from tcm import recall_at_k
from training.face_head import HeadConfig, embed_descriptors, train_head


def test_head_learns_to_ignore_nuisance_dimensions() -> None:
    # 20 identities separated in the first 64 dimensions; the other 64 carry per-image noise
    # (lighting, pose, say) larger than the identity signal, so raw neighbours are often wrong
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 8)
    x = np.zeros((160, 128))
    x[:, :64] = rng.standard_normal((20, 64))[labels]
    x[:, 64:] = rng.standard_normal((160, 64)) * 2.5
    test = np.arange(160) % 2 == 1
    raw = recall_at_k(x[test], labels[test], 1)
    assert raw < 0.6
    for tcm in (False, True):
        cfg = HeadConfig(steps=150, tcm=tcm, seed=1, classes_per_batch=10, lr=1e-2)
        head = train_head(x[~test], labels[~test], cfg)
        emb = embed_descriptors(head, x[test])
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        learned = recall_at_k(emb, labels[test], 1)
        assert learned > raw + 0.3, (tcm, raw, learned)
