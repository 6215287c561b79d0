"""Name -> implementation registries, so configs and the CLI pick methods by name.

A method spec is ``name`` or ``name:key=value,key=value`` (e.g. ``owl:M=7,lam=0.1``); values
are parsed as int, float or bool when they look like one, then checked against the function's
own annotations (``Annotated[float, Field(gt=0)]``, a ``Literal`` of choices), so a wrong key,
type or range is a one-line error when the config is read, not a crash deep in the work.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import TypeAdapter, ValidationError

from prunesearch.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    meta: dict = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """Keyword parameters the function accepts after its positional inputs, with defaults."""
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind == p.KEYWORD_ONLY
        }


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta) -> Callable:
        def deco(fn: Callable) -> Callable:
            self._entries[name] = Entry(name, fn, meta)
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}': choose one of {', '.join(self.names())}")
        return self._entries[name]

    def resolve(self, spec: str | dict) -> tuple[Entry, dict[str, Any]]:
        """Parse a spec, check its parameters against the function's keywords."""
        name, params = parse_spec(spec) if isinstance(spec, str) else (spec["name"], dict(spec.get("params", {})))
        entry = self.get(name)
        allowed = entry.params()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            hint = ", ".join(allowed) or "none"
            raise UserError(f"{self.kind} '{name}' has no parameter {', '.join(unknown)} (it takes: {hint})")
        return entry, {key: _check_value(self.kind, entry, key, value) for key, value in params.items()}


@functools.lru_cache(maxsize=None)
def _adapter(fn: Callable, key: str) -> TypeAdapter | None:
    hint = typing.get_type_hints(fn, include_extras=True).get(key)
    return None if hint is None else TypeAdapter(hint)


def _check_value(kind: str, entry: Entry, key: str, value: Any) -> Any:
    """``value`` as the parameter's annotation types it (5 -> 5.0 for a float), or a UserError."""
    adapter = _adapter(entry.fn, key)
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"]
        if err["type"] in ("float_parsing", "int_parsing", "float_type", "int_type"):
            msg = "needs a number"
        raise UserError(f"{kind} '{entry.name}': {key}={value!r}: {msg[0].lower() + msg[1:]}") from None


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"bad parameter '{item}' in '{spec}': write name:key=value,key=value")
        params[key.strip()] = _parse_value(value.strip())
    if not name:
        raise UserError(f"empty method name in '{spec}'")
    return name, params
