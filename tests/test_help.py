"""Every script's --help says what each option does and what it is when not given."""
import argparse
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every script: a file of the repository, experiments/ or bench/ with a main().
SCRIPTS = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                 for pattern in ("*.py", "experiments/*.py", "bench/*.py") for path in ROOT.glob(pattern)
                 if "\ndef main(" in path.read_text())


def test_every_script_is_found():
    assert {"train", "sample", "evaluate", "extract_latents", "experiments.study", "bench.run_all"} <= set(SCRIPTS)


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
