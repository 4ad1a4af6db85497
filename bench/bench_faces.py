"""Face embedding speed: detect + align + describe, through the service's embedding batcher.

Real LFW photos (JPEG bytes decoded as the service decodes them), the real dlib models, and the
service's :class:`service.engine.embedding.EmbeddingBatcher` with the face preparer (detection and
alignment in each request's thread, the descriptor network once per batch). Side by side in one
run:

- the stages alone: detect + align per image, and the descriptor per image at batch 1 and 16;
- through the batcher: one image per request, ``--concurrency`` requests in flight;
- the descriptor's runtimes (issue 32 item 3): ``--chips`` aligned chips one call each, in one
  call, split over two descriptor networks in two threads, and over a pool of two worker
  processes (each with its network loaded before the clock starts), in turns for ``--rounds``
  rounds, each checked equal to the one-by-one descriptors; and how the installed dlib was
  built (BLAS, AVX, CUDA).

    python -m bench.bench_faces --images 64 --concurrency 1 4 16 [--json out.json]
    python -m bench.bench_faces --descriptor-only --chips 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
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


def dlib_build() -> dict[str, object]:
    """How the installed dlib was compiled: what its CPU forward can use."""
    import dlib

    return {
        "version": dlib.__version__,
        "blas": bool(dlib.DLIB_USE_BLAS),
        "lapack": bool(dlib.DLIB_USE_LAPACK),
        "avx": bool(dlib.USE_AVX_INSTRUCTIONS),
        "cuda": bool(dlib.DLIB_USE_CUDA),
    }


def _net():
    import dlib

    from facekit.models import model_paths

    return dlib.face_recognition_model_v1(str(model_paths()["descriptor"]))


def _call(net, batch: list[np.ndarray]) -> np.ndarray:
    return np.asarray([np.asarray(v) for v in net.compute_face_descriptor(batch)], np.float32)


_WORKER_NET = None


def _worker_init() -> None:
    global _WORKER_NET
    _WORKER_NET = _net()


def _worker_describe(batch: list[np.ndarray]) -> np.ndarray:
    return _call(_WORKER_NET, batch)


def descriptor_runtimes(chips: list[np.ndarray], rounds: int) -> dict[str, object]:
    """The ResNet descriptor over ``chips`` four ways, in turns: one call per chip, one call
    for all, two networks (the same weights file) in two threads, and two worker processes,
    half the chips each."""
    import multiprocessing

    nets = [_net() for _ in range(2)]
    call = _call
    pool = multiprocessing.get_context("spawn").Pool(2, initializer=_worker_init)
    half = (len(chips) + 1) // 2
    pool.map(_worker_describe, [chips[:1], chips[1:2]])  # both workers loaded and warm

    def one_by_one() -> np.ndarray:
        return np.concatenate([call(nets[0], [c]) for c in chips])

    def batched() -> np.ndarray:
        return call(nets[0], chips)

    def two_processes() -> np.ndarray:
        return np.concatenate(pool.map(_worker_describe, [chips[:half], chips[half:]]))

    def two_threads() -> np.ndarray:
        parts: list[np.ndarray] = [np.empty(0), np.empty(0)]

        def work(i: int, batch: list[np.ndarray]) -> None:
            parts[i] = call(nets[i], batch)

        threads = [
            threading.Thread(target=work, args=(0, chips[:half])),
            threading.Thread(target=work, args=(1, chips[half:])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return np.concatenate(parts)

    ways = {"one call per chip": one_by_one, "one call for all": batched}
    ways["two networks, two threads"] = two_threads
    ways["two worker processes"] = two_processes
    reference = one_by_one()
    rates: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    diffs = {}
    for _ in range(rounds):
        for name, f in ways.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = f()
            wall = time.perf_counter() - t0
            rates[name].append(len(chips) / wall)
            # the bench process's own CPU: the pool's workers are not in it
            cpu[name].append((time.process_time() - c0) / wall)
            diffs[name] = float(np.abs(out - reference).max())
    pool.close()
    pool.join()
    rows = []
    base = statistics.median(rates["one call per chip"])
    for name in ways:
        rate = statistics.median(rates[name])
        rows.append(
            {
                "way": name,
                "images_per_s": rate,
                "rounds": rates[name],
                "ratio": rate / base,
                "cpu_per_wall": statistics.median(cpu[name]),
                "max_abs_diff": diffs[name],
            }
        )
        print(
            f"  descriptor, {name:<28} {rate:6.1f} img/s  x{rate / base:4.2f}  "
            f"CPU/wall {statistics.median(cpu[name]):4.2f}  max |diff| {diffs[name]:.1e}"
        )
    return {"chips": len(chips), "rounds": rounds, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--chips", type=int, default=16, help="chips for the descriptor runtimes")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the descriptor runtimes")
    p.add_argument("--descriptor-only", action="store_true", help="skip the batcher paths")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    load = os.getloadavg()
    build = dlib_build()
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
        f"{args.images} LFW photos (160x160 JPEG); load average "
        f"{' '.join(f'{v:.1f}' for v in load)}; dlib {build}"
    )
    photos = lfw_photos(args.data_dir, max(args.images, args.chips))
    with tempfile.TemporaryDirectory() as tmp:
        model, _, prepare = load_served_model(face_artefact(Path(tmp)))
    assert prepare is not None
    images = [decode_image(r, channels=3, max_pixels=1 << 24, where="x") for r in photos]
    t0 = time.perf_counter()
    faces = [prepare.front.locate(im) for im in images]
    t1 = time.perf_counter()
    print(f"  detect + align alone: {len(images) / (t1 - t0):6.1f} img/s")
    result: dict[str, object] = {
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "load_average": load},
        "dlib": build,
        "detect_align_images_per_s": len(images) / (t1 - t0),
        "descriptor": descriptor_runtimes([f.chip for f in faces[: args.chips]], args.rounds),
    }
    if not args.descriptor_only:
        result["batcher_images_per_s"] = {
            str(c): asyncio.run(through_batcher(model, prepare, photos[: args.images], c))
            for c in args.concurrency
        }
    result["machine"]["load_average_end"] = os.getloadavg()  # type: ignore[index]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
