"""msgpack with openpi's numpy extension: the bytes on the wire.

Compatible with ``openpi_client.msgpack_numpy``: an ndarray travels as a map
with the *bin* keys ``__ndarray__`` (true), ``data`` (C-order bytes),
``dtype`` (``arr.dtype.str``) and ``shape``; a numpy scalar as
``__npgeneric__``, ``data`` (the Python value) and ``dtype``.

Unlike msgpack-numpy this module never pickles: object, void (structured) and
complex dtypes are refused in both directions, and every decoded array is
checked against its declared shape before numpy sees the buffer.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = frozenset("VOc")
MAX_NDIM = 32


class WireError(ValueError):
    """A frame that is not valid msgpack-numpy; the message says why."""


def _checked_dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not isinstance(name, str):
        raise WireError(f"array dtype must be a string, got {type(name).__name__}")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError) as exc:
        raise WireError(f"unknown array dtype {name!r}") from exc
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise WireError(f"array dtype {name!r} is not allowed (object, structured and complex dtypes are refused)")
    return dtype


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind in _REFUSED_KINDS or obj.dtype.hasobject:
            raise TypeError(f"cannot send numpy dtype {obj.dtype} (object, structured and complex are refused)")
        if isinstance(obj, np.ndarray):
            return {
                b"__ndarray__": True,
                b"data": np.ascontiguousarray(obj).tobytes(),
                b"dtype": obj.dtype.str,
                b"shape": list(obj.shape),
            }
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _checked_dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WireError(f"array shape must be a list of at most {MAX_NDIM} non-negative integers, got {_short(shape)}")
        if not isinstance(data, bytes):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        # Multiply one dimension at a time and stop once past the data: a shape of huge
        # integers must not turn into a huge big-number product (it would hold the GIL).
        needed = dtype.itemsize
        for d in shape:
            needed *= d
            if needed > len(data):
                break
        if needed != len(data):
            raise WireError(f"array data holds {len(data)} bytes, not what shape {_short(shape)} of dtype {dtype.str} needs")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _checked_dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as exc:
            raise WireError(f"numpy scalar data does not fit dtype {dtype.str}") from exc
    return obj


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (maps, lists, scalars, strings, numpy values)."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode one frame; raises :class:`WireError` naming what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except msgpack.ExtraData as exc:
        raise WireError("frame holds trailing bytes after one msgpack value") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise WireError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from exc
