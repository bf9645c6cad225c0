"""One strict parser for the package's config dataclasses (settings files, records, manifests).

Every config dataclass (:class:`~czii_kit.preprocess.PreprocessConfig`,
:class:`~czii_kit.infer.InferenceConfig`, :class:`~czii_kit.postprocess.MergeConfig`,
:class:`~czii_kit.refine.RefineConfig`, :class:`~czii_kit.rescore.RescoreConfig`,
:class:`~czii_kit.templates.TemplateConfig`, ...) derives from :class:`StrictConfig`, whose
:meth:`~StrictConfig.from_dict` refuses what it does not understand instead of ignoring it:

- an unknown (e.g. misspelt) key;
- a value of the wrong type for the field's annotation (``int``, ``float``, ``bool``, ``str``,
  ``None``, unions, tuples / sequences of those; a ``bool`` is not a number here);
- a value the dataclass itself rejects (its ``__post_init__`` range checks).

Each raises :class:`~czii_kit.errors.SettingsError` naming the file (``where``) and the dotted key
(``section``), which the command line prints as one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from czii_kit.errors import SettingsError


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return "a list" if origin in (tuple, list, Sequence) else getattr(origin, "__name__", str(origin))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(value, hint):
    """``value`` if it fits the annotation ``hint`` (JSON lists become tuples for tuple fields), else ``TypeError``."""
    if hint is Any or hint is typing.Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return check_type(value, arg)
            except TypeError:
                continue
        raise TypeError(f"expected {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list, Sequence) or hint in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                items = tuple(check_type(v, args[0]) for v in value)
            elif args and origin is tuple:
                if len(args) != len(value):
                    raise TypeError(f"expected a list of {len(args)} values, got {value!r}")
                items = tuple(check_type(v, a) for v, a in zip(value, args, strict=True))
            elif args:
                items = tuple(check_type(v, args[0]) for v in value)
            else:
                items = tuple(value)
            return items if origin is tuple or hint is tuple else value
    elif origin in (dict, Mapping) or hint in (dict, Mapping):
        if isinstance(value, Mapping):
            return value
    else:
        return value  # an annotation this parser does not check (arrays, callables, ...)
    raise TypeError(f"expected {_type_name(hint)}, got {value!r}")


def parse_dataclass(cls, data: Mapping | None, where: str | Path | None = None, section: str = ""):
    """An instance of dataclass ``cls`` from ``data`` (``None``: the defaults), checked strictly.

    Raises
    ------
    SettingsError
        ``data`` is not a mapping, has a key ``cls`` does not know, a value of the wrong type, or
        one that ``cls`` rejects; the message names ``where`` and ``section.key``.
    """
    prefix = f"{section}: " if section else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingsError(where, f"{prefix}expected an object of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{section}.{key}" if section else str(key)
        if key not in names:
            raise SettingsError(where, f"{dotted}: unknown setting (known: {', '.join(names)})")
        try:
            kwargs[key] = check_type(value, hints.get(key, Any))
        except TypeError as exc:
            raise SettingsError(where, f"{dotted}: {exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SettingsError(where, f"{prefix}{exc}") from None


class StrictConfig:
    """Mixin of the config dataclasses: ``to_dict`` (JSON-able) and the strict ``from_dict``."""

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None, where: str | Path | None = None, section: str = ""):
        """Build from a (possibly partial) mapping, strictly (:func:`parse_dataclass`)."""
        return parse_dataclass(cls, data, where, section)
