"""msgpack encoding of the plain-data contracts that cross a process boundary (SchedulerOutput,
ModelRunnerOutput, and anything else built from dataclasses, enums, numpy arrays and tensors).

One encoder and one decoder for all of them, with msgpack ext types for what msgpack has no type for:

    ext 1  dataclass   [module:qualname, field values in declaration order]  (init=False fields included)
    ext 2  enum        [module:qualname, value]
    ext 3  ndarray     [dtype str, shape, raw bytes]  (C order)
    ext 4  tensor      the same as ndarray; decoded as a CPU tensor (a device tensor is copied to the host)
    ext 5  tuple       its items (a plain list stays a list)
    ext 6  set         its items; frozenset is ext 7

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


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class MsgpackEncoder:
    """Encodes a value (nested dataclasses, dicts, lists, numpy arrays, tensors, ...) into msgpack bytes."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True, strict_types=True)

    def encode(self, value: Any) -> bytes:
        return self._packer.pack(value)

    def _default(self, obj: Any) -> msgpack.ExtType:
        # strict_types: a subclass (an IntEnum, a tuple) reaches here instead of being packed as its base.
        pack = self._pack_payload
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            values = [getattr(obj, name) for name in _field_names(cls)]
            return msgpack.ExtType(_DATACLASS, pack([_class_name(cls), values]))
        if isinstance(obj, enum.Enum):
            return msgpack.ExtType(_ENUM, pack([_class_name(type(obj)), obj.value]))
        if isinstance(obj, torch.Tensor):
            array = obj.detach().cpu().contiguous()
            if array.dtype == torch.bfloat16:
                raise TypeError("bfloat16 tensors have no numpy dtype: convert to float32 before sending")
            return msgpack.ExtType(_TENSOR, pack(_array_parts(array.numpy())))
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(_NDARRAY, pack(_array_parts(obj)))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_TUPLE, pack(list(obj)))
        if isinstance(obj, frozenset):
            return msgpack.ExtType(_FROZENSET, pack(sorted(obj) if _sortable(obj) else list(obj)))
        if isinstance(obj, set):
            return msgpack.ExtType(_SET, pack(sorted(obj) if _sortable(obj) else list(obj)))
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return msgpack.ExtType(_NDARRAY, pack(_array_parts(np.asarray(obj))))
        raise TypeError(f"cannot encode {type(obj).__qualname__} for a process boundary: send plain data")


    def _pack_payload(self, value: Any) -> bytes:
        # A packer of its own: the outer one is in the middle of a pack and its buffer must not be reused.
        return msgpack.packb(value, default=self._default, use_bin_type=True, strict_types=True)


def _sortable(values: frozenset | set) -> bool:
    return all(isinstance(v, int) for v in values) or all(isinstance(v, str) for v in values)


def _array_parts(array: np.ndarray) -> list[Any]:
    array = np.ascontiguousarray(array)
    return [array.dtype.str, list(array.shape), array.tobytes()]


class MsgpackDecoder:
    """Decodes bytes made by MsgpackEncoder; dataclasses and enums only from `allowed_modules`."""

    def __init__(self, allowed_modules: tuple[str, ...] = ("tokenmill.",)) -> None:
        self.allowed_modules = allowed_modules
        self._classes: dict[str, type] = {}

    def decode(self, data: bytes | memoryview) -> Any:
        return msgpack.unpackb(data, ext_hook=self._ext_hook, raw=False, strict_map_key=False,
                               use_list=True)

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

    def _ext_hook(self, code: int, data: bytes) -> Any:
        value = msgpack.unpackb(data, ext_hook=self._ext_hook, raw=False, strict_map_key=False)
        if code == _DATACLASS:
            name, values = value
            cls = self._resolve(name)
            obj = object.__new__(cls)
            for field_name, field_value in zip(_field_names(cls), values, strict=True):
                object.__setattr__(obj, field_name, field_value)
            return obj
        if code == _ENUM:
            name, enum_value = value
            return self._resolve(name)(enum_value)
        if code in (_NDARRAY, _TENSOR):
            dtype, shape, raw = value
            array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
            if code == _NDARRAY:
                return array.copy() if shape else array[()]
            return torch.from_numpy(array.copy())
        if code == _TUPLE:
            return tuple(value)
        if code == _SET:
            return set(value)
        if code == _FROZENSET:
            return frozenset(value)
        raise ValueError(f"unknown msgpack ext type {code}")


def round_trip(value: Any, encoder: MsgpackEncoder | None = None,
               decoder: MsgpackDecoder | None = None) -> Any:
    """value encoded and decoded again (tests, and the in-process check that a contract is plain data)."""
    return (decoder or MsgpackDecoder()).decode((encoder or MsgpackEncoder()).encode(value))
