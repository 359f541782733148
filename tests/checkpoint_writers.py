"""Stand-ins for the two programs that write the checkpoints SFD Lab reads, faithful to what they write.

1. NVlabs EDM (``torch_utils/persistence.py``, ``training/networks.py``, ``training/training_loop.py``):
   - ``persistence.persistent_class`` wraps a class in a ``Decorator`` subclass (same ``__name__`` and
     ``__module__``) whose ``__init__`` stores deep copies of the constructor's positional and keyword arguments
     as ``_init_args`` / ``_init_kwargs`` in the instance ``__dict__``; its ``__reduce__`` replaces the
     reconstructor with ``_reconstruct_persistent_obj(meta)``, ``meta = dict(type='class', version=6,
     module_src=<the module's source>, class_name=<class name>, state=<the __dict__>)``. Unpickling executes
     ``module_src``.
   - ``networks.py`` decorates every class (Linear, Conv2d, GroupNorm, UNetBlock, PositionalEmbedding,
     FourierEmbedding, SongUNet, DhariwalUNet, EDMPrecond) and calls every constructor with keyword arguments.
     numpy float64 scalars reach the recorded kwargs: SongUNet's ``init_attn`` (``init_weight=np.sqrt(0.2)``)
     and ``skip_scale=np.sqrt(0.5)``, DhariwalUNet's ``init`` (``init_weight=np.sqrt(1/3)``,
     ``init_bias=np.sqrt(1/3)``) and its label embedding's ``init_weight=np.sqrt(label_dim)``.
   - The training loop pickles ``dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
     dataset_kwargs=dict(dataset_kwargs))`` with ``pickle.dump`` (the default protocol, 4), ``ema`` a deep copy
     in eval mode with ``requires_grad_(False)``; ``loss_fn`` (EDMLoss, built without kwargs) and
     ``augment_pipe`` (AugmentPipe, CIFAR-10: ``p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
     translate_frac=1``; None without augmentation) are persistent plain objects.
   Our ``sfd.networks.edm`` builds its modules with EDM's calls and values, so constructing our classes wrapped
   by the stand-in ``persistent_class`` records what EDM records; `check_edm_facts` asserts the facts above on
   every written network, so a drift in our network code fails the tests instead of weakening the stand-in.
   Attributes our modules add (``init_kwargs``, ``box_filter``, ``impl``, the ``qkv_order`` buffer, ...) are
   removed before pickling, so each ``__dict__`` holds what EDM's holds.

2. The SFD reference (github.com/zju-pi/diff-sampler, ``sfd-main`` at commit 97407a4):
   - ``models/networks_edm.py`` is EDM's ``networks.py`` with ``@persistence.persistent_class`` commented out on
     every class, the SFD-v layers always built (``map_step``, ``map_step_layer0/1``; ``affine_step`` in every
     UNetBlock, registered after ``conv1``) and Conv2d also storing ``kernel``, ``init_mode``, ``init_weight``,
     ``init_bias``.
   - ``training/training_loop.py`` builds ``models.networks_edm.EDMPrecond`` from fixed per-dataset kwargs, loads
     the EDM teacher's weights, sets ``sigma_min = 0.006``, ``sigma_max = 80.0``, ``use_fp16 = True`` and
     ``training_kwargs`` (``loss_kwargs``, a ``dnnlib.EasyDict``: ``class_name='training.loss.loss'``,
     num_steps, sampler_tea, M, schedule_type, schedule_rho, afs, max_order, predict_x0, lower_order_final,
     use_step_condition, is_second_stage from train.py; sigma_min, sigma_max, model_source; dataset_name,
     guidance_type, guidance_rate), and saves ``network-snapshot-{kimg:06d}.pkl`` = ``pickle.dump(dict(model=
     copy.deepcopy(net).eval().requires_grad_(False).cpu()))``: a plain pickle whose classes are
     ``models.networks_edm.*`` (the issue reads it as persistence-format; `write_reference_snapshot` writes
     both, ``persistent=True`` as a persistent EDMPrecond would be written).
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import pickletools
import sys
import textwrap
import types

import numpy as np
import torch
import torch.nn.functional as F

from sfd.networks import edm

# A stand-in for EDM's torch_utils/persistence.py, importable as `torch_utils.persistence`. Its reconstructor
# executes the recorded source, as EDM's does: that is what makes a plain pickle.load of these files unsafe.
PERSISTENCE_SRC = textwrap.dedent('''
    import copy
    import inspect
    import sys

    _version = 6

    def _reconstruct_persistent_obj(meta):
        exec(compile(meta["module_src"], "<persistent module>", "exec"), {})
        return None

    def persistent_class(orig_class, module_src=None):
        if module_src is None:
            module_src = inspect.getsource(sys.modules[orig_class.__module__])

        class Decorator(orig_class):
            _orig_module_src = module_src
            _orig_class_name = orig_class.__name__

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_args = copy.deepcopy(args)
                self._init_kwargs = copy.deepcopy(kwargs)

            def __reduce__(self):
                fields = list(super().__reduce__())
                fields += [None] * max(3 - len(fields), 0)
                if fields[0] is not _reconstruct_persistent_obj:
                    meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                                class_name=self._orig_class_name, state=fields[2])
                    fields[0] = _reconstruct_persistent_obj
                    fields[1] = (meta,)
                    fields[2] = None
                return tuple(fields)

        Decorator.__name__ = orig_class.__name__
        Decorator.__module__ = orig_class.__module__
        return Decorator
''')

# dnnlib/util.py's EasyDict: a dict with attribute access.
DNNLIB_UTIL_SRC = textwrap.dedent('''
    class EasyDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name)

        def __setattr__(self, name, value):
            self[name] = value

        def __delattr__(self, name):
            del self[name]
''')

# The plain objects EDM pickles beside the network (training/loss.py, training/augment.py), reduced to their
# constructors.
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


class AugmentPipe:
    def __init__(self, p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0):
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)


CIFAR_AUGMENT = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
LAYER_CLASSES = ("Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding")

# What each class's __init__ stores in its __dict__ besides torch's own bookkeeping (names starting with "_",
# `training`), parameters, buffers and submodules: EDM's training/networks.py, and the reference's additions.
EDM_ATTRIBUTES = {
    "Linear": {"in_features", "out_features"},
    "Conv2d": {"in_channels", "out_channels", "up", "down", "fused_resample"},
    "GroupNorm": {"num_groups", "eps"},
    "UNetBlock": {"in_channels", "out_channels", "emb_channels", "num_heads", "dropout", "skip_scale",
                  "adaptive_scale", "skip"},
    "PositionalEmbedding": {"num_channels", "max_positions", "endpoint"},
    "FourierEmbedding": set(),
    "SongUNet": {"label_dropout", "map_label", "map_augment"},
    "DhariwalUNet": {"label_dropout", "map_label", "map_augment"},
    "EDMPrecond": {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"},
}
REFERENCE_EXTRA_ATTRIBUTES = {"Conv2d": {"kernel", "init_mode", "init_weight", "init_bias"},
                              "EDMPrecond": {"training_kwargs"}}
EDM_BUFFERS = {"resample_filter", "freqs"}  # our qkv_order is a non-persistent buffer EDM does not have


def install_fake_modules(root, monkeypatch) -> types.SimpleNamespace:
    """Make `torch_utils.persistence` and `dnnlib.util` importable from `root` (as EDM's checkout has them)."""
    for package, source in (("torch_utils", {"persistence.py": PERSISTENCE_SRC}),
                            ("dnnlib", {"util.py": DNNLIB_UTIL_SRC})):
        folder = root / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
        for name, text in source.items():
            (folder / name).write_text(text)
    monkeypatch.syspath_prepend(str(root))
    import importlib

    fakes = types.SimpleNamespace(persistence=importlib.import_module("torch_utils.persistence"),
                                  dnnlib_util=importlib.import_module("dnnlib.util"))
    return fakes


def remove_fake_modules() -> None:
    for name in ("torch_utils.persistence", "torch_utils", "dnnlib.util", "dnnlib", "models.networks_edm",
                 "models"):
        sys.modules.pop(name, None)


@contextlib.contextmanager
def persistent_layers(persistence):
    """Our EDM classes decorated with the stand-in `persistent_class` while a network is constructed."""
    saved = {name: getattr(edm, name) for name in LAYER_CLASSES}
    saved_models = dict(edm.MODELS)
    try:
        for name, cls in saved.items():
            setattr(edm, name, persistence.persistent_class(cls))
        for name, cls in saved_models.items():
            edm.MODELS[name] = persistence.persistent_class(cls)
        yield persistence.persistent_class(edm.EDMPrecond)
    finally:
        for name, cls in saved.items():
            setattr(edm, name, cls)
        edm.MODELS.update(saved_models)


def song_kwargs(**kw) -> dict:
    """A tiny DDPM++ SongUNet with attention, recorded kwargs spelled as EDM's train.py passes them."""
    cfg = dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_type="SongUNet",
               embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
               resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
               dropout=0.13, augment_dim=9)
    return {**cfg, **kw}


def adm_kwargs(**kw) -> dict:
    """A tiny ADM DhariwalUNet (64 channels at 4x4, so attention has heads)."""
    cfg = dict(img_resolution=8, img_channels=3, label_dim=5, use_fp16=False, model_type="DhariwalUNet",
               model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1)
    return {**cfg, **kw}


def outputs(net, kwargs, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    labels = F.one_hot(torch.tensor([0, 3]), kwargs["label_dim"]).float() if kwargs["label_dim"] else None
    augment = torch.randn(2, kwargs["augment_dim"], generator=g) if kwargs.get("augment_dim") else None
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 7.0]), labels, augment_labels=augment)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random, so every tensor shows in the output (EDM zero-initialises some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def edm_network(kwargs: dict, persistence, weights_from: torch.nn.Module) -> torch.nn.Module:
    """An EDMPrecond as EDM's code constructs and pickles it: every module persistent and recording its init
    args, weights copied from `weights_from` (our own network of the same kwargs), eval mode, no grads."""
    with persistent_layers(persistence) as persistent_edm_precond:
        net = persistent_edm_precond(**kwargs)
    net.load_state_dict(weights_from.state_dict())
    return net.eval().requires_grad_(False)


def check_edm_facts(net: torch.nn.Module) -> None:
    """The facts about EDM's recorded init args listed above, on a stand-in network (before it is pickled)."""
    for name, module in net.named_modules():
        if type(module).__module__.startswith("torch.nn"):
            continue
        assert module._init_args == (), name  # EDM passes keyword arguments only
        assert isinstance(module._init_kwargs, dict), name
    song = type(net.model).__name__ == "SongUNet"
    for name, module in net.named_modules():
        kw = getattr(module, "_init_kwargs", {})
        if type(module).__name__ == "UNetBlock":
            if song:
                assert type(kw["skip_scale"]) is np.float64 and kw["skip_scale"] == np.sqrt(0.5), name
                assert type(kw["init_attn"]["init_weight"]) is np.float64, name
            else:
                assert type(kw["init"]["init_weight"]) is np.float64 and kw["init"]["init_bias"] == np.sqrt(1 / 3)
            assert set(kw) >= {"in_channels", "out_channels", "emb_channels"}, name
        if name.endswith(".qkv") and song:
            assert type(kw["init_weight"]) is np.float64 and kw["init_weight"] == np.sqrt(0.2), name
        if name == "model.map_label" and not song:
            assert type(kw["init_weight"]) is np.float64 and kw["init_weight"] == np.sqrt(kw["in_features"])


def keep_only(net: torch.nn.Module, attributes: dict[str, set[str]]) -> torch.nn.Module:
    """Each module's __dict__ reduced to what the writer's class stores (see EDM_ATTRIBUTES)."""
    for module in net.modules():
        cls = type(module).__name__
        if cls not in attributes:
            continue  # torch containers
        for key in [k for k in vars(module) if not (k.startswith("_") or k == "training" or k in attributes[cls])]:
            del module.__dict__[key]
        for key in [k for k in module._buffers if k not in EDM_BUFFERS]:
            del module._buffers[key]
            module._non_persistent_buffers_set.discard(key)
    return net


def numpy1_spelling(data: bytes) -> bytes:
    """The pickle as numpy < 2 writes it (`numpy.core.multiarray.scalar`; numpy >= 2 writes `numpy._core`),
    rewritten by hand: protocol 2 names it in a GLOBAL opcode, protocol 4 in a length-prefixed string; frames
    are rebuilt by pickletools.optimize."""
    new = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    new = pickletools.optimize(new.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"))
    names = pickle_globals(new)
    assert "numpy.core.multiarray.scalar" in names and "numpy._core.multiarray.scalar" not in names
    return new


def pickle_globals(data: bytes) -> set[str]:
    """Every global a pickle names (GLOBAL, and STACK_GLOBAL with its two strings, memoised or not)."""
    names, pushed, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(f"{pushed[-2]}.{pushed[-1]}")
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name != "FRAME":
            pushed.append(arg if isinstance(arg, str) else None)
    return names


def write_edm_pickle(path, ema, persistence, *, protocol: int = 4, numpy_spelling: str = "numpy._core",
                     augment: bool = True, resolution: int = 8):
    """What EDM's training loop writes (see the module docstring); returns the path."""
    loss_fn = persistence.persistent_class(EDMLoss)()
    augment_pipe = persistence.persistent_class(AugmentPipe)(**CIFAR_AUGMENT) if augment else None
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                          use_labels=False, xflip=False, cache=True, resolution=resolution, max_size=50000)
    keep_only(ema, EDM_ATTRIBUTES)
    data = pickle.dumps(dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs),
                        protocol=protocol)
    path.write_bytes(numpy1_spelling(data) if numpy_spelling == "numpy.core" else data)
    return path


# ----- the SFD reference's snapshots ---------------------------------------------------------------------

REFERENCE_TRAINING_KWARGS = dict(  # train.py's defaults for CIFAR-10 (SFD, 2 NFE), as the loop records them
    class_name="training.loss.loss", num_steps=4, sampler_tea="dpmpp", M=3, schedule_type="polynomial",
    schedule_rho=7.0, afs=True, max_order=None, predict_x0=True, lower_order_final=True, use_step_condition=False,
    is_second_stage=False, sigma_min=0.006, sigma_max=80.0, model_source="edm", dataset_name="cifar10",
    guidance_type=None, guidance_rate=0.0)


def reference_module() -> types.ModuleType:
    """`models.networks_edm` with one class per name (subclasses of ours, so the forward still works)."""
    if "models.networks_edm" in sys.modules:
        return sys.modules["models.networks_edm"]
    module = types.ModuleType("models.networks_edm")
    package = types.ModuleType("models")
    package.networks_edm = module
    for name in EDM_ATTRIBUTES:
        ours = getattr(edm, name)
        setattr(module, name, type(name, (ours,), {"__module__": "models.networks_edm", "__qualname__": name}))
    sys.modules.update({"models": package, "models.networks_edm": module})
    return module


def reference_network(kwargs: dict, persistence, weights_from: torch.nn.Module, training_kwargs: dict,
                      dnnlib_util, *, persistent: bool = False) -> torch.nn.Module:
    """The student the reference's training loop pickles: `kwargs` are create_model's (no step_condition: the
    reference always builds the step layers); `weights_from` is our step-conditioned network of those kwargs."""
    net = edm_network({**kwargs, "step_condition": True}, persistence, weights_from)
    for module in net.modules():  # the reference's UNetBlocks and UNets take no step_condition argument
        if isinstance(getattr(module, "_init_kwargs", None), dict):
            module._init_kwargs.pop("step_condition", None)
    net._init_kwargs = copy.deepcopy(kwargs)
    net.sigma_min, net.sigma_max, net.use_fp16 = 0.006, 80.0, True
    net.training_kwargs = dnnlib_util.EasyDict(training_kwargs)
    attributes = {name: EDM_ATTRIBUTES[name] | REFERENCE_EXTRA_ATTRIBUTES.get(name, set()) for name in EDM_ATTRIBUTES}
    for module in net.modules():
        if type(module).__name__ == "Conv2d":  # the reference's Conv2d keeps its init arguments
            kw = module._init_kwargs
            module.kernel = kw["kernel"]
            module.init_mode = kw.get("init_mode", "kaiming_normal")
            module.init_weight, module.init_bias = kw.get("init_weight", 1), kw.get("init_bias", 0)
    keep_only(net, attributes)
    if persistent:
        return net
    classes = reference_module()
    for module in net.modules():
        name = type(module).__name__
        if name in EDM_ATTRIBUTES:
            module.__class__ = getattr(classes, name)
            module.__dict__.pop("_init_args", None)
            module.__dict__.pop("_init_kwargs", None)
    return net


def write_reference_snapshot(path, net: torch.nn.Module, *, protocol: int = pickle.DEFAULT_PROTOCOL,
                             numpy_spelling: str = "numpy._core"):
    """`network-snapshot-NNNNNN.pkl` as the reference's training loop writes it: dict(model=net)."""
    data = pickle.dumps(dict(model=net), protocol=protocol)
    path.write_bytes(numpy1_spelling(data) if numpy_spelling == "numpy.core" else data)
    return path
