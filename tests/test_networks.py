"""EDM networks: exact NVlabs state-dict layout, the preconditioning equations, autocast, SFD-v step condition."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sfd.networks.edm import (
    EDM_CONFIGS, Conv2d, DhariwalUNet, EDMPrecond, PositionalEmbedding, SongUNet, UNetBlock, build_edm, is_step_key,
    group_norm_from_channel_stats, multihead_attention, nearest_upsample2x, qkv_channel_order, set_group_norm,
)

KEYS_DIR = Path(__file__).parent / "data" / "edm_keys"
KEY_FILES = sorted(KEYS_DIR.glob("*.txt"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are ~100x slower with 2 threads on a shared 2-core machine; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_keys(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    lines = path.read_text().splitlines()
    kwargs = ast.literal_eval(lines[1].split("init kwargs:", 1)[1].strip())
    keys = []
    for line in lines[2:]:
        if line.strip():
            name, shape = line.split("\t")
            keys.append((name, tuple(ast.literal_eval(shape))))
    return kwargs, keys


def shapes(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def tiny_song(**kw) -> EDMPrecond:
    cfg = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.1)
    return EDMPrecond(**{**cfg, **kw})


def tiny_adm(**kw) -> EDMPrecond:
    # 64 channels so ADM's 64-channels-per-head rule gives attention heads (1 and 2).
    cfg = dict(img_resolution=8, img_channels=3, label_dim=5, model_type="DhariwalUNet", model_channels=32,
               channel_mult=[2, 4], num_blocks=1, attn_resolutions=[8, 4])
    return EDMPrecond(**{**cfg, **kw})


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised output layers non-zero weights, so outputs depend on every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


@pytest.mark.parametrize("path", KEY_FILES, ids=lambda p: p.stem)
def test_state_dict_matches_edm(path):
    kwargs, expected = read_keys(path)
    with torch.device("meta"):
        net = EDMPrecond(**kwargs)
    assert shapes(net) == expected  # same keys, same shapes, same order


def test_key_files_present():
    assert {p.name for p in KEY_FILES} == {"cifar10-32x32.txt", "ffhq-afhqv2-64x64.txt", "imagenet-64x64-cond.txt"}


@pytest.mark.parametrize("name,path", [
    ("edm-cifar10-32x32-uncond-vp", "cifar10-32x32.txt"),
    ("ffhq-64x64-uncond-vp", "ffhq-afhqv2-64x64.txt"),
    ("edm-afhqv2-64x64-uncond-vp.pkl", "ffhq-afhqv2-64x64.txt"),
    ("edm-imagenet-64x64-cond-adm", "imagenet-64x64-cond.txt"),
])
def test_build_edm_configs(name, path):
    with torch.device("meta"):
        net = build_edm(name)
    assert shapes(net) == read_keys(KEYS_DIR / path)[1]
    assert len(EDM_CONFIGS) == 4
    with pytest.raises(KeyError, match="unknown EDM config"):
        build_edm("cifar100")


@pytest.mark.parametrize("variant", [
    dict(),
    dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="skip", decoder_type="skip",
         resample_filter=[1, 3, 3, 1]),
    dict(encoder_type="residual", label_dim=0),
])
def test_song_unet_forward(variant):
    torch.manual_seed(0)
    net = randomize(tiny_song(**variant)).eval()
    x = torch.randn(2, 3, 8, 8)
    labels = F.one_hot(torch.tensor([1, 3]), 4).float() if net.label_dim else None
    aug = torch.randn(2, 9)
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 20.0]), labels, augment_labels=aug)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = net(x, torch.tensor([0.5, 20.0]), labels, augment_labels=aug)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out_bf16.dtype == torch.float32 and torch.isfinite(out_bf16).all()
    assert (out - out_bf16).abs().max() < 0.1 * out.abs().max()


def test_song_unet_train_mode_backward():
    net = tiny_song(label_dropout=0.5).train()
    out = net(torch.randn(2, 3, 8, 8), 1.0, F.one_hot(torch.tensor([0, 2]), 4).float(),
              augment_labels=torch.randn(2, 9))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_dhariwal_unet_forward_labels_and_autocast():
    torch.manual_seed(0)
    net = randomize(tiny_adm()).eval()
    assert net.model.enc["8x8_block0"].num_heads == 1 and net.model.enc["4x4_block0"].num_heads == 2
    x = torch.randn(3, 3, 8, 8)
    idx = torch.tensor([0, 4, 2])
    with torch.no_grad():
        a = net(x, 2.0, F.one_hot(idx, 5).float())
        b = net(x, 2.0, idx)  # integer class indices are one-hot encoded
        null = net(x, 2.0, None)
        null_explicit = net(x, 2.0, torch.zeros(3, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = net(x, 2.0, idx)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(null, null_explicit)
    assert not torch.allclose(a, null)
    assert c.dtype == torch.float32 and torch.isfinite(c).all()
    assert (a - c).abs().max() < 0.1 * a.abs().max()


class StubModel(torch.nn.Module):
    """Records the inner model's inputs; F(x, c_noise) = 3·x + c_noise."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step=None):
        self.seen = (x.clone(), noise_labels.clone())
        return 3 * x + noise_labels.reshape(-1, 1, 1, 1)


def test_preconditioning_equations():
    net = tiny_song()
    net.model = StubModel()
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    out = net(x, sigma)
    s, sd = sigma.double().reshape(-1, 1, 1, 1), 0.5
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    c_noise = sigma.double().log() / 4
    xin, noise = net.model.seen
    torch.testing.assert_close(xin.double(), c_in * x.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noise.double(), c_noise, rtol=1e-6, atol=1e-6)
    expected = c_skip * x.double() + c_out * (3 * c_in * x.double() + c_noise.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32


def test_sigma_forms_agree():
    net = randomize(tiny_song()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x, torch.tensor([1.5, 1.5]))
        for sigma in (1.5, torch.tensor(1.5), torch.full((2, 1, 1, 1), 1.5), torch.tensor([1.5])):
            torch.testing.assert_close(net(x, sigma), ref)
    with pytest.raises(ValueError, match="sigma has 3 values"):
        net(x, torch.ones(3))


def test_init_kwargs_rebuild():
    net = tiny_adm(step_condition=True)
    again = EDMPrecond(**{**net.init_kwargs})
    assert shapes(again) == shapes(net) and again.init_kwargs == net.init_kwargs
    assert net.init_kwargs["step_condition"] is True and net.init_kwargs["channel_mult"] == [2, 4]


def test_attributes_kept():
    net = tiny_song(use_fp16=True)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_data) == (8, 3, 4, 0.5)
    assert net.sigma_min == 0 and net.sigma_max == float("inf") and net.use_fp16 is True
    assert isinstance(net.model, SongUNet) and isinstance(tiny_adm().model, DhariwalUNet)


def _edm_attention(qkv_edm, num_heads):
    """EDM's own formulation: (head, channel, q/k/v) channel layout, float32 weights via einsum."""
    n, c3, h, w = qkv_edm.shape
    c = c3 // 3
    q, k, v = qkv_edm.reshape(n * num_heads, c // num_heads, 3, h * w).unbind(2)
    weights = torch.softmax(torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])), dim=2)
    return torch.einsum("nqk,nck->ncq", weights, v.float()).reshape(n, c, h, w)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_equals_edm_formula_and_is_copy_free_under_channels_last(num_heads, monkeypatch):
    torch.manual_seed(0)
    c = 8
    qkv_edm = torch.randn(2, 3 * c, 3, 4)
    qkv = qkv_edm[:, qkv_channel_order(c, num_heads)]
    torch.testing.assert_close(multihead_attention(qkv, num_heads), _edm_attention(qkv_edm, num_heads))
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: seen.append((q, k, v)) or real(q, k, v))
    out = multihead_attention(qkv.contiguous(memory_format=torch.channels_last), num_heads)
    assert all(t.stride(-1) == 1 for t in seen[0])  # channels are the unit stride: no transposing copy needed
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _edm_attention(qkv_edm, num_heads))
    # Under bf16 autocast (inputs rounded to bf16, as the qkv convolution gives them) the fused kernel stays
    # within bf16 rounding of EDM's float32-weights formula on the same rounded inputs.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = multihead_attention(qkv.bfloat16(), num_heads)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), _edm_attention(qkv_edm.bfloat16(), num_heads), atol=2e-2, rtol=2e-2)


def test_attention_block_keeps_edm_weight_layout():
    """The block reorders qkv channels at run time only: its state dict is EDM's, and its output equals the
    block computed with EDM's layout."""
    from sfd.networks.edm import UNetBlock

    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2).eval()
    with torch.no_grad():
        for prm in block.parameters():
            prm.normal_(0, 0.3)
    assert "qkv_order" not in block.state_dict() and block.state_dict()["qkv.weight"].shape == (24, 8, 1, 1)
    x, emb = torch.randn(2, 8, 3, 4), torch.randn(2, 4)
    block_no_attn = UNetBlock(8, 8, emb_channels=4)
    block_no_attn.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith(("norm2", "qkv", "proj"))})
    h = block_no_attn.eval()(x, emb)
    qkv_edm = block.qkv(block.norm2(h))
    expected = (block.proj(_edm_attention(qkv_edm, 2)) + h) * block.skip_scale
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.to(memory_format=torch.channels_last)(
        x.contiguous(memory_format=torch.channels_last), emb), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_stats_group_norm_is_group_norm(channels_last):
    """Group statistics from per-channel ones (law of total variance) are the group's statistics exactly:
    in float64 value and gradients equal F.group_norm to rounding, in either memory layout."""
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64)) * torch.rand(1, 16, 1, 1, generator=g,
                                                                                          dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    out = group_norm_from_channel_stats(x, 4, w, b, 1e-5)
    ref = F.group_norm(x, 4, w, b, 1e-5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), up), torch.autograd.grad(ref, (x, w, b), up)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_channel_stats_group_norm_float32_and_autocast():
    """float32: within float32 rounding of the float64 truth even when the mean dwarfs the spread (the
    per-channel variances are one-pass stable); under autocast the output is float32, like CUDA autocast's
    group_norm, and within bf16 rounding of the float32 result."""
    g = torch.Generator().manual_seed(1)
    x = 100 + 0.5 * torch.randn(2, 8, 6, 6, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    truth = F.group_norm(x.double(), 2, w.double(), b.double(), 1e-5)
    out = group_norm_from_channel_stats(x, 2, w, b, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-4)
    x = torch.randn(2, 8, 6, 6, generator=g)  # bf16 keeps 8 bits: 100 + 0.5·noise would round to a few levels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = group_norm_from_channel_stats(x.bfloat16(), 2, w.bfloat16(), b.bfloat16(), 1e-5)
    assert low.dtype == torch.float32
    high = group_norm_from_channel_stats(x, 2, w, b, 1e-5)
    assert (low - high).abs().max() < 2 ** -6 * high.abs().max()


def test_set_group_norm_switches_a_whole_network():
    """A network with every norm on channel-stats computes what it computed before, keeps its state dict,
    and refuses an unknown computation."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[4], dropout=0.0).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))  # wake the zero-initialised layers
    x, sigma = torch.randn(2, 3, 8, 8) * 2, torch.tensor([0.5, 3.0])
    keys = list(net.state_dict())
    ref = net(x, sigma)
    set_group_norm(net, "channel-stats")
    assert {m.impl for m in net.modules() if hasattr(m, "impl")} == {"channel-stats"}
    torch.testing.assert_close(net(x, sigma), ref, rtol=1e-5, atol=1e-5)
    assert list(net.state_dict()) == keys
    with pytest.raises(ValueError, match="group norm must be one of"):
        set_group_norm(net, "fused")


def test_nearest_upsampling_keeps_channels_last():
    """The layout-keeping 2x nearest up-sampling equals F.interpolate in value and gradient, and its output
    is channels-last when its input is (NCHW inputs take F.interpolate itself)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, ref = nearest_upsample2x(x), F.interpolate(x, scale_factor=2, mode="nearest")
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == (2, 5, 6, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    nchw = x.detach().contiguous()
    assert nearest_upsample2x(nchw).is_contiguous()


def _edm_resample(x, up, filt=(1.0, 1.0), padding=0):
    """EDM's own formulation: a depthwise (grouped) stride-2 convolution with the normalised outer filter."""
    f = torch.tensor(filt)
    f = (torch.outer(f, f) / f.sum().square())[None, None].tile([x.shape[1], 1, 1, 1])
    if up:
        return F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=padding)
    return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=padding)


@pytest.mark.parametrize("size", [6, 5])
@pytest.mark.parametrize("fused", [False, True])
def test_box_resampling_shortcut_equals_edm_depthwise_convolution(size, fused):
    """The [1, 1] filter runs as nearest up-sampling / average pooling; values and gradients must equal
    EDM's depthwise-convolution formulation, and other filters must still take the convolution path."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    for up in (True, False):
        layer = Conv2d(4, 5, kernel=3, up=up, down=not up, fused_resample=fused)
        w, b = layer.weight, layer.bias.reshape(1, -1, 1, 1)
        if up:
            ref = F.conv2d(_edm_resample(x, up=True), w, padding=1) + b
        else:
            ref = _edm_resample(F.conv2d(x, w, padding=1), up=False) + b if fused else \
                F.conv2d(_edm_resample(x, up=False), w, padding=1) + b
        out = layer(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, layer.weight), g)
        ref_grads = torch.autograd.grad(ref, (x, layer.weight), g)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    wide = Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert not wide.box_filter
    torch.testing.assert_close(wide(x), _edm_resample(x, up=False, filt=(1.0, 3.0, 3.0, 1.0), padding=1))


def test_positional_embedding_formula():
    emb = PositionalEmbedding(4, max_positions=100, endpoint=True)(torch.tensor([2.0]))
    freqs = torch.tensor([1.0, 0.01])  # (1/100)^(i/(2-1)), i = 0, 1
    torch.testing.assert_close(emb[0], torch.cat([(2 * freqs).cos(), (2 * freqs).sin()]))


# ----- SFD-v's step condition as the SFD reference lays it out (github.com/zju-pi/diff-sampler, sfd-main at
# commit 97407a4, models/networks_edm.py): map_step (SongUNet: positional with endpoint=True and the sin/cos halves
# swapped, as for its noise; ADM: as its noise), map_step_layer0 + SiLU, map_step_layer1 + SiLU; in every
# UNetBlock an affine_step Linear (emb_channels -> out_channels, x2 with adaptive scale) registered after conv1.

def reference_step_keys(teacher_keys: list[str], adaptive: bool) -> list[str]:
    """The reference's state-dict key order: a teacher's keys with the step layers inserted where the reference
    registers them (after map_layer1 / map_label; after each block's conv1)."""
    out = []
    mapping_end = "model.map_label.weight" if adaptive else "model.map_layer1.bias"
    for key in teacher_keys:
        out.append(key)
        if key == mapping_end:
            out += [f"model.map_step_layer{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
        if key.endswith(".conv1.bias"):
            out += [key.replace(".conv1.bias", f".affine_step.{p}") for p in ("weight", "bias")]
    return out


@pytest.mark.parametrize("path", KEY_FILES, ids=lambda p: p.stem)
def test_step_conditioned_layout_is_the_references(path):
    kwargs, teacher = read_keys(path)
    with torch.device("meta"):
        net = EDMPrecond(**kwargs, step_condition=True)
    adaptive = kwargs["model_type"] == "DhariwalUNet"
    assert [k for k, _ in shapes(net)] == reference_step_keys([k for k, _ in teacher], adaptive)
    emb = dict(shapes(net))["model.map_layer1.weight"][0]
    for key, shape in shapes(net):
        if key.endswith("affine_step.weight"):
            out = dict(shapes(net))[key.replace("affine_step", "conv1")][0]
            assert shape == ((2 if adaptive else 1) * out, emb), key
    assert {k for k, _ in shapes(net)} - {k for k, _ in teacher} == {k for k, _ in shapes(net) if is_step_key(k)}


def step_embedding_formula(net: EDMPrecond, n: float) -> torch.Tensor:
    """silu(W1 silu(W0 pe(n) + b0) + b1), pe as the reference's map_step, written out."""
    model = net.model
    half = model.map_step.num_channels // 2
    song = isinstance(model, SongUNet)
    i = torch.arange(half, dtype=torch.float64)
    freqs = (1 / 10000) ** (i / (half - 1 if song else half))  # SongUNet: endpoint=True
    angle = n * freqs
    pe = torch.cat([angle.sin(), angle.cos()] if song else [angle.cos(), angle.sin()])  # SongUNet swaps halves
    w0, b0 = model.map_step_layer0.weight.double(), model.map_step_layer0.bias.double()
    w1, b1 = model.map_step_layer1.weight.double(), model.map_step_layer1.bias.double()
    return F.silu(w1 @ F.silu(w0 @ pe + b0) + b1)


def modulated_formula(block, x, emb, emb_step) -> torch.Tensor:
    """The activation a UNetBlock feeds to its dropout and conv1, written out (issue 17, item 4)."""
    y = block.conv0(F.silu(block.norm0(x))).double()
    a = (emb.double() @ block.affine.weight.double().T + block.affine.bias.double())[:, :, None, None]
    s = (emb_step.double() @ block.affine_step.weight.double().T + block.affine_step.bias.double())[:, :, None, None]

    def norm1(t):
        return F.group_norm(t, block.norm1.num_groups, block.norm1.weight.double(), block.norm1.bias.double(),
                            block.norm1.eps)

    if not block.adaptive_scale:
        return F.silu(norm1(y + a + s))
    scale, shift = a.chunk(2, dim=1)
    scale_step, shift_step = s.chunk(2, dim=1)
    return F.silu(shift_step + (shift + norm1(y) * (scale + 1)) * (scale_step + 1))


@pytest.mark.parametrize("make", [tiny_song, tiny_adm], ids=["song", "adm"])
def test_sfdv_forward_is_the_references_formula(make):
    """Every block of a tiny step-conditioned network receives the step embedding of the formula, and feeds
    conv1 the formula's modulation of its own inputs."""
    net = randomize(make(step_condition=True), seed=3).eval()
    seen: dict[str, dict] = {}

    def capture(name):
        def block_hook(module, args, kwargs):
            x, emb, emb_step = (list(args) + [kwargs.get("emb"), kwargs.get("emb_step")])[:3]
            seen[name] = {"x": x, "emb": emb, "emb_step": emb_step}

        def conv1_hook(module, args):
            seen[name]["h"] = args[0]
        return block_hook, conv1_hook

    blocks = {n: m for n, m in net.named_modules() if isinstance(m, UNetBlock)}
    handles = []
    for name, block in blocks.items():
        block_hook, conv1_hook = capture(name)
        handles += [block.register_forward_pre_hook(block_hook, with_kwargs=True),
                    block.conv1.register_forward_pre_hook(conv1_hook)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        net(x, torch.tensor([0.5, 20.0]), torch.tensor([1, 3]), step=6)
        expected_step = step_embedding_formula(net, 6.0)
        assert len(seen) == len(blocks) > 4
        for name, got in seen.items():
            torch.testing.assert_close(got["emb_step"].double(), expected_step.expand(2, -1), rtol=1e-5, atol=1e-6)
            want = modulated_formula(blocks[name], got["x"], got["emb"], got["emb_step"])
            torch.testing.assert_close(got["h"].double(), want, rtol=1e-5, atol=1e-5, msg=name)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("make", [tiny_song, tiny_adm], ids=["song", "adm"])
def test_step_condition_adds_only_new_layers(make):
    torch.manual_seed(0)
    teacher = randomize(make()).eval()
    student = make(step_condition=True)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys and all(map(is_step_key, result.missing_keys))
    assert {k for k in student.state_dict() if is_step_key(k)} == set(result.missing_keys)


@pytest.mark.parametrize("make", [tiny_song, tiny_adm], ids=["song", "adm"])
def test_a_fresh_step_student_is_its_teacher_only_with_zero_init(make):
    """step_init="random" (the default, as the reference) perturbs every block from the start; "zero" makes each
    affine_step zero, so a fresh SFD-v student computes its teacher until the first update."""
    torch.manual_seed(0)
    teacher = randomize(make()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = teacher(x, 3.0, step=5)  # a teacher ignores the step
        for step_init in ("zero", "random"):
            student = make(step_condition=True, step_init=step_init).eval()
            student.load_state_dict(teacher.state_dict(), strict=False)
            for step in (4, torch.tensor([4, 7]), torch.tensor(6)):
                same = torch.allclose(student(x, 3.0, step=step), ref, rtol=0, atol=1e-6)
                assert same == (step_init == "zero"), (step_init, step)
            with pytest.raises(ValueError, match="step-conditioned"):
                student(x, 3.0)
        # once affine_step has learnt something, the step matters
        student = make(step_condition=True, step_init="zero").eval()
        student.load_state_dict(teacher.state_dict(), strict=False)
        student.model.enc["8x8_block0"].affine_step.weight.normal_()
        assert not torch.allclose(student(x, 3.0, step=4), student(x, 3.0, step=7))
    with pytest.raises(ValueError, match="step_init"):
        make(step_condition=True, step_init="ones")
