"""The flags every command shares: --help text, --version, --device words, -v/-q, progress bars."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest

from emmae import __version__
from emmae.runtime.commands import evaluate
from emmae.runtime.commands import pick as cli
from emmae.commandline import log_level, progress_bar
from emmae.runtime.commands import stream as daemon
from emmae import adapt  # torch-free until it runs

PARSERS = {"emmae-pick": cli.build_parser, "emmae-eval": evaluate.build_parser, "emmae-stream": daemon.build_parser,
           "emmae-adapt": adapt.build_parser}


def _all_parsers() -> dict:
    parsers = dict(PARSERS)
    try:
        from emmae.export import cli as export_cli
        from emmae.trainer import cli as train_cli
    except ImportError:  # the train extra (torch) is not installed
        return parsers
    return parsers | {"emmae-train": train_cli.build_parser, "emmae-export": export_cli.build_parser}


@pytest.mark.parametrize("name", sorted(_all_parsers()))
def test_help_is_plain_text_and_explains_every_option(name):
    parser = _all_parsers()[name]()
    text = parser.format_help()
    assert "``" not in text and "::\n" not in text and ":class:" not in text
    assert parser.prog == name
    unexplained = [a.option_strings or [a.dest] for a in parser._actions if not (a.help and a.help.strip()) and a.help != argparse.SUPPRESS]
    assert unexplained == []


@pytest.mark.parametrize("name", sorted(_all_parsers()))
def test_version(name, capsys):
    with pytest.raises(SystemExit) as stop:
        _all_parsers()[name]().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"{name} {__version__}"


@pytest.mark.parametrize("name", sorted(set(_all_parsers()) - {"emmae-eval", "emmae-export"}))
def test_device_takes_the_same_words_everywhere(name):
    parser = _all_parsers()[name]()
    (action,) = [a for a in parser._actions if "--device" in a.option_strings]
    assert list(action.choices) == ["auto", "cpu", "gpu"]


def test_train_device_gpu_without_a_gpu_is_a_message_not_a_traceback(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    from emmae.trainer import cli as train_cli

    assert train_cli.main(["--device", "gpu", "--out", str(tmp_path / "run"), "--epochs", "1", str(tmp_path)]) == 2
    assert any("--device gpu" in r.getMessage() and "no usable CUDA GPU" in r.getMessage() for r in caplog.records)
    assert train_cli.torch_device("cpu") == "cpu" and train_cli.torch_device(None) is None


def test_verbosity_flags():
    parser = cli.build_parser()
    assert log_level(parser.parse_args([])) == logging.INFO
    assert log_level(parser.parse_args(["-v"])) == logging.DEBUG
    assert log_level(parser.parse_args(["-q"])) == logging.WARNING
    assert log_level(parser.parse_args(["-qq"])) == logging.ERROR
    assert parser.parse_args(["-o", "x"]).out == Path("x")


def test_quiet_pick_logs_no_info(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    assert cli.main([str(tmp_path / "none.mrc"), "--diameter-px", "20", "-q", "-o", str(tmp_path / "o")]) == cli.EXIT_FAILED
    assert logging.getLogger().level == logging.WARNING
    logging.getLogger().setLevel(logging.INFO)


def test_log_lines_are_written_above_the_progress_bar(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # the console handler the commands log through
    root.addHandler(handler)
    try:
        with progress_bar(range(3), 3, "micrograph", enabled=True) as bar:
            for i in bar:
                logging.getLogger("emmae.test").warning("line %d", i)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    for i in range(3):
        (line,) = [segment for segment in re.split(r"[\r\n]", err) if f"line {i}" in segment]
        assert line.strip() == f"line {i}"  # never glued to the bar's text
    assert "3/3" in err


def test_progress_bars_need_no_extra():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"tqdm\b", dep) for dep in project["dependencies"])


def _output_options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    (group,) = [g for g in parser._action_groups if g.title == "output"]
    return {a.option_strings[-1]: (a.option_strings, a.choices, a.help) for a in group._group_actions}


def test_stream_takes_the_output_options_of_pick():
    pick, stream = _output_options(cli.build_parser()), _output_options(daemon.build_parser())
    shared = {"--format", "--flip-y", "--scale", "--strip-prefix", "--add-prefix", "--pixel-size-A", "--project-root", "--out"}
    assert shared <= set(pick) and shared <= set(stream)
    assert {k: pick[k] for k in shared - {"--out"}} == {k: stream[k] for k in shared - {"--out"}}  # one definition
    assert pick["--out"][0] == stream["--out"][0] == ["-o", "--out"]  # (defaults differ: emmae_picks, WATCH/emmae_picks)
    argv = ["--watch", "x", "--diameter-A", "300", "--format", "star", "cbox", "--flip-y", "--scale", "2", "--strip-prefix", "/data/",
            "--add-prefix", "J1/", "--pixel-size-A", "1.5", "--device", "cpu"]
    config = daemon._config(daemon.build_parser().parse_args(argv))
    assert config.output.formats == ("star", "cbox") and config.output.flip_y and config.output.coordinate_scale == 2
    assert (config.output.strip_prefix, config.output.add_prefix) == ("/data/", "J1/")
    assert config.preprocess.pixel_size_A == 1.5 and config.backend.device == "cpu"
    assert config.output == cli._config(cli.build_parser().parse_args(argv[2:])).output


def test_stream_takes_threads_batch_tiles_and_verbosity(tmp_path, monkeypatch):
    from emmae.synth import SynthParams, write_session

    opened = {}
    real_open = daemon.Encoder.open

    def spy(*args, **kwargs):
        opened["args"] = args
        return real_open(*args, **kwargs)

    monkeypatch.setattr(daemon.Encoder, "open", spy)
    watch = tmp_path / "w"
    write_session(watch, 1, SynthParams(shape=(256, 256), diameter_px=24.0, pixel_size_A=4.0), seed=1)
    common = ["--watch", str(watch), "--diameter-px", "24", "--once", "--settle-s", "0", "--progress", "plain"]
    assert daemon.main([*common, "--threads", "0"]) == 2
    assert daemon.main([*common, "--threads", "1", "--batch-tiles", "64", "-q"]) == 0
    assert opened["args"][3:] == (64, 1)  # batch_tiles, threads reach the encoder
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING
    assert (watch / "emmae_picks" / "w" / "mic_00000_autopick.star").is_file()
    logging.getLogger().setLevel(logging.INFO)
