"""The validated request every backend takes (_request.build_request): built in one step
(_assemble, not the frozen dataclass's per-field __init__), it must still hold every field
and stay frozen."""

import dataclasses

import numpy as np
import pytest

from cpuattn._request import REQUEST_FIELDS, Request, build_request


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": True, "window": (3, 0), "return_lse": True},
        {"scale": 0.5, "softcap": 30.0, "kv_lengths": np.array([5]), "diagonal": 2},
    ],
)
def test_build_request_sets_every_field_once(options):
    q = np.zeros((1, 4, 3, 8), np.float32)
    k = np.zeros((1, 2, 6, 8), np.float32)
    req = build_request(q, k, k, **options)
    assert set(vars(req)) == REQUEST_FIELDS == {f.name for f in dataclasses.fields(Request)}
    # the same request through the dataclass's own __init__ compares equal field by field
    again = dataclasses.replace(req)
    for name in REQUEST_FIELDS:
        a, b = getattr(req, name), getattr(again, name)
        assert a is b or a == b, name


def test_request_stays_frozen():
    x = np.zeros((2, 4), np.float32)
    req = build_request(x, x, x)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.causal = True  # type: ignore[misc]
