"""The one check of settings written by people (a suite's params / data / trainer / eval, bench
eval's --set): values against the type annotations of the class they configure, by jsonargparse
(as bench fit's LightningCLI checks them). A setting's type says what it takes, ranges included
(jsonargparse.typing's PositiveInt, NonNegativeFloat, `Literal[...]` choices), and its default
lives on the class; nothing else restates either."""

from __future__ import annotations

import copy
import functools
import re
import types
import typing
from typing import Any, Literal, Union

from bench.errors import UserError


class SettingError(UserError):
    """A setting of a type it does not take: `key` names it, `reason` says what it takes."""

    def __init__(self, section: str, key: str, reason: str) -> None:
        super().__init__(f"{section}.{key}={reason}")
        self.key, self.reason = key, reason


@functools.cache
def _argument_parser(cls, skip: frozenset[str]):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, skip=set(skip))
    return parser


def describe_type(annotation) -> str:
    """What a type annotation takes, in a suite writer's words: `int | None` -> 'an integer,
    or null'; PositiveInt -> 'an integer >= 1'; Literal['a', 'b'] -> 'one of: a, b'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is Literal]
        others = [a for a in args if a not in literals and a is not type(None)]
        if literals:  # one list of choices: Literal[64, 32] | Literal["bf16-mixed"]
            others.insert(0, Literal[tuple(v for a in literals for v in typing.get_args(a))])
        named = " or ".join(describe_type(a) for a in others)
        return f"{named}, or null" if type(None) in args else named
    if origin is Literal:
        return "one of: " + ", ".join(dict.fromkeys(map(str, args)))
    if origin is list:
        return "a list of " + {int: "integers", str: "names"}.get(args[0] if args else Any,
                                                                  "values")
    if origin is dict or annotation is dict:
        return "a mapping"
    if annotation is bool:
        return "true or false"
    words = {int: "an integer", float: "a number", str: "a string", Any: "a value"}
    restrictions = getattr(annotation, "_restrictions", None)  # jsonargparse's restricted types
    if restrictions:
        symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        kind = annotation._type
        return " and ".join(f"{words[kind]} >= {bound + 1}" if kind is int and op.__name__ == "gt"
                            else f"{words[kind]} {symbols[op.__name__]} {bound}"
                            for op, bound in restrictions)
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _annotation(cls, name: str):
    target = cls.__init__ if not hasattr(cls, "__dataclass_fields__") else cls
    try:
        return typing.get_type_hints(target).get(name, Any)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: described as a value
        return Any


def _changed_kind(value, parsed) -> bool:
    """Whether parsing made the value another kind of thing: "64" -> 64, "yes" -> True, 1.0 -> 1
    (jsonargparse converts these; the run, given the value as written, would not)."""
    return (isinstance(value, bool) != isinstance(parsed, bool)
            or isinstance(value, str) != isinstance(parsed, str)
            or (isinstance(value, float) and not isinstance(parsed, float)))


def check_settings(cls, values: dict[str, Any], section: str,
                   skip: set[str] | frozenset[str] = frozenset()) -> None:
    """`values` against the annotated types of cls's constructor arguments (less `skip`):
    `params: {k: "eight"}` is refused naming the key and what it takes, before anything is
    built."""
    try:
        # a copy: jsonargparse converts nested values in place ("64" -> 64 inside a mapping)
        parsed = _argument_parser(cls, frozenset(skip)).parse_object(copy.deepcopy(values))
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError and its kin
        text = " ".join(str(err).split())
        found = re.search(r'key "([^"]+)"', text)
        if found and found[1] in values:
            name = found[1]
            raise SettingError(section, name, f"{values[name]!r}: give "
                               f"{describe_type(_annotation(cls, name))}") from None
        raise UserError(f"{section}: {text}") from None
    for name, value in values.items():
        if value is not None and _changed_kind(value, parsed.get(name)):
            number = isinstance(value, str) and isinstance(parsed.get(name), (int, float))
            hint = (f"{parsed.get(name)!r} without quotes (a string here is not read as a number)"
                    if number and not isinstance(parsed.get(name), bool)
                    else describe_type(_annotation(cls, name)))
            raise SettingError(section, name, f"{value!r}: give {hint}")
