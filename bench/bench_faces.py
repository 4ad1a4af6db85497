"""Face embedding speed: detect + align + describe, through the service's embedding batcher.

Real LFW photos (JPEG bytes decoded as the service decodes them), the real dlib models, and the
service's :class:`service.engine.embedding.EmbeddingBatcher` with the face preparer (detection and
alignment in each request's thread, the descriptor network once per batch). Side by side in one
run:

- the stages alone: detect + align per image, and the descriptor per image at batch 1 and 16;
- through the batcher: one image per request, ``--concurrency`` requests in flight.

    python -m bench.bench_faces --images 64 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from facekit import ALIGNER, DESCRIPTOR, DETECTOR, FaceOptions, model_checksums
from service.engine.embedding import EmbeddingBatcher
from service.engine.faces import load_served_model
from service.engine.images import decode_image
from tcm import Baseline, Calibration, Manifest, Preprocessing, build_embedder, save_artefact


def face_artefact(directory: Path) -> Path:
    save_artefact(
        directory,
        build_embedder("face_head", kind="linear"),
        Manifest(
            model_version="bench-faces",
            architecture="face_head",
            architecture_kwargs={"kind": "linear"},
            preprocessing=Preprocessing(
                image_size=(150, 150), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3
            ),
            embedding_dim=128,
            calibration=Calibration(
                tau=0.9, target_far=1e-3, far_at_tau=1e-3, frr_at_tau=0.05, tau_lo=0.85, tau_hi=0.95
            ),
            baseline=Baseline(
                opis=0.0,
                eps_opis=0.0,
                eps=0.05,
                recall_at_1=0.0,
                map_at_r=0.0,
                num_classes=0,
                num_images=0,
            ),
            face={
                "detector": DETECTOR,
                "aligner": ALIGNER,
                "descriptor": DESCRIPTOR,
                "head": {"kind": "linear"},
                "options": FaceOptions().to_dict(),
                "model_files": model_checksums(),
            },
        ),
    )
    return directory


def lfw_photos(data_dir: Path, n: int) -> list[bytes]:
    with zipfile.ZipFile(data_dir / "lfw" / "lfw-deepfunneled-crop160.zip") as z:
        names = sorted(m for m in z.namelist() if m.endswith(".jpg"))[::97][:n]
        return [z.read(m) for m in names]


async def through_batcher(model, prepare, photos: list[bytes], concurrency: int) -> float:
    batcher = EmbeddingBatcher(
        model, prepare, device=torch.device("cpu"), max_batch=32, max_wait_s=0.005
    )
    await batcher.start()
    queue = list(enumerate(photos))

    async def client() -> None:
        while queue:
            i, raw = queue.pop()
            img = await asyncio.to_thread(
                decode_image, raw, channels=3, max_pixels=4096 * 4096, where=f"photo {i}"
            )
            await batcher.embed([img], [f"photo {i}"])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    print(
        f"  batcher, concurrency {concurrency:>2}: {len(photos) / elapsed:6.1f} img/s "
        f"(mean batch {batcher.images_embedded / max(1, batcher.batches_run):.1f})"
    )
    await batcher.stop()
    return len(photos) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"{args.images} LFW photos (160x160 JPEG)"
    )
    photos = lfw_photos(args.data_dir, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        model, _, prepare = load_served_model(face_artefact(Path(tmp)))
    assert prepare is not None
    images = [decode_image(r, channels=3, max_pixels=1 << 24, where="x") for r in photos]
    t0 = time.perf_counter()
    faces = [prepare.front.locate(im) for im in images]
    t1 = time.perf_counter()
    for f in faces[:16]:
        prepare.front.describe([f.chip])
    t2 = time.perf_counter()
    prepare.front.describe([f.chip for f in faces[:16]])
    t3 = time.perf_counter()
    print(f"  detect + align alone: {len(images) / (t1 - t0):6.1f} img/s")
    print(
        f"  descriptor alone, batch 1: {16 / (t2 - t1):6.1f} img/s; batch 16: "
        f"{16 / (t3 - t2):6.1f} img/s"
    )
    for c in args.concurrency:
        asyncio.run(through_batcher(model, prepare, photos, c))


if __name__ == "__main__":
    main()
