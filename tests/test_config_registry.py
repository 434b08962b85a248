"""The one mechanism of named configurations (tasks.common.config.NamedConfigs) and the one JSON
reader (tasks.common.checks.read_json)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tasks.common.config import ConfigError, NamedConfigs, UnknownSetting
from tasks.common.forms import setting


@dataclass
class _Inner:
    seed: int = setting(0, "random seed")
    angle: float = setting(1.5, "an angle")


@dataclass
class _Outer:
    name: str = setting("a", "the named configuration")
    count: int = setting(3, "a count")
    inner: _Inner = field(default_factory=_Inner)

    def check(self) -> None:
        if self.count < 1:
            raise ValueError(f"count {self.count} must be at least 1")


def test_named_dataclass_configurations_merge_and_name_mistakes():
    confs = NamedConfigs("thing configuration", _Outer, {"a": {}, "b": {"count": 5, "inner": {"seed": 7}}},
                         default="a", name_field="name")
    assert list(confs) == ["a", "b"] and confs["b"] == {"count": 5, "inner": {"seed": 7}}
    assert confs.build() == _Outer()
    b = confs.build("b", inner={"angle": 2.0})  # nested dicts merge key by key
    assert (b.name, b.count, b.inner) == ("b", 5, _Inner(seed=7, angle=2.0))
    assert confs.build("b", name="x").name == "x"  # a setting called name is an override, not the entry
    with pytest.raises(UnknownSetting, match=r"unknown thing configuration 'c'; choose one of \['a', 'b'\]"):
        confs.build("c")
    with pytest.raises(KeyError, match=r"unknown setting 'inner.seeed'; did you mean 'inner.seed'\?"):
        confs.build("b", inner={"seeed": 1})
    with pytest.raises(ConfigError, match="unknown setting 'cout'"):
        confs.build(cout=1)
    with pytest.raises(ValueError, match="count 0 must be at least 1"):  # the dataclass's own check()
        confs.build(count=0)


def test_every_named_configuration_builds():
    """A one-line entry added to any registry is a configuration that builds."""
    from tasks.aerial import config as aerial_config
    from tasks.aerial import pipeline, plan
    from tasks.multimodal import config as multimodal_config

    for registry in (aerial_config.CONFIGS, multimodal_config.CONFIGS, pipeline.PIPELINES, plan.TRAJECTORIES):
        assert isinstance(registry, NamedConfigs)
        for name in registry:
            built = registry.build(name)
            assert isinstance(built, registry.model), (registry.what, name)
    assert pipeline.PIPELINES.build("superpoint+superglue").name == "superpoint+superglue"
    assert aerial_config.get_config("paper").pipeline == "superpoint+superglue"


def test_read_json_names_the_file_the_spot_and_what_to_do(tmp_path):
    from tasks.common.checks import InputError, read_json

    good = tmp_path / "a.json"
    good.write_text('{"x": [1, 2]}')
    assert read_json(good, "thing") == {"x": [1, 2]}
    with pytest.raises(InputError, match=r"missing.json: thing file not found; check the path"):
        read_json(tmp_path / "missing.json", "thing")
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": [1,\n 2,]}')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON at line 2 column 4 .*; fix the thing file"):
        read_json(bad, "thing")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"x": "\xe9"}')
    with pytest.raises(InputError, match="latin.json: cannot read thing file .*it must be UTF-8 JSON"):
        read_json(latin, "thing")
