"""``training.features.extract`` runs the backbone in channels_last under inference mode (the
CPU's faster eager path, issue 27 item 7): its features must be the plain NCHW forward's."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tcm import Preprocessing, to_input_tensor
from training.features import extract


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    for m in net.modules():  # non-trivial running statistics, as a pretrained net has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_extract_matches_the_contiguous_forward() -> None:
    spec = Preprocessing(image_size=(20, 20), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(7)]
    net = _net()
    with torch.no_grad():
        want = net(to_input_tensor(images, spec)).numpy()
    got, rate = extract(_net(), images, spec, batch_size=3, progress=False)
    assert got.shape == want.shape and rate > 0
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
