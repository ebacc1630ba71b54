"""The config system: _BASE_ inheritance, KEY VALUE overrides, and errors that name key and file."""
import pytest

from detector.config import ConfigError, cfg_from_string, cfg_to_yaml, get_cfg


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 10\nMODEL:\n  BACKBONE:\n    NAME: resnet18\n")
    child = write(tmp_path, "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 20\n")
    cfg = get_cfg(child, ["SOLVER.MAX_ITER", "30", "DATASETS.TRAIN", "[a.json, b.json]"])
    assert cfg.SOLVER.BASE_LR == 0.5          # from the base
    assert cfg.MODEL.BACKBONE.NAME == "resnet18"
    assert cfg.SOLVER.MAX_ITER == 30          # command line beats the child file
    assert list(cfg.DATASETS.TRAIN) == ["a.json", "b.json"]  # values parsed as YAML


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "typo.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError) as e:
        get_cfg(path)
    assert "BASE_LRR" in str(e.value) and "typo.yaml" in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "SOLVER:\n  MAX_ITER: lots\n")
    with pytest.raises(ConfigError) as e:
        get_cfg(path)
    assert "SOLVER.MAX_ITER" in str(e.value) and "bad.yaml" in str(e.value)


def test_unknown_override_and_odd_pairs():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITR"):
        get_cfg(None, ["SOLVER.MAX_ITR", "5"])
    with pytest.raises(ConfigError, match="pairs"):
        get_cfg(None, ["SOLVER.MAX_ITER"])


def test_choice_checked(tmp_path):
    path = write(tmp_path, "arch.yaml", "MODEL:\n  META_ARCHITECTURE: YOLO\n")
    with pytest.raises(ConfigError, match="META_ARCHITECTURE"):
        get_cfg(path)


def test_missing_base_is_named(tmp_path):
    path = write(tmp_path, "orphan.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        get_cfg(path)


def test_round_trip_through_checkpoint_string():
    cfg = get_cfg(None, ["SOLVER.BASE_LR", "0.02", "INPUT.MPP", "0.25"])
    again = cfg_from_string(cfg_to_yaml(cfg))
    assert again == cfg


def test_every_shipped_config_loads():
    """A user starts from a file in configs/: each must load (its _BASE_ chain, keys, types)."""
    import glob
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    files = sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True))
    assert len(files) >= 10
    for f in files:
        cfg = get_cfg(f)
        assert cfg.MODEL.META_ARCHITECTURE, f
