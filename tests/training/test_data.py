import numpy as np
import pytest
import torch
from PIL import Image

from training.config import TrainConfig
from training.data import load_splits


def test_omniglot_background_vs_evaluation(data_dir: str) -> None:
    s = load_splits(TrainConfig(data_dir=data_dir, max_train_classes=50, max_test_classes=20))
    train, test = set(s.train.y.tolist()), set(s.test.y.tolist())
    assert not train & test
    assert len(train) == 50 and len(test) == 20
    assert max(train) < 964 <= min(test)  # background ids first, evaluation ids after
    assert s.train.x.shape[1:] == (1, 28, 28)
    assert len(s.train.y) == 50 * 20
    # inverted: ink is 1 -> after (x - 0.5) / 0.5 the paper is -1, ink near +1
    assert float(s.train.x.mean()) < -0.5


def test_validation_split_is_carved_from_training_classes(data_dir: str) -> None:
    s = load_splits(
        TrainConfig(data_dir=data_dir, max_train_classes=40, max_test_classes=10, val_classes=10)
    )
    assert s.val is not None
    tr, va, te = (set(p.y.tolist()) for p in (s.train, s.val, s.test))
    assert len(va) == 10 and len(tr) == 30
    assert not (tr & va) and not (va & te) and not (tr & te)


def _folder(tmp_path, counts: dict[str, int]):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            arr = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_image_folder_class_disjoint(tmp_path) -> None:
    root = _folder(tmp_path, {f"c{i}": 3 for i in range(6)} | {"lonely": 1})
    s = load_splits(
        TrainConfig(
            dataset="imagefolder", data_dir=str(root), image_size=8, test_fraction=0.5, seed=1
        )
    )
    assert not set(s.train.y.tolist()) & set(s.test.y.tolist())
    assert s.train.x.shape[1:] == (3, 8, 8)
    # the single-image class cannot be batched by class: kept out of training
    counts = torch.bincount(s.train.y)
    assert int(counts[counts > 0].min()) >= 2
    lonely_held_out = 6 in set(s.test.y.tolist())  # class folders sorted: c0..c5, lonely
    assert s.description["dropped_single_image_train_classes"] == int(not lonely_held_out)


@pytest.mark.parametrize("seed", range(5))
def test_an_exports_classes_are_held_out_within_each_tenant(tmp_path, seed: int) -> None:
    """An export's folders (``<tenant>__<subject>``): every tenant gives round(30%) of its
    classes to the test side and keeps the rest for training, whichever ids the tenants got
    (a draw over all 20 classes left a tenant's five wholly on one side in some runs)."""
    tenants = ["0f3a", "9be1", "c7d2", "e5aa"]
    root = _folder(tmp_path, {f"{t}__digit-{k}-ab12cd34": 2 for t in tenants for k in range(5)})
    s = load_splits(
        TrainConfig(
            dataset="imagefolder", data_dir=str(root), image_size=8, test_fraction=0.3, seed=seed
        )
    )
    folders = sorted(p.name for p in root.iterdir())  # class k is the k-th folder
    held: dict[str, int] = {}
    for k in set(s.test.y.tolist()):
        t = folders[k].split("__")[0]
        held[t] = held.get(t, 0) + 1
    assert held == {t: 2 for t in tenants}, held
    assert not set(s.train.y.tolist()) & set(s.test.y.tolist())


def test_missing_and_empty_folders(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_splits(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_splits(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_splits(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="Omniglot not found"):
        load_splits(TrainConfig(dataset="omniglot", data_dir=str(tmp_path)))


def test_only_single_image_classes(tmp_path) -> None:
    root = _folder(tmp_path, {f"c{i}": 1 for i in range(8)})
    with pytest.raises(ValueError, match="single image"):
        load_splits(TrainConfig(dataset="imagefolder", data_dir=str(root), image_size=8))


def test_att_faces_split(data_dir: str) -> None:
    s = load_splits(TrainConfig(dataset="att_faces", data_dir=data_dir, image_size=32))
    assert s.train.num_classes == 20 and s.test.num_classes == 20
    assert len(s.train.y) == 200


def test_att_faces_validation_people_fixed_across_seeds(data_dir: str) -> None:
    # margins chosen on the validation people must never be judged on them: the validation
    # people are drawn once (val_seed) and no seed's test draw may contain one of them
    common = dict(dataset="att_faces", data_dir=data_dir, image_size=8, val_classes=6)
    sweep = load_splits(TrainConfig(**common, seed=0))
    assert sweep.val is not None
    val = set(sweep.val.y.tolist())
    assert len(val) == 6 and sweep.train.num_classes == 14 and sweep.test.num_classes == 20
    tests = []
    for seed in range(4):
        main = load_splits(TrainConfig(**common, seed=seed, val_in_train=True))
        test, train = set(main.test.y.tolist()), set(main.train.y.tolist())
        assert main.val is None and not test & val and val <= train and not train & test
        assert len(test) == 20 and len(train) == 20
        assert main.description["fixed_val_classes"] == sorted(val)
        again = load_splits(TrainConfig(**common, seed=seed))
        assert set(again.val.y.tolist()) == val  # the same people whatever the seed
        tests.append(frozenset(test))
    assert len(set(tests)) > 1  # the test people still change with the seed
    other = load_splits(TrainConfig(**common, seed=0, val_seed=1))
    assert set(other.val.y.tolist()) != val


def test_image_folder_validation_classes_need_two_images(tmp_path) -> None:
    root = _folder(tmp_path, {f"c{i}": 2 for i in range(8)} | {f"solo{i}": 1 for i in range(4)})
    for seed in range(3):
        s = load_splits(
            TrainConfig(
                dataset="imagefolder",
                data_dir=str(root),
                image_size=8,
                test_fraction=0.25,
                val_classes=2,
                seed=seed,
            )
        )
        assert s.val is not None and int(torch.bincount(s.val.y).max()) >= 2
        assert not set(s.val.y.tolist()) & set(s.test.y.tolist())
    with pytest.raises(ValueError, match="val_classes=7 leaves too few"):
        load_splits(
            TrainConfig(dataset="imagefolder", data_dir=str(root), image_size=8, val_classes=7)
        )
