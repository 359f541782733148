"""Load NVlabs EDM network pickles (and the SFD reference's student snapshots) without running any code.

EDM writes its networks with ``torch_utils.persistence``: every network object pickles as a call
``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the module's Python *source* (``module_src``),
the class name and the object's ``__dict__`` (``_init_args``, ``_init_kwargs``, ``_parameters``,
``_buffers``, ``_modules``, ...). A plain ``pickle.load`` executes that source, and any pickle can call any
importable function. This loader reads the file with an unpickler that resolves only an explicit allow-list of
names, each mapped to a stand-in that builds plain data:
- the persistence call records ``meta`` (the source is kept as a string and never executed); the SFD
  reference's plain ``models.networks_edm.*`` modules and torch's containers record their state the same way;
- tensors are rebuilt from the raw bytes of their storages, read by this module (the legacy ``torch.save``
  layout a pickled storage embeds), after checking that every declared size fits the bytes that are there;
- numpy scalars (EDM records ``np.sqrt(0.2)`` and the like in init kwargs) become Python numbers, for numeric
  and bool dtypes only.
Everything else is refused before it can be called. The network is then rebuilt from this project's own
``EDMPrecond``: the recorded init kwargs are checked against size bounds, the architecture is built on the
meta device and its every tensor shape compared with the recorded ones before any memory is allocated, and
the recorded tensors are loaded with strict=True. Every refusal is one ``EDMPickleError`` line naming the file.
"""
from __future__ import annotations

import _compat_pickle
import collections
import inspect
import io
import os
import pickle
import pickletools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sfd.networks.edm import MODELS, EDMPrecond, is_step_key

__all__ = [
    "UnsafePickleError", "EDMPickleError", "PersistentRecord", "ModuleRecord", "SafeEDMUnpickler",
    "check_edm_pickle_header", "read_edm_pickle", "edm_state_from_record", "collect_tensors", "check_tensors",
    "check_network_kwargs", "network_from_tensors", "load_edm_pickle",
]


class EDMPickleError(ValueError):
    """The file cannot be rebuilt as a network by this loader; the message names the file and why."""


class UnsafePickleError(EDMPickleError, pickle.UnpicklingError):
    """The pickle asks for something that is not on the allow-list; nothing of it was called."""


@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would have rebuilt, as plain data."""

    class_name: str
    version: Any
    module_src: str  # recorded for inspection only; never executed
    state: dict = field(repr=False)


class ModuleRecord:
    """Stand-in for a class pickled by reference (torch's containers, the SFD reference's network modules)."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for {self.class_name}: {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name})"


def _record_class(name: str) -> type[ModuleRecord]:
    return type(f"{name}Record", (ModuleRecord,), {"class_name": name})


class _EasyDict(dict):
    """Stand-in for dnnlib's EasyDict (a dict with attribute access); kept as plain data."""


def _record_persistent(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise EDMPickleError("malformed persistence record (expected meta dict with a 'state' dict)")
    if meta.get("type") != "class":
        raise EDMPickleError(f"unsupported persistence record type {meta.get('type')!r}")
    return PersistentRecord(class_name=str(meta.get("class_name")), version=meta.get("version"),
                            module_src=str(meta.get("module_src", "")), state=meta["state"])


# ----- tensors: storages read from their own bytes, geometry checked before a view is made ------------------

# torch's typed storage classes, as a pickled storage names them.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


@dataclass
class StorageRecord:
    """A storage's elements as a flat tensor over its own bytes."""

    data: torch.Tensor


class _StorageUnpickler(pickle.Unpickler):
    """The pickles inside a storage's bytes: plain values, torch's storage class names and one storage id."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UnsafePickleError(f"refusing '{module}.{name}' inside a pickled storage")

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage type, key, location, number of elements[, view metadata]) in torch's legacy format
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
              and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and type(pid[4]) is int
              and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None))
        if not ok:
            raise UnsafePickleError("a pickled storage names an unexpected storage")
        return pid


def _load_storage(data: Any) -> StorageRecord:
    """``torch.storage._load_from_bytes``: the bytes are ``torch.save(storage)`` in its legacy layout (magic
    number, protocol, system info, the storage's id, its key list, then per key the element count and the raw
    elements). Read here, so a count larger than the bytes present is refused before anything is allocated."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("torch.storage._load_from_bytes called with a non-bytes argument")
    f = io.BytesIO(data)
    magic, protocol, sys_info, pid, keys = (_StorageUnpickler(f).load() for _ in range(5))
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise EDMPickleError("a pickled storage does not start like torch's storage format")
    if not sys_info.get("little_endian", False):
        raise EDMPickleError("a pickled storage is big-endian; only little-endian files are read")
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise EDMPickleError("a pickled storage does not hold exactly one storage")
    dtype, numel = pid[1], pid[4]
    count = int.from_bytes(f.read(8), "little", signed=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    payload = data[f.tell():]
    if count != numel or len(payload) != numel * itemsize:
        raise EDMPickleError(f"a pickled storage declares {numel} elements ({count} in its header) of {itemsize} "
                             f"bytes but holds {len(payload)} bytes")
    return StorageRecord(torch.frombuffer(bytearray(payload), dtype=dtype) if numel else torch.empty(0, dtype=dtype))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 with its geometry checked against the storage; hooks are dropped."""
    if not isinstance(storage, StorageRecord):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 called without a storage")
    geometry = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if (geometry is None or len(size) != len(stride) or len(size) > 8
            or not all(type(v) is int and v >= 0 for v in geometry)):
        raise EDMPickleError(f"a tensor has an invalid geometry (size {size!r}, stride {stride!r}, "
                             f"offset {storage_offset!r})")
    numel = storage.data.numel()
    end = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else storage_offset
    if end > numel:
        raise EDMPickleError(f"a tensor of size {list(size)} reaches element {end} of a storage of {numel}")
    return storage.data.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("torch._utils._rebuild_parameter called without a tensor")
    return data


# ----- numpy scalars: numbers and bools only -------------------------------------------------------------

_DTYPE_CODE = re.compile(r"[biufc]\d{1,2}")


class _NumpyDType:
    """``numpy.dtype(code, align, copy)`` then BUILD with numpy's own state, for numeric and bool dtypes."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not (isinstance(code, str) and _DTYPE_CODE.fullmatch(code)):
            raise UnsafePickleError(f"refusing numpy dtype {code!r}: only numeric and bool dtypes are data")
        try:
            self.dtype = np.dtype(code)
        except TypeError:
            raise UnsafePickleError(f"refusing numpy dtype {code!r}: not a dtype numpy knows") from None

    def __setstate__(self, state: Any) -> None:
        # numpy's state of a plain (non-structured, non-object) dtype: (3, byte order, None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise UnsafePickleError(f"refusing numpy dtype state {state!r}: not a plain numeric dtype")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype: Any, data: Any) -> bool | int | float | complex:
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``, returned as the Python number it holds."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("a numpy scalar with an unexpected dtype or payload")
    if len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError(f"a numpy scalar gives {len(data)} bytes for a {dtype.dtype.name} "
                                f"({dtype.dtype.itemsize} bytes)")
    return np.frombuffer(bytes(data), dtype=dtype.dtype, count=1)[0].item()


# ----- the unpickler -------------------------------------------------------------------------------------

def _encode_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """_codecs.encode, which protocols 0-2 use to spell bytes objects; strings to bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError("_codecs.encode refused for a non-string or an unusual encoding")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0 and 1), for the allow-listed stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord) and base is object and state is None):
        raise UnsafePickleError(f"copyreg._reconstructor refused for {cls!r}")
    return cls.__new__(cls)


# The modules of the SFD reference's models/networks_edm.py that its student snapshots pickle by name.
REFERENCE_CLASSES = ("EDMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm",
                     "PositionalEmbedding", "FourierEmbedding")

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _encode_bytes,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # written by numpy < 2 (EDM's published files)
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # written by numpy >= 2
    **{("torch.nn.modules.container", n): _record_class(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
    **{("models.networks_edm", n): _record_class(n) for n in REFERENCE_CLASSES},
}


class SafeEDMUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals above; everything else raises UnsafePickleError."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell some names the Python 2 way (__builtin__.set, copy_reg._reconstructor).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to load '{module}.{name}' from the pickle: it is not on the allow-list of EDM network "
                f"contents (a checkpoint must be data, not code)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id: EDM network pickles do not use them")


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def check_edm_pickle_header(path: str | os.PathLike) -> None:
    """Raise EDMPickleError unless the file starts like an EDM network pickle (a pickled dict, any protocol).

    Reads a few bytes only, so a wrong file (a text file, a torch.save zip) is refused before a run exists
    instead of with an UnpicklingError after loading starts; the full check is `read_edm_pickle`'s."""
    with open(path, "rb") as f:
        head = f.read(64)
    expected = "expected an NVlabs EDM network pickle (a pickled dict, e.g. edm-cifar10-32x32-uncond-vp.pkl)"
    if head.startswith(b"PK\x03\x04"):
        raise EDMPickleError(f"{path} is a zip archive (torch.save?), not an EDM network pickle; {expected}")
    try:  # the first real opcode must build the top-level dict; PROTO / FRAME / MARK may come before it
        first = next(op.name for op, _, _ in pickletools.genops(io.BytesIO(head))
                     if op.name not in ("PROTO", "FRAME", "MARK"))
    except (ValueError, StopIteration):  # an unknown opcode, or too short to be a pickle
        first = None
    if first not in ("EMPTY_DICT", "DICT"):
        raise EDMPickleError(f"{path} is not an EDM network pickle (it starts with {head[:16]!r}); {expected}")


def read_edm_pickle(path: str | os.PathLike) -> dict:
    """The top-level dict of an EDM pickle (``ema``, ``loss_fn``, ...) with networks as records."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise EDMPickleError(f"{path} is a torch.save zip archive, not an EDM network pickle; "
                                 "load it with torch.load(..., weights_only=True)")
        f.seek(0)
        try:
            data = SafeEDMUnpickler(f).load()
        except EDMPickleError as exc:  # a refusal (UnsafePickleError included): say which file
            raise type(exc)(f"{path}: {_one_line(exc)}") from None
        except (EOFError, pickle.UnpicklingError) as exc:  # a truncated or damaged download
            raise EDMPickleError(f"{path} is truncated or damaged ({type(exc).__name__}: {_one_line(exc)}); delete "
                                 "it and fetch it again (python -m sfd.assets fetch NAME --force)") from None
        except Exception as exc:  # anything else a malformed stream provokes (TypeError, MemoryError, ...)
            raise EDMPickleError(f"{path} cannot be read as an EDM network pickle "
                                 f"({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path}: expected a dict at the top level, found {type(data).__name__}")
    return data


# ----- from records to a network -------------------------------------------------------------------------

MAX_MODULE_DEPTH = 32  # EDM's networks nest 5 deep (EDMPrecond > model > enc > block > conv)


def _state_part(state: dict, key: str, where: str) -> dict:
    part = state.get(key)
    if part is None:
        return {}
    if not isinstance(part, dict):
        raise EDMPickleError(f"'{where or 'network'}' records {key} as a {type(part).__name__}, not a dict")
    return part


def collect_tensors(record: Any, prefix: str = "", out: dict | None = None, depth: int = 0) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a recorded module tree, named as ``state_dict()`` names them."""
    out = {} if out is None else out
    where = prefix[:-1]
    if depth > MAX_MODULE_DEPTH:
        raise EDMPickleError(f"the recorded modules are nested deeper than {MAX_MODULE_DEPTH} (at '{where}')")
    if not isinstance(record, (PersistentRecord, ModuleRecord)):
        raise EDMPickleError(f"unexpected submodule at '{where}': {type(record).__name__}")
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, (set, frozenset)):
        raise EDMPickleError(f"'{where}' records its non-persistent buffers as a {type(non_persistent).__name__}")
    tensors = {**_state_part(state, "_parameters", where),
               **{k: v for k, v in _state_part(state, "_buffers", where).items() if k not in non_persistent}}
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise EDMPickleError(f"'{prefix}{name}' is a {type(value).__name__}, not a tensor")
        out[prefix + name] = value
    for name, child in _state_part(state, "_modules", where).items():
        if child is not None:
            collect_tensors(child, f"{prefix}{name}.", out, depth + 1)
    return out


# Generous bounds on what sets a network's size (EDM's largest teacher, ImageNet-64 ADM, has model_channels
# 192, channel_mult [1, 2, 3, 4], 1000 labels): a recorded value beyond them is refused before anything is built.
_INT_BOUNDS = {"img_resolution": 4096, "img_channels": 64, "label_dim": 100_000, "augment_dim": 1024,
               "model_channels": 4096, "channel_mult_emb": 64, "channel_mult_noise": 64, "num_blocks": 64}
_LIST_BOUNDS = {"channel_mult": (8, 64), "attn_resolutions": (16, 4096), "resample_filter": (8, 1024)}
_STRINGS = {"model_type": tuple(MODELS), "embedding_type": ("positional", "fourier"),
            "encoder_type": ("standard", "skip", "residual"), "decoder_type": ("standard", "skip"),
            "step_init": ("random", "zero")}


def _known_kwargs() -> set[str]:
    names = set()
    for fn in (EDMPrecond, *MODELS.values()):
        names |= {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    return names - {"in_channels", "out_channels"}  # EDMPrecond sets these from img_channels


def check_network_kwargs(kwargs: Any) -> dict:
    """Recorded EDMPrecond init kwargs, checked by name, type and size bound; returns them (a plain dict)."""
    if not isinstance(kwargs, dict):
        raise EDMPickleError(f"the recorded init kwargs are a {type(kwargs).__name__}, not a dict")
    unknown = sorted(str(k) for k in kwargs if k not in _known_kwargs())
    if unknown:
        raise EDMPickleError(f"the recorded init kwargs name {', '.join(unknown)}, which EDMPrecond does not take")
    for key, value in kwargs.items():
        bad = None
        if key in _INT_BOUNDS and not (type(value) is int and 0 <= value <= _INT_BOUNDS[key]):
            bad = f"an integer in [0, {_INT_BOUNDS[key]}]"
        elif key in _LIST_BOUNDS:
            length, top = _LIST_BOUNDS[key]
            if not (isinstance(value, (list, tuple)) and len(value) <= length
                    and all(type(v) is int and 0 < v <= top for v in value)):
                bad = f"a list of at most {length} integers in [1, {top}]"
        elif key in _STRINGS and value not in _STRINGS[key]:
            bad = f"one of {', '.join(_STRINGS[key])}"
        elif key not in _INT_BOUNDS and key not in _LIST_BOUNDS and key not in _STRINGS and not isinstance(
                value, (bool, int, float)):
            bad = "a number or true/false"
        if bad:
            raise EDMPickleError(f"the recorded init kwargs give {key}={_one_line(repr(value), 60)}; expected {bad}")
    return dict(kwargs)


def edm_state_from_record(record: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(checked init kwargs, state dict) of a recorded EDMPrecond (EDM's persistence format)."""
    if not isinstance(record, PersistentRecord):
        raise EDMPickleError(f"expected an EDM persistent network object, found {type(record).__name__}")
    if record.class_name != "EDMPrecond":
        raise EDMPickleError(f"the pickle holds a {record.class_name}; only EDMPrecond networks are supported "
                             "(EDM's VPPrecond/VEPrecond/iDDPMPrecond use other preconditionings)")
    args, kwargs = record.state.get("_init_args") or (), record.state.get("_init_kwargs")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise EDMPickleError("the recorded init kwargs (or init args) are not a dict (a tuple)")
    try:  # EDM passes keyword arguments; positional ones are named by EDMPrecond's signature
        bound = inspect.signature(EDMPrecond).bind(*args, **kwargs)
    except TypeError as exc:
        raise EDMPickleError(f"the recorded init args / kwargs do not fit EDMPrecond ({exc})") from None
    named = {**{k: v for k, v in bound.arguments.items() if k != "model_kwargs"},
             **bound.arguments.get("model_kwargs", {})}
    return check_network_kwargs(named), collect_tensors(record)


def _summary(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tensors(kwargs: dict, tensors: dict[str, torch.Tensor], *,
                  missing_ok: Callable[[str], bool] | None = None) -> None:
    """Raise EDMPickleError unless `tensors` are exactly EDMPrecond(**kwargs)'s state dict by name and shape.
    The architecture is built on the meta device: nothing is allocated, whatever the kwargs claim."""
    with torch.device("meta"):
        try:
            skeleton = EDMPrecond(**kwargs)
        except Exception as exc:  # a constructor's own check (an assert, a division by zero channels, ...)
            raise EDMPickleError(f"the recorded init kwargs do not build an EDMPrecond ({_one_line(exc)})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = [k for k in expected if k not in tensors and not (missing_ok and missing_ok(k))]
    unexpected = [k for k in tensors if k not in expected]
    if len(missing) == len(expected):
        gib = sum(v.numel() * 4 for v in skeleton.state_dict().values()) / 2 ** 30
        raise EDMPickleError(f"the file holds {len(tensors)} tensors but holds 0 of the {len(expected)} the recorded "
                             f"architecture needs ({gib:.3g} GiB in float32)")
    if missing or unexpected:
        raise EDMPickleError(f"recorded tensors do not fit the recorded architecture EDMPrecond{_one_line(kwargs, 200)}: "
                             f"missing {_summary(missing)}; unexpected {_summary(unexpected)}")
    shapes = [f"{k} {list(tensors[k].shape)} (expected {list(s)})" for k, s in expected.items()
              if k in tensors and tuple(tensors[k].shape) != s]
    if shapes:
        raise EDMPickleError(f"recorded tensor shapes differ from the recorded architecture: {_summary(shapes, 3)}")


def network_from_tensors(kwargs: dict, tensors: dict[str, torch.Tensor], *,
                         missing_ok: Callable[[str], bool] | None = None) -> EDMPrecond:
    """EDMPrecond(**kwargs) holding `tensors` (eval mode), after `check_tensors`; keys `missing_ok` accepts
    keep their initialisation."""
    check_tensors(kwargs, tensors, missing_ok=missing_ok)
    net = EDMPrecond(**kwargs)
    net.load_state_dict(tensors, strict=missing_ok is None)
    return net.eval()


def load_edm_pickle(path: str | os.PathLike, key: str = "ema", *, device: str | torch.device = "cpu",
                    check_kwargs: Callable[[dict], None] | None = None, **overrides: Any) -> EDMPrecond:
    """Rebuild ``data[key]`` of an EDM pickle as this project's EDMPrecond, weights loaded, in eval mode.

    `check_kwargs` sees the recorded init kwargs before anything is built (e.g. the named teacher's
    architecture check). ``overrides`` change init kwargs (e.g. ``step_condition=True`` for an SFD-v student,
    ``dropout=0.13``); a step-conditioned network's new layers keep their initialisation (``step_init``).
    """
    data = read_edm_pickle(path)
    if key not in data:
        raise EDMPickleError(f"{path}: no entry {key!r}; entries are {sorted(map(str, data))}")
    try:
        kwargs, tensors = edm_state_from_record(data[key])
        if check_kwargs is not None:
            check_kwargs(kwargs)
        kwargs = check_network_kwargs({**kwargs, **overrides})
        new_layers = is_step_key if kwargs.get("step_condition") else None
        net = network_from_tensors(kwargs, tensors, missing_ok=new_layers)
    except EDMPickleError as exc:
        text = str(exc)
        raise type(exc)(text if text.startswith(str(path)) else f"{path}: {text}") from None
    return net.to(device)
