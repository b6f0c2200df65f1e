"""Configs as nested dicts of sections: defaults <- a YAML file <- `--set section.key=value` overrides.

Every key and its type come from the defaults (train.py's DEFAULTS): a key they do not list is an
error with a suggestion, and a value of the wrong type is an error naming the key, each in one line
(ConfigError), never a yaml traceback or a silently ignored setting.
"""
import argparse
import copy
import difflib

import yaml


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's --help: descriptions and epilogs as written, and each option's default after its
    help. Not shown: None (the help says what happens then), off switches and empty lists."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "%(default)" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat):
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_type(key, default, value):
    """Return `value` with the type of `default`, or raise ConfigError naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, list):
        if isinstance(value, list) and len(value) == len(default):
            return [check_type(f"{key}[{i}]", d, v) for i, (d, v) in enumerate(zip(default, value))]
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"config key '{key}' expects {type(default).__name__}"
                      f"{f' of length {len(default)}' if isinstance(default, list) else ''}, got {value!r}")


def parse_yaml(text, source):
    """yaml.safe_load, with a syntax error turned into a one-line ConfigError naming `source`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def apply_overrides(flat, defaults, overrides, source):
    """Set each dotted key of `overrides` in `flat` (the flattened config), checked against `defaults`."""
    known = flatten(defaults)
    for key, value in overrides.items():
        if key not in known and isinstance(defaults.get(key), dict):
            raise ConfigError(f"config key '{key}' in {source} is a section: give it a mapping of "
                              f"{', '.join(defaults[key])}")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
        flat[key] = check_type(key, known[key], value)


def load_config(defaults, path=None, sets=()):
    """`defaults` (left untouched) <- the YAML file at `path` <- each "key=value" of `sets` (values parsed
    as YAML, so `--set optim.betas=[0.9,0.99]` is a list). Returns the nested config."""
    flat = flatten(copy.deepcopy(defaults))
    if path:
        try:
            with open(path) as f:
                tree = parse_yaml(f, path) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}")
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} is not a mapping of sections")
        apply_overrides(flat, defaults, flatten(tree), path)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        apply_overrides(flat, defaults, {key.strip(): parse_yaml(text, f"--set {item!r}")}, "--set")
    return unflatten(flat)
