from dataclasses import dataclass, field
from typing import Literal

import pytest

from ldmkit.config import ConfigError, apply_overrides, from_dict, preset, to_dict
from ldmkit.train.common import TrainConfig


@dataclass(frozen=True)
class Model:
    width: int = 32
    mults: tuple[int, ...] = (1, 2)
    attention: bool = False
    kind: Literal["unet", "dit"] = "unet"
    dropout: float | None = None


@dataclass(frozen=True)
class Stage:
    model: Model = field(default_factory=Model)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "x"


def test_round_trip():
    cfg = Stage(model=Model(width=64, mults=(1, 2, 4)))
    assert from_dict(Stage, to_dict(cfg)) == cfg


def test_overrides_types():
    cfg = apply_overrides(Stage(), ["model.width=96", "model.mults=1,2,4", "model.attention=true",
                                    "train.lr=3e-4", "model.kind=dit", "model.dropout=0.1", "name=7"])
    assert cfg.model.width == 96 and cfg.model.mults == (1, 2, 4) and cfg.model.attention is True
    assert cfg.train.lr == 3e-4 and cfg.model.kind == "dit" and cfg.model.dropout == 0.1 and cfg.name == "7"
    assert apply_overrides(cfg, ["model.dropout=null"]).model.dropout is None
    assert apply_overrides(cfg, ["model.mults=[2, 2]"]).model.mults == (2, 2)


@pytest.mark.parametrize("item, words", [
    ("model.widht=3", ["model.widht", "width"]),
    ("model.width=abc", ["model.width", "integer", "abc"]),
    ("model.width=1.5", ["model.width", "integer"]),
    ("model.kind=vit", ["model.kind", "'unet'", "'dit'"]),
    ("model.attention=maybe", ["model.attention", "true or false"]),
    ("train.lr=fast", ["train.lr", "number"]),
    ("nokey", ["key.path=value"]),
    ("name.sub=1", ["name.sub"]),
])
def test_override_errors_name_key_and_fix(item, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Stage(), [item])
    for w in words:
        assert w in str(e.value)


def test_from_dict_unknown_key():
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        from_dict(Stage, {"model": {"depth": 3}})


def test_preset_lookup():
    assert preset({"tiny": 1, "big": 2}, "big") == 2
    with pytest.raises(ConfigError, match="available: big, tiny"):
        preset({"tiny": 1, "big": 2}, "huge")


def test_cli_options_are_not_abbreviated(capsys):
    # argparse's prefix matching once read `train eval-classifier --data fashion-mnist` as --data-dir=fashion-mnist
    # and failed later on a missing folder; an option a command lacks must be refused where it is typed
    from ldmkit.train.eval_classifier import main
    with pytest.raises(SystemExit) as e:
        main(["--data", "fashion-mnist", "--out", "unused"])
    assert e.value.code == 2
    assert "unrecognized arguments: --data fashion-mnist" in capsys.readouterr().err
