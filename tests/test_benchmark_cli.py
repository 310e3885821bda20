"""The benchmark programs' command lines: `--help` shows every option's default, and each
local dataset's builder name is the `--env` name of the script that trains on it."""

import argparse
import contextlib
import importlib

import pytest

from benchmark import datasets, gif, report, run, speed
from benchmark.suites import CALQL, SCRIPTS

MODULES = {script: importlib.import_module(script.removesuffix(".py")) for script in SCRIPTS}
# Builders whose data no --env loads by default: the arguments that use it instead.
STAND_INS = {"pen-cloned-local": (CALQL, ["--env", "pen-binary", "--dataset-id",
                                          "local/pen/cloned-v0"]),
             # a second maze for the pointmaze-binary preset (issue 18, item 3)
             "pointmaze-umaze-binary": (CALQL, ["--env", "pointmaze-binary", "--dataset-id",
                                                "local/pointmaze/umaze-v0"])}


class Parsed(Exception):
    """Raised in place of parsing, carrying the parser the program built."""


def parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser a program's main() builds (caught at its parse_args call)."""
    def grab(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Parsed) as caught:
        main([])
    return caught.value.args[0]


@pytest.mark.parametrize(("main", "n_values"), [(run.main, 7), (report.main, 0),
                                               (datasets.main, 0), (speed.main, 7),
                                               (gif.main, 2)],
                         ids=["run", "report", "datasets", "speed", "gif"])
def test_help_shows_every_default(main, n_values, monkeypatch):
    """Every option has help; each default that is a value (not None: the help says what
    then) appears as `(default: VALUE)`."""
    parser = parser_of(main, monkeypatch)
    text = " ".join(parser.format_help().split())  # unwrapped
    shown = 0
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        assert action.help, f"{action.option_strings[0]} has no help"
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS):
            continue  # a switch, or nothing to show
        value = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        assert f"(default: {value})" in text, (action.option_strings, value)
        shown += 1
    assert shown == n_values


def test_run_help_names_its_defaults(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--jobs JOBS runs at once (Slurm: array parallelism) (default: 2)",
                     "run root (default: runs/bench)", "(default: 1440)",
                     "(default: cores // jobs)"):
        assert expected in text


def dataset_of(module, argv: list[str]) -> str:
    """The dataset id a script trains on for these arguments (SystemExit if it rejects them)."""
    args = module.parse_args(argv)
    return args.dataset_id or module.resolve_source(args.env).dataset_id


def test_builder_names_are_the_env_names_they_serve():
    for name, spec in datasets.LOCAL_DATASETS.items():
        if name in STAND_INS:
            script, argv = STAND_INS[name]
            assert dataset_of(MODULES[script], argv) == spec.dataset_id
            continue
        serving = []
        for script, module in MODULES.items():
            with contextlib.suppress(SystemExit):  # not one of this script's --env names
                serving.append((script, dataset_of(module, ["--env", name])))
        assert serving == [(serving[0][0], spec.dataset_id)], (name, serving)


def test_old_builder_names_still_work(monkeypatch, capsys):
    assert datasets.ALIASES == {"pointmaze-sparse": "pointmaze-binary"}
    for old, new in datasets.ALIASES.items():
        assert old not in datasets.LOCAL_DATASETS and new in datasets.LOCAL_DATASETS
        assert datasets.dataset_id(old) == datasets.dataset_id(new) == "local/pointmaze/sparse-v0"
        assert datasets._spec(old) is datasets.LOCAL_DATASETS[new] and datasets.is_local(old)
    monkeypatch.setattr(datasets, "is_built", lambda name: True)
    datasets.main(["pointmaze-sparse", "pointmaze-binary"])
    assert capsys.readouterr().out.count("present local/pointmaze/sparse-v0") == 2
    built = []  # the runner prepares an old name as a local dataset
    monkeypatch.setattr(datasets, "ensure", built.append)
    job = type("J", (), {"entry": type("E", (), {"datasets": ("pointmaze-sparse",)})})
    assert run.prepare_datasets([job], log=lambda _: None) == {} and built == ["pointmaze-sparse"]


def test_unknown_builder_name_suggests_the_closest(capsys):
    with pytest.raises(SystemExit):
        datasets.main(["pendulum-expret"])
    assert "unknown dataset pendulum-expret (did you mean pendulum-expert?)" in (
        capsys.readouterr().err)
    with pytest.raises(KeyError, match=r"did you mean local/pendulum/expert-v0\?"):
        datasets._spec("local/pendulum/expret-v0")
