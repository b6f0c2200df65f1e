"""Every script's --help says what each option does and what it is when not given."""
import argparse
import importlib

import pytest

SCRIPTS = ["extract_latents", "train", "sample", "evaluate", "experiments.study", "experiments.loss_by_t",
           "experiments.swap_models", "bench.bench_extract", "bench.bench_fid", "bench.bench_sample",
           "bench.bench_train", "bench.build_carry", "bench.run_all", "experiments.plot_run"]


class Parsed(Exception):
    pass


def parser_of(module, monkeypatch):
    """The ArgumentParser `module.main` builds, caught as it starts parsing."""
    def catch(parser, *args, **kwargs):
        raise Parsed(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed) as caught:
        importlib.import_module(module).main(["--help"])
    return caught.value.args[0]


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_shows_every_default(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    text = " ".join(parser.format_help().split())   # undo the line wrapping
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{module} {name} has no help"
        default = action.default
        if default is None or default is False or default == []:
            continue   # nothing to show: the help says what happens without it
        shown = " ".join(str(default).split())
        assert f"default: {shown}" in text, f"{module} {name}: default {default!r} not in --help"
