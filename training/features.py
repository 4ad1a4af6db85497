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


def cache_key(
    arch: str,
    weights_sha256: str,
    spec: Preprocessing,
    data_fingerprint: str,
    tune_blocks: int = 0,
) -> str:
    fields = {
        "arch": arch,
        "weights": weights_sha256,
        "preprocessing": spec.to_dict(),
        "data": data_fingerprint,
    }
    if tune_blocks:  # feature maps before the last tune_blocks blocks (older keys unchanged)
        fields["tune_blocks"] = tune_blocks
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.inference_mode()
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
    # channels_last weights and inputs under inference mode: the CPU's faster eager path, with
    # features within ~1e-6 of contiguous NCHW (docs/benchmarks.md, bench/bench_cpu_forward.py;
    # tests/training/test_features_fast_path.py); a cache key does not depend on it
    backbone = backbone.eval().to(memory_format=torch.channels_last)
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
            x = to_input_tensor(batch, spec).contiguous(memory_format=torch.channels_last)
            out.append(backbone(x).float().numpy())
            done = min(n, i + batch_size)
            rate = done / (time.perf_counter() - start)
            bar.update(task, completed=done, rate=f"{rate:.1f} img/s")
    seconds = time.perf_counter() - start
    return np.concatenate(out), n / max(seconds, 1e-9)


def _save(path: Path, feats: np.ndarray, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(
            {"features": np.ascontiguousarray(feats, dtype=np.float32)}, tmp, metadata=metadata
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_features(
    arch: str,
    images,
    labels: np.ndarray,
    spec: Preprocessing,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    description: str = "features",
    chunk: int = 256,
    reverse: bool = False,
    start: float = 0.0,
    tune_blocks: int = 0,
) -> np.ndarray:
    """The backbone's features of ``images``: read from the cache, else extracted and stored.
    With ``tune_blocks`` > 0, the feature maps ``(N, C, H, W)`` at the input of the backbone's
    last ``tune_blocks`` blocks instead (``training.partial``: those blocks train on them).

    Extraction is resumable: each ``chunk`` of images is stored as it completes (``<key>.parts``)
    and an interrupted run continues from the chunks on disk. Two processes may share the work
    (one with ``reverse=True`` walks the chunks from the end; each skips chunks already stored),
    or four (two more starting at ``start=0.5``, one each way).
    """
    from safetensors.numpy import load_file

    weights_sha = file_sha256(pretrained_weights_file(arch))
    key = cache_key(arch, weights_sha, spec, images_fingerprint(images, labels), tune_blocks)
    kind = f"-maps{tune_blocks}" if tune_blocks else ""
    path = Path(cache_dir) / f"{arch}{kind}-{key[:24]}.safetensors"
    if path.is_file():
        feats = load_file(str(path))["features"]
        if len(feats) == len(labels):
            if progress:
                print(f"{description}: {len(feats)} cached features from {path}", flush=True)
            return feats
    parts = path.with_suffix(".parts")
    starts = list(range(0, len(labels), chunk))
    backbone: torch.nn.Module = build_pretrained_backbone(arch, backbone_sha256=weights_sha)
    if tune_blocks:
        from training.partial import FrozenPrefix

        backbone = FrozenPrefix(backbone, tune_blocks)
    meta = {"arch": arch, "weights_sha256": weights_sha, "tune_blocks": str(tune_blocks)}
    t0, done = time.perf_counter(), 0
    k = int(len(starts) * start)
    order = (
        list(reversed(starts[:k])) + list(reversed(starts[k:]))
        if reverse
        else (starts[k:] + starts[:k])
    )
    for _ in range(2):  # the second pass picks up chunks another worker left unfinished
        for i in order:
            part = parts / f"{i:07d}.safetensors"
            if path.is_file():  # another worker assembled the whole set: nothing left to do
                return load_file(str(path))["features"]
            if part.is_file():
                continue
            batch = _Slice(images, i, min(len(labels), i + chunk))
            feats, _ = extract(
                backbone,
                batch,
                spec,
                progress=progress,
                description=f"{description} {i}/{len(labels)}",
            )
            _save(part, feats, meta)
            done += len(batch)
            if progress:
                rate = done / (time.perf_counter() - t0)
                print(
                    f"{description}: {i + len(batch)}/{len(labels)} ({rate:.1f} img/s)", flush=True
                )
    feats = np.concatenate(
        [load_file(str(parts / f"{i:07d}.safetensors"))["features"] for i in starts]
    )
    rate = done / max(time.perf_counter() - t0, 1e-9)
    if progress:
        print(f"{description}: {done} images extracted at {rate:.1f} img/s -> {path}", flush=True)
    _save(path, feats, {**meta, "images_per_second": f"{rate:.2f}"})
    for p in parts.glob("*.safetensors"):
        p.unlink(missing_ok=True)
    return feats


class _Slice:
    """``images[start:stop]`` without copying or decoding (works for lazily decoded sets)."""

    def __init__(self, images, start: int, stop: int) -> None:
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.images[self.start + i]
