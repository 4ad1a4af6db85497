import pytest

from training.config import TrainConfig, load_config, save_config


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss: contrastive\nepochs: 3\ntcm: false\n")
    cfg = load_config(path, ["epochs=5", "m_plus=0.7", "tcm=yes"])
    assert cfg.loss == "contrastive" and cfg.epochs == 5 and cfg.m_plus == 0.7 and cfg.tcm
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["loss=triplet"], "loss 'triplet' is not one of"),
        (["arch=resnet9"], "arch 'resnet9' is not one of"),
        (["dataset=imagenet"], "dataset 'imagenet'"),
        (["epochs=zero"], "epochs expects a int"),
        (["tcm=maybe"], "tcm expects true/false"),
        (["batch_size=30", "m_per_class=4"], "multiple of m_per_class"),
        (["m_plus=1.5"], "margins"),
        (["target_far=0.5"], "far_lo < target_far < far_hi"),
        (["epochs"], "key=value"),
        (["optimizer=adagrad"], "optimizer 'adagrad' is not one of"),
        (["norm=layer"], "norm 'layer' is not one of"),
        (["m_per_class=1", "batch_size=8"], "m_per_class must be >= 2"),
    ],
)
def test_bad_config_says_what_to_fix(overrides: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_unknown_yaml_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config keys .*learning_rate"):
        load_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_are_valid() -> None:
    assert TrainConfig().dataset == "omniglot"
