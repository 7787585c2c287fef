"""bench.settings: the one check of settings people write, against the types that declare them."""

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from bench.errors import UserError
from bench.settings import check_settings, describe_type


@dataclass
class Toy:
    count: PositiveInt = 1
    rate: NonNegativeFloat | None = None
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    name: str = "x"


@pytest.mark.parametrize("annotation, words", [
    (PositiveInt, "an integer >= 1"), (NonNegativeFloat | None, "a number >= 0, or null"),
    (Literal["a", "b"], "one of: a, b"), (bool, "true or false"), (str | None, "a string, or null"),
    (Literal[64, 32] | Literal["bf16-mixed", "64"] | None, "one of: 64, 32, bf16-mixed, or null")])
def test_a_type_is_said_in_a_suite_writers_words(annotation, words):
    assert describe_type(annotation) == words


@pytest.mark.parametrize("values", [{"count": 3, "rate": 1, "mode": "b", "flag": True},
                                    {"rate": None, "name": "y"}, {}])
def test_values_of_the_declared_types_pass(values):
    check_settings(Toy, values, "toy")


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, "toy.count=0: give an integer >= 1"),
    ({"count": 2.0}, "toy.count=2.0: give an integer >= 1"),  # jsonargparse would take it as 2
    ({"count": True}, "toy.count=True: give an integer >= 1"),
    ({"count": "3"}, "toy.count='3': give 3 without quotes"),
    ({"rate": -0.5}, "toy.rate=-0.5: give a number >= 0, or null"),
    ({"mode": "c"}, "toy.mode='c': give one of: a, b"),
    ({"flag": "yes"}, "toy.flag='yes': give true or false"),
    ({"name": 3}, "toy.name=3: give a string")])
def test_a_value_of_another_type_is_refused_naming_what_the_setting_takes(values, message):
    with pytest.raises(UserError, match=f"^{message}"):
        check_settings(Toy, values, "toy")


def test_the_checked_values_are_left_as_written():
    values = {"count": 2, "nested": {"size": "64"}}

    @dataclass
    class Holder:
        count: int = 1
        nested: dict[str, Any] = field(default_factory=dict)

    check_settings(Holder, values, "holder")
    assert values == {"count": 2, "nested": {"size": "64"}}
