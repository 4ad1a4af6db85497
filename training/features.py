"""The frozen-backbone regime: a pretrained backbone's features, extracted once, cached on disk.

On a CPU, running EfficientNet-Lite0 over an image costs ~100x more than the embedding head
does, and a frozen backbone gives the same features every epoch and every seed. So the features
are computed once and stored as safetensors under ``feature_cache``, keyed by everything they
depend on: the backbone name, the sha256 of its weights file, the preprocessing spec and the
images' bytes and labels. A rerun (another seed, loss or margin) finds the file and skips
extraction; any change of backbone, weights, preprocessing or data gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tcm import Preprocessing, to_input_tensor
from tcm.embedders import build_pretrained_backbone, file_sha256, pretrained_weights_file


def images_fingerprint(images, labels: np.ndarray) -> str:
    """sha256 over every image's shape and bytes (encoded bytes for lazily decoded sets)."""
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    raw = getattr(images, "encoded", None)
    for i in range(len(labels)):
        if raw is not None:
            h.update(raw[i])
        else:
            arr = np.ascontiguousarray(images[i])
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def cache_key(arch: str, weights_sha256: str, spec: Preprocessing, data_fingerprint: str) -> str:
    blob = json.dumps(
        {
            "arch": arch,
            "weights": weights_sha256,
            "preprocessing": spec.to_dict(),
            "data": data_fingerprint,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def extract(
    backbone: torch.nn.Module,
    images,
    spec: Preprocessing,
    *,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "features",
) -> tuple[np.ndarray, float]:
    """Features of every image (decoded and preprocessed batch by batch, so the whole set is
    never held as float tensors); returns them with the measured images per second."""
    backbone.eval()
    out = []
    n = len(images)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    start = time.perf_counter()
    with bar:
        task = bar.add_task(description, total=n, rate="")
        for i in range(0, n, batch_size):
            batch = [images[j] for j in range(i, min(n, i + batch_size))]
            out.append(backbone(to_input_tensor(batch, spec)).float().numpy())
            done = min(n, i + batch_size)
            rate = done / (time.perf_counter() - start)
            bar.update(task, completed=done, rate=f"{rate:.1f} img/s")
    seconds = time.perf_counter() - start
    return np.concatenate(out), n / max(seconds, 1e-9)


def cached_features(
    arch: str,
    images,
    labels: np.ndarray,
    spec: Preprocessing,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    description: str = "features",
) -> np.ndarray:
    """The backbone's features of ``images``: read from the cache, else extracted and stored."""
    from safetensors.numpy import load_file, save_file

    weights_sha = file_sha256(pretrained_weights_file(arch))
    key = cache_key(arch, weights_sha, spec, images_fingerprint(images, labels))
    path = Path(cache_dir) / f"{arch}-{key[:24]}.safetensors"
    if path.is_file():
        feats = load_file(str(path))["features"]
        if len(feats) == len(labels):
            if progress:
                print(f"{description}: {len(feats)} cached features from {path}", flush=True)
            return feats
    backbone = build_pretrained_backbone(arch, backbone_sha256=weights_sha)
    feats, rate = extract(backbone, images, spec, progress=progress, description=description)
    if progress:
        print(f"{description}: {len(feats)} images at {rate:.1f} img/s -> {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(
            {"features": np.ascontiguousarray(feats, dtype=np.float32)},
            tmp,
            metadata={
                "arch": arch,
                "weights_sha256": weights_sha,
                "images_per_second": f"{rate:.2f}",
            },
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return feats
