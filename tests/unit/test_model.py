import math

import pytest

from remote_mvc import ExampleModel, Field, Model, ValidationError, between, max_length, non_empty, one_of
from remote_mvc.ticker import TickerModel


class Shop(Model):
    item = Field(str, "tea", non_empty, max_length(10))
    count = Field(int, 1, between(0, 100))
    price = Field(float, 1.5)
    open = Field(bool, True)
    size = Field(str, "m", one_of("s", "m", "l"))

    @classmethod
    def check(cls, values):
        if values["count"] > 0 and not values["open"]:
            raise ValidationError("a closed shop holds no stock")


def test_defaults_and_schema():
    assert ExampleModel.defaults() == {"name": "xxx", "value": 0}
    assert Shop.describe()["count"] == {"type": "int", "default": 1, "doc": ""}
    assert set(TickerModel.fields) >= {"tick", "price", "time", "interval", "paused"}


def test_valid_change_is_normalized():
    assert Shop.validate(Shop.defaults(), {"price": 2}) == {"price": 2.0}
    assert isinstance(Shop.validate(Shop.defaults(), {"price": 2})["price"], float)
    assert Shop.validate(Shop.defaults(), {"item": "coffee", "count": 0}) == {"item": "coffee", "count": 0}


@pytest.mark.parametrize("changes, message", [
    ({}, "empty change"),
    ([("count", 1)], "must be a dict"),
    ("count=1", "must be a dict"),
    ({"colour": "red"}, "unknown field"),
    ({"count": "3"}, "expected int, got str"),
    ({"count": True}, "expected int, got bool"),
    ({"count": 2.0}, "expected int, got float"),
    ({"price": math.nan}, "finite"),
    ({"price": "1"}, "expected float"),
    ({"open": 1}, "expected bool"),
    ({"count": 101}, "outside"),
    ({"item": ""}, "must not be empty"),
    ({"item": "x" * 11}, "longer than 10"),
    ({"size": "xl"}, "not one of"),
    ({"open": False}, "closed shop"),
    ({"item": "ok", "count": -1}, "outside"),
])
def test_invalid_changes_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(ValidationError, match=message):
        Shop.validate(Shop.defaults(), changes)


def test_validator_returning_false_refuses():
    class M(Model):
        even = Field(int, 0, lambda v: v % 2 == 0)

    with pytest.raises(ValidationError, match="refused by"):
        M.validate(M.defaults(), {"even": 3})


def test_field_parse_from_text():
    assert Shop.fields["count"].parse("7") == 7
    assert Shop.fields["open"].parse("no") is False
    assert Shop.fields["price"].parse("2.5") == 2.5
    with pytest.raises(ValidationError, match="cannot parse"):
        Shop.fields["count"].parse("seven")
    with pytest.raises(ValidationError):
        Shop.fields["open"].parse("maybe")


def test_bad_default_or_type_is_a_schema_error():
    with pytest.raises(ValidationError):
        Field(int, "zero")
    with pytest.raises(TypeError):
        Field(list, [])
