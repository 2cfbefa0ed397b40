import pytest
from Pyro5.serializers import serializers

import remote_mvc
from remote_mvc import errors


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_crosses_the_wire_with_its_type_and_message(name):
    cls = getattr(errors, name)
    exc = cls("something precise went wrong")
    ser = serializers["serpent"]
    data = ser.dumps(exc)
    back = ser.loads(data)
    assert type(back) is cls
    assert str(back) == "something precise went wrong"


def test_error_attributes_survive():
    ser = serializers["serpent"]
    back = ser.loads(ser.dumps(errors.HistoryCompacted("gone", 42)))
    assert back.first_revision == 42


def test_tree():
    assert issubclass(errors.AuthenticationError, errors.AuthError)
    assert issubclass(errors.PermissionDenied, errors.AuthError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.MVCError)
        assert name in errors.__doc__
    assert set(errors.__all__) <= set(remote_mvc.__all__)
