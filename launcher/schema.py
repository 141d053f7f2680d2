"""Typed configuration from YAML: plain dataclasses, strict keys, one clear line per problem.

Recipes and cluster profiles are both nested dataclasses. `load_yaml` reads a file and
remembers the line of every key; `build` turns the mapping into dataclasses, collecting
every unknown key (with the closest valid one), wrong type and bad choice as it goes.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError, closest

Lines = dict[tuple, int]


def load_yaml(path: Path) -> tuple[dict, Lines]:
    """The mapping in `path` and the 1-based line of each key, by key path."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give a YAML file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte {err.start}: not UTF-8 text; is this the YAML file?") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:  # the reader's: characters YAML does not allow
        raise UserError(f"{path}: malformed YAML: {str(err).splitlines()[-1].strip()}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top, found {type(data).__name__}")
    lines: Lines = {}
    problems: list[str] = []
    _key_lines(node, (), lines, problems, path)
    if problems:
        raise UserError(*problems)
    return data, lines


def _key_lines(node, prefix: tuple, lines: Lines, problems: list[str], path: Path) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = (*prefix, key_node.value)
        if key in lines:
            problems.append(f"{path}:{key_node.start_mark.line + 1}: {'.'.join(key)}: "
                            f"key given twice (first on line {lines[key]}); keep one")
        lines[key] = key_node.start_mark.line + 1
        _key_lines(value_node, key, lines, problems, path)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """'megatron.expert_model_parallel_size=8' -> (('megatron', 'expert_model_parallel_size'), 8).

    The value is read as a YAML scalar, as Hydra and verl users type it.
    """
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise UserError(f"override '{text}': expected dotted.key=value, "
                        "for example megatron.expert_model_parallel_size=8")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return tuple(key.split(".")), parsed


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """Set each dotted key in the raw mapping; `build` then checks key and type."""
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for part in keys[:-1]:
            child = target.get(part)
            if not isinstance(child, dict):
                child = target[part] = {}
            target = child
        target[keys[-1]] = value


def choices(*allowed: str, default=dataclasses.MISSING):
    """A string field that takes one of `allowed` (required when no default is given)."""
    return dataclasses.field(default=default, metadata={"choices": allowed})


class _Builder:
    def __init__(self, source: Path, lines: Lines):
        self.source = source
        self.lines = lines
        self.problems: list[str] = []

    def where(self, keys: tuple) -> str:
        line = self.lines.get(keys)
        return f"{self.source}:{line}" if line else str(self.source)

    def fail(self, keys: tuple, message: str) -> None:
        self.problems.append(f"{self.where(keys)}: {'.'.join(keys)}: {message}")

    def build(self, cls, data: Any, keys: tuple):
        if not isinstance(data, dict):
            self.fail(keys, f"expected a mapping, found {_describe(data)}")
            data = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for name in data:
            if name not in fields:
                self.fail((*keys, str(name)), "unknown key" + closest(str(name), fields))
        values = {}
        for name, field in fields.items():
            if name not in data:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    self.fail((*keys, name), "required key is missing")
                continue
            values[name] = self.value(hints[name], data[name], (*keys, name), field.metadata)
        try:
            return cls(**values)
        except TypeError:  # a required key was missing: already reported
            return None

    def value(self, hint, value, keys: tuple, metadata) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (hint,) = [a for a in args if a is not type(None)]
            return self.value(hint, value, keys, metadata)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, {} if value is None else value, keys)
        if hint is bool:
            if isinstance(value, bool):
                return value
            return self.bad(keys, value, "true or false")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self.bad(keys, value, "a whole number")
        if hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            return self.bad(keys, value, "a number")
        if hint is str:
            if isinstance(value, str):
                allowed = metadata.get("choices")
                if allowed and value not in allowed:
                    self.fail(keys, f"'{value}' is not one of {', '.join(allowed)}" + closest(value, allowed))
                return value
            return self.bad(keys, value, "a string")
        if origin is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                return self.bad(keys, value, "a list")
            return [self.value(args[0], item, (*keys, str(i)), {}) for i, item in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                return self.bad(keys, value, "a mapping")
            if dataclasses.is_dataclass(args[1]):
                return {str(k): self.build(args[1], v, (*keys, str(k))) for k, v in value.items()}
            out = {}
            for k, v in value.items():
                if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                    self.fail((*keys, str(k)), f"{_describe(v)} is not a plain value; quote it, "
                              f"for example {k}: \"1\"")
                    continue
                out[str(k)] = str(v)
            return out
        if hint is typing.Any:
            return value
        raise TypeError(f"schema type {hint} is not supported")  # a bug in a dataclass, not input

    def bad(self, keys: tuple, value, expected: str):
        self.fail(keys, f"expected {expected}, found {_describe(value)}")
        return None


def _describe(value) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return f"{value!r} ({type(value).__name__})"


def build(cls, data: dict, source: Path, lines: Lines | None = None):
    """`cls` filled from `data`; every problem found is raised together as one UserError."""
    builder = _Builder(source, lines or {})
    result = builder.build(cls, data, ())
    if builder.problems:
        raise UserError(*builder.problems)
    return result
