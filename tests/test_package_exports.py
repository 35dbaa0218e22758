import importlib

import pytest


@pytest.mark.parametrize("package", ["data", "flow", "streams", "fusion"])
def test_every_public_name_resolves_to_its_module_object(package):
    pkg = importlib.import_module(package)
    assert pkg.__all__
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert getattr(importlib.import_module(pkg._EXPORTS[name]), name) is value
        assert vars(pkg)[name] is value  # cached after the first lookup


def test_unknown_name_is_an_attribute_error():
    import flow

    with pytest.raises(AttributeError, match="module 'flow' has no attribute 'nope'"):
        flow.nope  # noqa: B018
