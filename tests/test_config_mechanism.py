"""The one config mechanism (tag2mask.config): unknown keys, round trips, type-driven tuple conversion."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pytest

from tag2mask.config import DictConfig, changed_keys, config_from_dict, config_to_dict


@dataclass(frozen=True)
class _Inner:
    size: tuple[int, int] = (1, 2)
    name: str = "inner"


@dataclass
class _Outer(DictConfig):
    pairs: tuple[tuple[str, int], ...] = ()
    grid: tuple[tuple[float, ...], ...] = ()
    inner: _Inner = field(default_factory=_Inner)
    maybe: Optional[_Inner] = None
    either: Union[int, tuple[int, int, int, int]] = 3
    options: dict = field(default_factory=dict)
    kept_list: list = field(default_factory=list)
    anything: Any = None


def _through_json(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values))


def test_unknown_key_is_an_error_naming_the_valid_keys():
    with pytest.raises(ValueError) as err:
        _Outer.from_dict({"pairs": [], "typo": 1})
    message = str(err.value)
    assert "typo" in message
    for name in ("pairs", "grid", "inner", "maybe", "either", "options", "kept_list", "anything"):
        assert name in message
    with pytest.raises(ValueError, match="unknown option.*'nope'.*valid.*'size'"):
        _Outer.from_dict({"inner": {"nope": 1}})


def test_round_trip_through_json_restores_nested_tuples_and_dataclasses():
    cfg = _Outer(pairs=(("a", 1), ("b", 2)), grid=((0.5, 1.0), (2.0,)), inner=_Inner((3, 4), "x"),
                 maybe=_Inner((5, 6)), either=(1, 2, 3, 4), options={"k": [1, 2]}, kept_list=[1, [2]],
                 anything=[1, 2])
    stored = _through_json(cfg.to_dict())
    assert stored["pairs"] == [["a", 1], ["b", 2]]  # to_dict is JSON-shaped: tuples are lists
    back = _Outer.from_dict(stored)
    assert back.pairs == (("a", 1), ("b", 2)) and isinstance(back.pairs[0], tuple)
    assert back.grid == ((0.5, 1.0), (2.0,)) and all(isinstance(row, tuple) for row in back.grid)
    assert back.inner == _Inner((3, 4), "x") and isinstance(back.inner.size, tuple)
    assert back.maybe == _Inner((5, 6))
    assert back.either == (1, 2, 3, 4)
    # dict, list and Any fields are kept as JSON gives them
    assert back.options == {"k": [1, 2]} and back.kept_list == [1, [2]] and back.anything == [1, 2]
    assert back == _Outer(pairs=cfg.pairs, grid=cfg.grid, inner=cfg.inner, maybe=cfg.maybe, either=cfg.either,
                          options={"k": [1, 2]}, kept_list=[1, [2]], anything=[1, 2])
    assert config_to_dict(back) == stored


def test_missing_keys_take_defaults_and_none_stays_none():
    cfg = config_from_dict(_Outer, {"either": 7, "maybe": None})
    assert cfg == _Outer(either=7)
    assert _Outer.from_dict({}) == _Outer()


def test_library_configs_round_trip():
    from tag2mask.clip.model import CLIPConfig, TextConfig, VisionConfig
    from tag2mask.methods.clip_zss.config import ClipZssConfig
    from tag2mask.methods.weclip.model import preset as weclip_preset
    from tag2mask.methods.registry import segmenter_preset, segmenter_recipe_names

    SEGMENTER_PRESETS = segmenter_recipe_names()  # every recipe the methods register

    clip = CLIPConfig(embed_dim=64, vision=VisionConfig(width=32, layers=(1, 1, 1, 1), heads=2, image_size=64),
                      text=TextConfig(width=32, layers=1, heads=2))
    back = CLIPConfig.from_dict(_through_json(clip.to_dict()))
    assert back == clip and isinstance(back.vision.layers, tuple) and not back.vision.is_vit
    zss = ClipZssConfig(unseen=("cat",), kmeans_windows=(0.5,))
    assert ClipZssConfig.from_dict(_through_json(zss.to_dict())) == zss
    weclip = weclip_preset("voc")
    assert type(weclip).from_dict(_through_json(weclip.to_dict())) == weclip
    for name in SEGMENTER_PRESETS:
        seg = segmenter_preset(name)
        assert type(seg).from_dict(_through_json(seg.to_dict())) == seg
        with pytest.raises(ValueError, match="valid"):
            type(seg).from_dict({**seg.to_dict(), "lr_typo": 1.0})


def test_changed_keys_are_dotted_paths():
    before = {"a": 1, "stage": {"augment": {"long_side": [1, 2]}, "lr": 0.1}}
    after = {"a": 1, "stage": {"augment": {"long_side": [1, 3]}, "lr": 0.1}, "new": True}
    assert changed_keys(before, after) == ["new", "stage.augment.long_side"]
    assert changed_keys(before, before) == []
