"""Pretrained backbones on a CPU: feature extraction speed and a training step, side by side.

    .venv/bin/python -m bench.bench_pretrained [--images 64] [--batch 32] [--data-dir DIR]

Measured in one run so the ratios hold on a noisy machine:
- feature extraction (decode-free: preprocessing from uint8 pixels + the frozen backbone's
  forward) in images per second, for EfficientNet-Lite0, -Lite1, -Lite2 at their resolutions;
- one fine-tuning step of EfficientNet-Lite0 + head (forward, multi-similarity + TCM, backward,
  AdamW) on a batch at 224 px: what a step of unfrozen training costs;
- one step of the frozen regime: the head alone on cached 1280-d features, batch 128.
Images are CUB photos when ``--data-dir`` holds them, else seeded random pixels (same cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import torch


def _images(data_dir: str, n: int) -> tuple[list[np.ndarray], str]:
    path = Path(data_dir, "cub200_subset100", "bird_dataset.zip")
    if path.is_file():
        from PIL import Image

        with zipfile.ZipFile(path) as z:
            names = sorted(i for i in z.namelist() if i.endswith(".jpg"))[:n]
            out = []
            for name in names:
                with z.open(name) as f:
                    out.append(np.asarray(Image.open(f).convert("RGB")))
        return out, f"{n} CUB photos (227x227)"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (227, 227, 3), dtype=np.uint8) for _ in range(n)], (
        f"{n} random 227x227 images"
    )


def _median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall and CPU (process) seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    from tcm import TCMLoss, build_embedder
    from tcm.embedders import PRETRAINED, build_pretrained_backbone
    from tcm.preprocess import Preprocessing
    from training.features import extract

    images, what = _images(args.data_dir, args.images)
    out: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "images": what,
        "batch": args.batch,
    }
    for name, spec in PRETRAINED.items():
        backbone = build_pretrained_backbone(name)
        pre = Preprocessing(
            image_size=(spec.image_size,) * 2, channels=3, mean=spec.mean, std=spec.std
        )
        extract(backbone, images[: args.batch], pre, progress=False)  # warm-up
        rates, cpu = [], []
        for _ in range(args.repeats):
            c0 = time.process_time()
            rates.append(extract(backbone, images, pre, batch_size=args.batch, progress=False)[1])
            cpu.append((time.process_time() - c0) / len(images))
        out[f"extract_{name}_img_per_s"] = statistics.median(rates)
        # CPU seconds per image (all threads): what a loaded, shared machine cannot distort
        out[f"extract_{name}_cpu_s_per_img"] = statistics.median(cpu)
        print(
            f"{name} ({spec.image_size}px) feature extraction: "
            f"{out[f'extract_{name}_img_per_s']:.1f} img/s, "
            f"{out[f'extract_{name}_cpu_s_per_img']:.3f} CPU-s/img",
            flush=True,
        )

    model = build_embedder("efficientnet_lite0", embedding_dim=128).train()
    base, reg = MultiSimilarityLoss(), TCMLoss(m_plus=0.8, m_minus=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.arange(args.batch) // 4

    def finetune_step() -> None:
        emb = model(x)
        loss = base(emb, y) + reg(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["finetune_step_s"], out["finetune_step_cpu_s"] = _median_time(finetune_step, args.repeats)
    head = build_embedder("feature_head", in_features=1280, embedding_dim=128).train()
    hopt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    f = torch.randn(128, 1280).relu()
    yh = torch.arange(128) // 4

    def head_step() -> None:
        emb = head(f)
        loss = base(emb, yh) + reg(emb, yh)
        hopt.zero_grad(set_to_none=True)
        loss.backward()
        hopt.step()

    out["head_step_s"], out["head_step_cpu_s"] = _median_time(head_step, 20, warmup=3)
    print(
        f"fine-tuning step, Lite0 + head, batch {args.batch} at 224 px: "
        f"{out['finetune_step_s']:.2f} s ({args.batch / out['finetune_step_s']:.1f} img/s)"
    )
    print(
        f"CPU seconds per step: fine-tuning {out['finetune_step_cpu_s']:.2f}, head "
        f"{out['head_step_cpu_s'] * 1e3:.1f} ms "
        f"({out['finetune_step_cpu_s'] / out['head_step_cpu_s']:.0f}x)"
    )
    print(
        f"frozen regime step, head on cached features, batch 128: "
        f"{out['head_step_s'] * 1e3:.1f} ms "
        f"({out['finetune_step_s'] / out['head_step_s']:.0f}x cheaper per step)"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
