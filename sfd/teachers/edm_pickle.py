"""Load NVlabs EDM network pickles without running any code they contain.

EDM writes its networks with ``torch_utils.persistence``: every network object pickles as a call
``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the module's Python *source* (``module_src``),
the class name and the object's ``__dict__`` (``_init_kwargs``, ``_parameters``, ``_buffers``,
``_modules``, ...). A plain ``pickle.load`` executes that source, and any pickle can call any importable
function. This loader reads the file with an unpickler that resolves only an explicit allow-list of
names: the persistence call is mapped to a stand-in that records ``meta`` (the source is kept as a string
and never executed), tensors are rebuilt from their raw storages with ``torch.load(weights_only=True)``,
and everything else is refused before it can be called. The network is then rebuilt from this project's
own ``EDMPrecond`` with the recorded init kwargs, and the recorded tensors are loaded with strict=True.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import pickletools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sfd.networks.edm import STEP_KEY_PREFIX, EDMPrecond

__all__ = [
    "UnsafePickleError", "EDMPickleError", "PersistentRecord", "ModuleRecord", "SafeEDMUnpickler",
    "check_edm_pickle_header", "read_edm_pickle", "edm_state_from_record", "load_edm_pickle",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global that is not on the allow-list; nothing of it was called."""


class EDMPickleError(ValueError):
    """The pickle is safe to read but does not hold what this loader can rebuild."""


@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would have rebuilt, as plain data."""

    class_name: str
    version: Any
    module_src: str  # recorded for inspection only; never executed
    state: dict = field(repr=False)


class ModuleRecord:
    """Stand-in for the plain torch containers EDM pickles normally (ModuleDict, ModuleList, Sequential)."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise EDMPickleError(f"unexpected state for torch.nn.{self.class_name}: {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name})"


def _container(name: str) -> type[ModuleRecord]:
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


def _load_storage(data: Any) -> Any:
    """Storages are pickled as torch.save bytes; read them back with torch's own weights-only loader."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("torch.storage._load_from_bytes called with a non-bytes argument")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"embedded storage bytes held a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 with its inputs checked; hooks and metadata are dropped."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 called without a storage")
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise UnsafePickleError("torch._utils._rebuild_tensor_v2 called with non-integer geometry")
    untyped = storage._untyped_storage if isinstance(storage, torch.TypedStorage) else storage
    dtype = storage.dtype if isinstance(storage, torch.TypedStorage) else torch.uint8
    return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("torch._utils._rebuild_parameter called without a tensor")
    return data


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
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
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
                f"contents (a teacher checkpoint must be data, not code)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id: EDM network pickles do not use them")


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
    """The top-level dict of an EDM pickle (``ema``, ``loss_fn``, ...) with networks as PersistentRecords."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise EDMPickleError(f"{path} is a torch.save zip archive, not an EDM network pickle; "
                                 "load it with torch.load(..., weights_only=True)")
        f.seek(0)
        try:
            data = SafeEDMUnpickler(f).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError) as exc:  # a truncated or damaged download
            raise EDMPickleError(f"{path} is truncated or damaged ({type(exc).__name__}: {exc}); delete it and "
                                 "fetch it again (python -m sfd.assets fetch NAME --force)") from None
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path}: expected a dict at the top level, found {type(data).__name__}")
    return data


def _collect_tensors(record: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Gather parameters and persistent buffers recursively, named like ``state_dict()`` would name them."""
    if not isinstance(record, (PersistentRecord, ModuleRecord)):
        raise EDMPickleError(f"unexpected submodule at '{prefix[:-1]}': {type(record).__name__}")
    state = record.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def edm_state_from_record(record: Any) -> tuple[tuple, dict, dict[str, torch.Tensor]]:
    """(init args, init kwargs, state dict) of a recorded EDMPrecond."""
    if not isinstance(record, PersistentRecord):
        raise EDMPickleError(f"expected an EDM persistent network object, found {type(record).__name__}")
    if record.class_name != "EDMPrecond":
        raise EDMPickleError(f"the pickle holds a {record.class_name}; only EDMPrecond networks are supported "
                             "(EDM's VPPrecond/VEPrecond/iDDPMPrecond use other preconditionings)")
    args = tuple(record.state.get("_init_args") or ())
    kwargs = dict(record.state.get("_init_kwargs") or {})
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(record, "", tensors)
    return args, kwargs, tensors


def load_edm_pickle(path: str | os.PathLike, key: str = "ema", *, device: str | torch.device = "cpu",
                    **overrides: Any) -> EDMPrecond:
    """Rebuild ``data[key]`` of an EDM pickle as this project's EDMPrecond, weights loaded, in eval mode.

    ``overrides`` change init kwargs (e.g. ``step_condition=True`` for an SFD-v student, ``dropout=0.13``);
    with a step condition the new layers stay at their (zero) initialisation and every other tensor must
    match, so the student starts out equal to the teacher.
    """
    data = read_edm_pickle(path)
    if key not in data:
        raise EDMPickleError(f"{path}: no entry {key!r}; entries are {sorted(map(str, data))}")
    args, kwargs, tensors = edm_state_from_record(data[key])
    net = EDMPrecond(*args, **{**kwargs, **overrides})
    try:
        result = net.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # size mismatches: the recorded kwargs do not describe the recorded tensors
        raise EDMPickleError(f"{path}: recorded tensors do not fit EDMPrecond{kwargs}: {exc}") from None
    missing = [k for k in result.missing_keys if not (net.step_condition and k.startswith(STEP_KEY_PREFIX))]
    if missing or result.unexpected_keys:
        raise EDMPickleError(f"{path}: recorded tensors do not fit EDMPrecond{kwargs}: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
    return net.eval().to(device)
