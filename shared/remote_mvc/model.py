"""Typed model schemas: fields with types, defaults and validators.

A model is declared as a class whose attributes are :class:`Field` objects::

    class ExampleModel(Model):
        name = Field(str, "xxx", max_length(200))
        value = Field(int, 0)

The schema holds no state; :class:`~remote_mvc.server.ModelServer` keeps the
values and revision. :meth:`Model.validate` turns a raw change request into
normalized values or raises :class:`~remote_mvc.errors.ValidationError` without
side effects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from .errors import ValidationError

__all__ = ["Field", "Model", "ExampleModel", "between", "max_length", "one_of", "non_empty"]

Validator = Callable[[Any], Any]


class Field:
    """One typed field of a model, with a default and optional validators.

    A validator receives the (type-checked) value and either returns ``None``/``True``
    to accept it, returns ``False`` or raises ``ValueError``/``ValidationError`` to refuse.
    """

    _TYPES = (str, int, float, bool)

    def __init__(self, type_: type, default: Any, *validators: Validator, doc: str = "") -> None:
        if type_ not in self._TYPES:
            raise TypeError(f"field type must be one of {[t.__name__ for t in self._TYPES]}")
        self.type = type_
        self.validators = validators
        self.doc = doc
        self.name = ""
        self.default = self.check(default)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def check(self, value: Any) -> Any:
        """Return the value normalized to the field's type, or raise ValidationError."""
        label = self.name or "field"
        t = self.type
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int past float's range (10**400): refused like any bad value
                raise ValidationError(f"{label}: {str(value)[:40]}... is too large for a float") from None
        if not isinstance(value, t) or (t is int and isinstance(value, bool)):
            raise ValidationError(f"{label}: expected {t.__name__}, got {type(value).__name__} {value!r:.80}")
        if t is float and not math.isfinite(value):  # type: ignore[arg-type]  # value is a float here
            raise ValidationError(f"{label}: must be a finite number, got {value!r}")
        for validator in self.validators:
            try:
                ok = validator(value)
            except (ValueError, ValidationError) as exc:
                raise ValidationError(f"{label}: {exc}") from None
            if ok is False:
                name = getattr(validator, "__name__", "validator")
                raise ValidationError(f"{label}: {value!r:.80} refused by {name}")
        return value

    def parse(self, text: str) -> Any:
        """Parse a command-line string into the field's type (then check it)."""
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(text)
                return self.check(lowered in ("true", "1", "yes", "on"))
            return self.check(self.type(text))
        except ValueError:
            raise ValidationError(f"{self.name}: cannot parse {text!r} as {self.type.__name__}") from None


class Model:
    """Base class of model schemas; subclasses declare :class:`Field` attributes."""

    fields: ClassVar[dict[str, Field]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            fields.update(getattr(base, "fields", {}))
        fields.update({k: v for k, v in vars(cls).items() if isinstance(v, Field)})
        cls.fields = fields

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value."""
        return {name: f.default for name, f in cls.fields.items()}

    @classmethod
    def validate(cls, current: Mapping[str, Any], changes: Any) -> dict[str, Any]:
        """Check a change request against the schema; return the normalized changes.

        Raises ValidationError for a non-dict, an empty change, unknown fields,
        wrong types and failed field or model validators. Nothing is modified.
        """
        if not isinstance(changes, Mapping):
            raise ValidationError(f"changes must be a dict of field: value, got {type(changes).__name__}")
        if not changes:
            raise ValidationError("empty change: give at least one field")
        unknown = [k for k in changes if k not in cls.fields]
        if unknown:
            shown = ", ".join(repr(k)[:60] for k in unknown[:5])
            raise ValidationError(f"unknown field(s) {shown}; fields are: {', '.join(cls.fields)}")
        normalized = {name: cls.fields[name].check(value) for name, value in changes.items()}
        cls.check({**current, **normalized})
        return normalized

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> None:
        """Override for rules across fields; raise ValidationError to refuse."""

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """The schema as plain data (sent to clients so they can parse input)."""
        return {n: {"type": f.type.__name__, "default": f.default, "doc": f.doc} for n, f in cls.fields.items()}


# validators ---------------------------------------------------------------

def between(low: float | None = None, high: float | None = None) -> Validator:
    """Accept numbers in [low, high]."""
    def between_(value: float) -> None:
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{value!r} is outside [{low}, {high}]")
    return between_


def max_length(n: int) -> Validator:
    """A validator refusing strings longer than ``n``."""
    def max_length_(value: str) -> None:
        if len(value) > n:
            raise ValueError(f"longer than {n} characters ({len(value)})")
    return max_length_


def non_empty(value: str) -> None:
    """Refuse an empty (or blank) string."""
    if not value.strip():
        raise ValueError("must not be empty")


def one_of(*choices: Any) -> Validator:
    """A validator refusing values other than ``choices``."""
    def one_of_(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {choices!r}")
    return one_of_


class ExampleModel(Model):
    """The seed's model: a name and a value."""

    name = Field(str, "xxx", max_length(200), doc="a display name")
    value = Field(int, 0, between(-(2**53), 2**53), doc="an integer value")
