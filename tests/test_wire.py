"""msgpack-numpy encoding: openpi's layout, and no pickle ever."""

import re

import msgpack
import numpy as np
import pytest

from gpu_worker import wire


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((224, 224, 3), dtype=np.uint8),
        np.array([True, False]),
        np.arange(6, dtype=">i8").reshape(2, 3),
        np.array(["pick", "place"]),
        np.zeros((0, 5), dtype=np.float64),
    ],
)
def test_arrays_round_trip(value):
    out = wire.unpackb(wire.packb({"x": value}))["x"]
    assert out.dtype == value.dtype and out.shape == value.shape
    np.testing.assert_array_equal(out, value)


def test_non_contiguous_array_is_sent_in_c_order():
    value = np.arange(12, dtype=np.int32).reshape(3, 4).T
    np.testing.assert_array_equal(wire.unpackb(wire.packb(value)), value)


def test_layout_is_openpis():
    raw = msgpack.unpackb(wire.packb(np.arange(3, dtype=np.float32)), raw=False)
    assert raw[b"__ndarray__"] is True
    assert raw[b"dtype"] == "<f4" and raw[b"shape"] == [3] and len(raw[b"data"]) == 12
    scalar = msgpack.unpackb(wire.packb(np.float32(2.5)), raw=False)  # float64 is a Python float: packed natively
    assert scalar == {b"__npgeneric__": True, b"data": 2.5, b"dtype": "<f4"}
    assert wire.unpackb(wire.packb(np.int16(7))) == np.int16(7)


@pytest.mark.parametrize("value", [np.array([object()]), np.zeros(2, dtype=np.complex64), np.zeros(2, dtype="i4,i4")])
def test_refuses_to_send_unsafe_dtypes(value):
    with pytest.raises(TypeError, match="refused"):
        wire.packb(value)


def _frame(dtype: str, shape=(2,), data: bytes = b"\0" * 16) -> bytes:
    return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": list(shape)}, use_bin_type=True)


@pytest.mark.parametrize("dtype", ["O", "|O", "<c8", "|V8", "i4,i4", "object"])
def test_refuses_to_decode_unsafe_dtypes(dtype):
    with pytest.raises(wire.WireError, match="not allowed"):
        wire.unpackb(_frame(dtype))


@pytest.mark.parametrize(
    "frame, message",
    [
        (_frame("<f8", shape=(3,)), "holds 16 bytes, not what shape [3]"),
        (_frame("<f8", shape=(-1,)), "at most 32 non-negative integers"),
        (_frame("nonsense"), "unknown array dtype"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb(1) + b"\x01", "trailing bytes"),
        (b"", "not valid msgpack"),
    ],
)
def test_bad_frames_name_the_problem(frame, message):
    with pytest.raises(wire.WireError, match=re.escape(message)):
        wire.unpackb(frame)
