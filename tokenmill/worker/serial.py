"""msgpack encoding of the plain-data contracts that cross a process boundary (SchedulerOutput,
ModelRunnerOutput, and anything else built from dataclasses, enums, numpy arrays and tensors).

One encoder and one decoder for all of them. What msgpack has no type for is written inline as a list whose
first item is a tag (a one-byte msgpack ext value), so nothing is packed twice:

    [DATACLASS, "module:qualname", field values in declaration order...]   (init=False fields included)
    [ENUM, "module:qualname", value]
    [TUPLE, items...]   [SET, items...]   [FROZENSET, items...]

and arrays as ext values of their own: ext 3 numpy array, ext 4 tensor (decoded as a CPU tensor; a device
tensor is copied to the host), each holding [dtype str, shape, raw bytes in C order].

Decoding rebuilds a dataclass without calling __init__ (validation ran where it was built; its derived,
init=False fields travel with it), and only for classes in the modules named by `allowed_modules` (the
tokenmill package by default): a message cannot make the decoder import or build anything else. Dict keys
keep their type (an int token id stays an int).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from typing import Any

import msgpack
import numpy as np
import torch

_DATACLASS, _ENUM, _NDARRAY, _TENSOR, _TUPLE, _SET, _FROZENSET = 1, 2, 3, 4, 5, 6, 7
_TAG_CODES = (_DATACLASS, _ENUM, _TUPLE, _SET, _FROZENSET)


class _Tag:
    """The decoded form of a tag: marks the list it heads."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_TAGS = {code: msgpack.ExtType(code, b"") for code in _TAG_CODES}
_DECODED_TAGS = {code: _Tag(code) for code in _TAG_CODES}
_DATACLASS_TAG = _TAGS[_DATACLASS]


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names in declaration order; None for any other class (cached per class)."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


@functools.cache
def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class MsgpackEncoder:
    """Encodes a value (nested dataclasses, dicts, lists, numpy arrays, tensors, ...) into msgpack bytes."""

    def __init__(self) -> None:
        # strict_types: a subclass (an IntEnum, a tuple) reaches `default` instead of being packed as its base.
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True, strict_types=True)

    def encode(self, value: Any) -> bytes:
        return self._packer.pack(value)

    def _default(self, obj: Any) -> Any:
        cls: type = type(obj)
        names = _field_names(cls)
        if names is not None:
            return [_DATACLASS_TAG, _class_name(cls), *[getattr(obj, name) for name in names]]
        if isinstance(obj, enum.Enum):
            return [_TAGS[_ENUM], _class_name(cls), obj.value]
        if isinstance(obj, tuple):
            return [_TAGS[_TUPLE], *obj]
        if isinstance(obj, (set, frozenset)):
            items = sorted(obj) if _sortable(obj) else list(obj)
            return [_TAGS[_FROZENSET if isinstance(obj, frozenset) else _SET], *items]
        if isinstance(obj, torch.Tensor):
            array = obj.detach().cpu().contiguous()
            if array.dtype == torch.bfloat16:
                raise TypeError("bfloat16 tensors have no numpy dtype: convert to float32 before sending")
            return msgpack.ExtType(_TENSOR, _pack_array(array.numpy()))
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(_NDARRAY, _pack_array(obj))
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        for base in (int, float, str, bytes, list, dict):  # a subclass of a plain type, as its base
            if isinstance(obj, base):
                return base(obj)  # type: ignore[arg-type]
        raise TypeError(f"cannot encode {cls.__qualname__} for a process boundary: send plain data")


def _sortable(values: set | frozenset) -> bool:
    return all(type(v) is int for v in values) or all(type(v) is str for v in values)


def _pack_array(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return msgpack.packb([array.dtype.str, list(array.shape), array.tobytes()], use_bin_type=True)


class MsgpackDecoder:
    """Decodes bytes made by MsgpackEncoder; dataclasses and enums only from `allowed_modules`."""

    def __init__(self, allowed_modules: tuple[str, ...] = ("tokenmill.",)) -> None:
        self.allowed_modules = allowed_modules
        self._classes: dict[str, type] = {}

    def decode(self, data: bytes | memoryview) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, list_hook=self._list_hook, raw=False,
                               strict_map_key=False)

    def _resolve(self, name: str) -> type:
        cls = self._classes.get(name)
        if cls is not None:
            return cls
        module_name, _, qualname = name.partition(":")
        if not any(module_name == m.rstrip(".") or module_name.startswith(m) for m in self.allowed_modules):
            raise ValueError(f"refusing to decode {name}: only classes of {self.allowed_modules} are allowed")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, type) or not (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            raise ValueError(f"refusing to decode {name}: neither a dataclass nor an enum")
        self._classes[name] = obj
        return obj

    @staticmethod
    def _ext_hook(code: int, data: bytes) -> Any:
        if code in (_NDARRAY, _TENSOR):
            dtype, shape, raw = msgpack.unpackb(data, raw=False)
            array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
            return torch.from_numpy(array) if code == _TENSOR else array
        tag = _DECODED_TAGS.get(code)
        if tag is None or data:
            raise ValueError(f"unknown msgpack ext type {code}")
        return tag

    def _list_hook(self, items: list[Any]) -> Any:
        if not items or type(items[0]) is not _Tag:
            return items
        code = items[0].code
        if code == _DATACLASS:
            cls = self._resolve(items[1])
            obj: Any = object.__new__(cls)
            names = _field_names(cls)
            assert names is not None  # _resolve admits dataclasses and enums only
            if len(names) != len(items) - 2:
                raise ValueError(f"{items[1]} has {len(names)} fields, the message {len(items) - 2}")
            for name, value in zip(names, items[2:]):  # noqa: B905 - lengths checked above
                object.__setattr__(obj, name, value)
            return obj
        if code == _ENUM:
            return self._resolve(items[1])(items[2])
        if code == _TUPLE:
            return tuple(items[1:])
        if code == _SET:
            return set(items[1:])
        return frozenset(items[1:])


def round_trip(value: Any, encoder: MsgpackEncoder | None = None,
               decoder: MsgpackDecoder | None = None) -> Any:
    """value encoded and decoded again (tests, and the in-process check that a contract is plain data)."""
    return (decoder or MsgpackDecoder()).decode((encoder or MsgpackEncoder()).encode(value))
