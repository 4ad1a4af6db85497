import torch

from training.augment import augment_batch, horizontal_flip, random_affine


def _batch(n: int = 6) -> torch.Tensor:
    x = torch.zeros(n, 1, 20, 20)
    x[:, :, 4:9, 3:15] = 1.0  # an off-centre, asymmetric bar
    x[:, :, 9:16, 3:6] = 1.0
    return x


def test_zero_affine_is_identity() -> None:
    x = _batch()
    out = random_affine(
        x, degrees=0, translate=0, scale=(1, 1), shear=0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_affine_is_seeded_small_and_shape_preserving() -> None:
    x = _batch()
    a = augment_batch(x, "omniglot", torch.Generator().manual_seed(1))
    b = augment_batch(x, "omniglot", torch.Generator().manual_seed(1))
    c = augment_batch(x, "omniglot", torch.Generator().manual_seed(2))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # small: the character moves a little but mostly overlaps its original position
    overlap = (a * x).sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert bool((overlap > 0.4).all()) and bool((overlap < 0.999).any())


def test_flip_mirrors_some_images_exactly() -> None:
    x = _batch(32)
    out = horizontal_flip(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 4 < sum(flipped) < 28
