"""One vocabulary of option checks, shared by every options class and the TOML reader.

Options classes are dataclasses that check themselves in ``__post_init__`` (as PEFT's
configs do): :func:`check_fields` checks (and gently coerces: an int where a float is
expected) every field against its annotation, then the class checks its values. A TOML
table goes through :func:`from_mapping`, which adds the unknown-key check, so a value is
checked the same way whether it comes from Python keywords or from an experiment file.
Every error is a :class:`~rankfed.errors.ConfigError` whose message names the key and
the bad value (``federation.clients = 'ten': must be of type int``).

User code is named by import path, ``"package.module:attribute"``
(:func:`load_object`); :func:`object_path` gives the path of an importable object back.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import math
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from rankfed.errors import ConfigError

__all__ = ["bad", "choice", "check_fields", "from_mapping", "load_object", "object_path", "describe_object", "accepts_keyword", "type_ok", "type_name", "positive_int", "in_range"]


def bad(key: str, value: Any, why: str) -> ConfigError:
    """The error for ``key = value``: ``ConfigError("key = value: why")``."""
    return ConfigError(f"{key} = {value!r}: {why}")


def choice(key: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise bad(key, value, f"must be one of {', '.join(map(str, choices))}")


def positive_int(key: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an int >= ``minimum`` (the type is checked by :func:`check_fields`)."""
    if value < minimum:
        raise bad(key, value, f"must be >= {minimum}")


def in_range(key: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False, note: str = "") -> None:
    """``value`` must lie in the interval from ``low`` to ``high`` (closed unless said open)."""
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise bad(key, value, f"must be in {lo}{low:g}, {high:g}{hi}" + (f" {note}" if note else ""))


def type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``, and the value coerced (an int for a float, a
    tuple for a list). Annotations it cannot check (``Any``, callables) accept anything."""
    if tp is Any or tp is object:
        return True, value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer beyond float range: +-inf, which the range checks reject
            return True, math.inf if value > 0 else -math.inf
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp is list:
        if isinstance(value, tuple):
            return True, list(value)
        return isinstance(value, list), value
    if tp is dict:
        return isinstance(value, dict), value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if origin in (list, tuple, dict, collections.abc.Callable) or tp is collections.abc.Callable:
        if origin is list and isinstance(value, tuple):
            return True, list(value)
        return (callable(value) if collections.abc.Callable in (origin, tp) else isinstance(value, origin)), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError:  # an annotation naming something not importable here: check nothing
        return {}


def check_fields(obj: Any, section: str) -> None:
    """Check every field of dataclass instance ``obj`` against its annotation, coercing in
    place; a mismatch is ``ConfigError("section.field = value: must be of type T")``."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name not in hints or not f.init:
            continue
        value = getattr(obj, f.name)
        ok, coerced = type_ok(value, hints[f.name])
        if not ok:
            raise bad(f"{section}.{f.name}", value, f"must be of type {type_name(hints[f.name])}")
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


def from_mapping(cls: type, data: Any, section: str, aliases: dict[str, str] | None = None) -> Any:
    """Build dataclass ``cls`` from the TOML table ``data``; unknown keys (with a suggestion
    for near misses) and wrong types are errors naming ``section.key``. ``aliases`` maps
    older spellings of a key to its name (both given is an error)."""
    if not isinstance(data, dict):
        raise bad(section, data, "must be a table")
    data = dict(data)
    for old, new in (aliases or {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"{section}.{old} and {section}.{new} are the same setting: give one")
            data[new] = data.pop(old)
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown key {section}.{key}{hint}")
        if key in hints:
            ok, value = type_ok(value, hints[key])
            if not ok:
                raise bad(f"{section}.{key}", data[key], f"must be of type {type_name(hints[key])}")
        kwargs[key] = value
    return cls(**kwargs)


def load_object(path: str, key: str, search: Sequence[str] = ()) -> Any:
    """The object an import path ``"package.module:attribute.sub"`` names. ``search``: folders
    tried (prepended to ``sys.path``) when the module is not importable as it is. Errors name
    ``key`` and the path."""
    if not isinstance(path, str) or ":" not in path:
        raise bad(key, path, "must be an import path 'package.module:name'")
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise bad(key, path, "must be an import path 'package.module:name'")
    try:
        module = _import(module_name, search)
    except ImportError as e:
        where = f" (also looked in {', '.join(search)})" if search else ""
        raise bad(key, path, f"cannot import module {module_name!r}{where}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise bad(key, path, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _import(module_name: str, search: Sequence[str]):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not search or (e.name and not module_name.startswith(e.name)):
            raise  # a module the user's module imports is missing: say so, do not search
    for folder in search:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return importlib.import_module(module_name)


def object_path(obj: Any) -> str | None:
    """``"module:qualname"`` of an importable module-level class or function (the path
    :func:`load_object` reads back); None for lambdas, local objects and ``__main__``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None  # (a functools.partial has no __qualname__: its arguments are not in a path)
    try:
        found = load_object(f"{module}:{qualname}", "path")
    except ConfigError:
        return None
    return f"{module}:{qualname}" if found is obj else None


def describe_object(obj: Any) -> str:
    """How a summary names user code: its import path, else ``<python: repr>``."""
    path = object_path(obj)
    if path is not None:
        return path
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    module = getattr(obj, "__module__", None)
    return f"<python: {module + '.' if module else ''}{name}>"


def accepts_keyword(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes keyword ``name`` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) or any(p.kind is p.VAR_KEYWORD for p in params)
