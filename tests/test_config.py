from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError

from emmae.config import (
    EmmaeConfig,
    add_config_arguments,
    config_from_args,
    PreprocessConfig,
    config_record,
    load_config,
    resolve_diameter_px,
)
from emmae.errors import ConfigError


def test_defaults_are_the_reference_numbers():
    config = EmmaeConfig()
    pre = config.preprocess
    # the reference's full-resolution sizes (sigma 3, 9x9, 20-px boxes) on a 4096 micrograph, in grid pixels
    assert (pre.grid_px, pre.tile_px) == (1024, 64)
    assert (pre.gaussian_sigma_grid_px * 4, pre.gaussian_radius_grid_px * 4, pre.box_grid_px * 4) == (3.0, 4.0, 20.0)
    assert (pre.clahe_clip_limit, pre.clahe_tiles, pre.box_passes) == (2.0, 16, 2)
    assert config.cluster.levels == (3, 4, 5)
    assert config.postprocess.area_fraction == 0.04


def test_frozen_and_extra_forbidden():
    config = EmmaeConfig()
    with pytest.raises(ValidationError):
        config.preprocess.grid_px = 512  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        PreprocessConfig(unknown=1)  # type: ignore[call-arg]


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "emmae.toml"
    path.write_text('[preprocess]\nmode = "reference"\ndiameter_A = 300.0\n\n[cluster]\nlevels = [3, 4]\n')
    config = load_config(path, ["preprocess.pixel_size_A=1.34", "output.flip_y=true", "stream.patterns=['*.tif']"])
    assert config.preprocess.mode == "reference"
    assert config.preprocess.diameter_A == 300.0
    assert config.preprocess.pixel_size_A == 1.34
    assert config.cluster.levels == (3, 4)
    assert config.output.flip_y is True
    assert config.stream.patterns == ("*.tif",)


def test_plain_string_override():
    assert load_config(None, ["model.bundle=/data/model.onnx"]).model.bundle.as_posix() == "/data/model.onnx"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("preprocess.clahe_clip_limit=-1", r"preprocess\.clahe_clip_limit: .*got -1.*allowed: >= 0, <= 256"),
        ("postprocess.area_fraction=1.5", r"postprocess\.area_fraction: .*allowed: > 0, < 1"),
        ("preprocess.mode=slow", r"preprocess\.mode: .*allowed: one of 'fast', 'reference'"),
        ("preprocess.grid_px=1000", r"preprocess\.grid_px: .*multiple of 64"),
        ("stream.settle_s=-2", r"stream\.settle_s: .*allowed: >= 0"),
        ("preprocess.bogus=3", r"preprocess\.bogus: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_name_the_field_and_range(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("bad", ["no_equals_sign", "too.many.dots=1", "=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, [bad])


def test_bad_toml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[preprocess\nmode=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_both_diameters_rejected():
    with pytest.raises(ConfigError, match="diameter_px or diameter_A, not both"):
        load_config(None, ["preprocess.diameter_px=50", "preprocess.diameter_A=200"])


def test_resolve_diameter():
    assert resolve_diameter_px(PreprocessConfig(diameter_px=56)) == 56.0
    assert resolve_diameter_px(PreprocessConfig(diameter_A=300), header_pixel_size_A=1.5) == pytest.approx(200.0)
    # the configured pixel size overrides the header's
    assert resolve_diameter_px(PreprocessConfig(diameter_A=300, pixel_size_A=3.0), 1.5) == pytest.approx(100.0)


def test_resolve_diameter_errors():
    with pytest.raises(ConfigError, match="no particle diameter"):
        resolve_diameter_px(PreprocessConfig())
    with pytest.raises(ConfigError, match="needs a pixel size"):
        resolve_diameter_px(PreprocessConfig(diameter_A=300), header_pixel_size_A=None)


def test_config_record_round_trips_through_json():
    config = load_config(None, ["preprocess.diameter_px=40", "cluster.levels=[3, 4]"])
    record = json.loads(json.dumps(config_record(config, ["emmae-pick", "x.mrc"])))
    assert record["argv"] == ["emmae-pick", "x.mrc"]
    assert record["emmae_version"]
    assert EmmaeConfig.model_validate(record["config"]) == config


def test_cli_options(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[preprocess]\ndiameter_px = 40\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--set", "preprocess.mode=reference", "--set", "backend.device=cpu"])
    config = config_from_args(args)
    assert (config.preprocess.diameter_px, config.preprocess.mode, config.backend.device) == (40, "reference", "cpu")
    assert config_from_args(parser.parse_args([])) == EmmaeConfig()
    with pytest.raises(ConfigError, match="backend.device"):
        config_from_args(parser.parse_args(["--set", "backend.device=tpu"]))
