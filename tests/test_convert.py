"""convert_state_dict / load_pretrained against a plain-torch reference of the timm / DINOv2 ViT
forward: converted ClassTokenViT outputs must equal the source ViT's [CLS] and patch outputs."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import Tensor
from torch.testing import assert_close

from attnmaps.models.convert import (
    convert_state_dict,
    load_pretrained,
    resample_patch_kernel,
    resample_pos_embed,
    resize_matrix,
)
from attnmaps.models.factory import is_attnmaps_checkpoint
from attnmaps.models.vit import ClassTokenViT

DIM, DEPTH, HEADS, PATCH, GRID = 32, 2, 2, 4, 4
EXACT = {"rtol": 1e-5, "atol": 1e-5}


def make_source(seed: int = 0, *, dim: int = DIM, depth: int = DEPTH, grid: int = GRID,
                in_chans: int = 3, registers: int = 0, reg_name: str = "register_tokens",
                reg_pos: bool = False, cls_pos: bool = True, dist: bool = False,
                layer_scale: bool = False, dinov2: bool = False,
                qkv_bias: bool = True) -> dict[str, Tensor]:
    """Random timm / DeiT / DINOv2-layout ViT weights, with classifier heads."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    prefix = int(cls_pos) * (1 + int(dist) + (registers if reg_pos else 0))
    sd = {"patch_embed.proj.weight": rand(dim, in_chans, PATCH, PATCH),
          "patch_embed.proj.bias": rand(dim), "cls_token": rand(1, 1, dim),
          "pos_embed": rand(1, prefix + grid * grid, dim),
          "norm.weight": 1 + rand(dim), "norm.bias": rand(dim),
          "head.weight": rand(10, dim), "head.bias": rand(10)}
    if dist:
        sd.update({"dist_token": rand(1, 1, dim), "head_dist.weight": rand(10, dim),
                   "head_dist.bias": rand(10)})
    if registers:
        sd[reg_name] = rand(1, registers, dim)
    if dinov2:
        sd["mask_token"] = rand(1, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rand(dim), p + "norm1.bias": rand(dim),
                   p + "attn.qkv.weight": rand(3 * dim, dim),
                   p + "attn.proj.weight": rand(dim, dim),
                   p + "attn.proj.bias": rand(dim), p + "norm2.weight": 1 + rand(dim),
                   p + "norm2.bias": rand(dim), p + "mlp.fc1.weight": rand(4 * dim, dim),
                   p + "mlp.fc1.bias": rand(4 * dim), p + "mlp.fc2.weight": rand(dim, 4 * dim),
                   p + "mlp.fc2.bias": rand(dim)})
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = rand(3 * dim)
        if layer_scale:
            sd[p + "ls1.gamma"] = 0.1 + torch.rand(dim, generator=gen)
            sd[p + "ls2.gamma"] = 0.1 + torch.rand(dim, generator=gen)
    return sd


def reference_vit(sd: dict[str, Tensor], x: Tensor, heads: int = HEADS) -> tuple[Tensor, Tensor]:
    """timm / DINOv2 ViT forward: patchify, prefix tokens + pos, pre-norm blocks with optional
    layer scale, final norm. Returns the [CLS] output [B, D] and patch outputs [B, N, D]."""
    batch, dim = x.shape[0], sd["cls_token"].shape[-1]
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                       stride=PATCH).flatten(2).transpose(1, 2)
    n = patches.shape[1]
    regs = sd.get("register_tokens", sd.get("reg_token", torch.zeros(1, 0, dim)))
    extra = [sd["dist_token"]] if "dist_token" in sd else []
    prefix = torch.cat([sd["cls_token"], *extra], 1).expand(batch, -1, -1)
    embedded = sd["pos_embed"].shape[1] - n  # prefix tokens that get position embeddings
    if embedded == 0:  # timm no_embed_class: only patches have position embeddings
        tokens = torch.cat([prefix, regs.expand(batch, -1, -1), patches + sd["pos_embed"]], 1)
    elif embedded == prefix.shape[1]:  # DINOv2: registers inserted after pos embedding
        tokens = torch.cat([prefix, patches], 1) + sd["pos_embed"]
        tokens = torch.cat([tokens[:, :1], regs.expand(batch, -1, -1), tokens[:, 1:]], 1)
    else:  # timm with embedded registers: [cls, reg, patches] + pos
        tokens = torch.cat([prefix, regs.expand(batch, -1, -1), patches], 1) + sd["pos_embed"]
    hd = dim // heads
    for i in range(sum(k.endswith("norm1.weight") for k in sd)):
        p = f"blocks.{i}."
        h = F.layer_norm(tokens, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / hd**0.5).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(batch, -1, dim), sd[p + "attn.proj.weight"],
                       sd[p + "attn.proj.bias"])
        tokens = tokens + att * sd.get(p + "ls1.gamma", 1.0)
        h = F.layer_norm(tokens, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        tokens = tokens + h * sd.get(p + "ls2.gamma", 1.0)
    tokens = F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return tokens[:, 0], tokens[:, -n:]


def make_model(k: int = 1, registers: int = 0, grid: int = GRID, **kw) -> ClassTokenViT:
    cfg = {"num_classes": k, "img_size": (grid * PATCH, grid * PATCH), "patch_size": PATCH,
           "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, "num_registers": registers,
           "head": "per_token", "stem": "linear", "gates": False}
    cfg.update(kw)
    torch.manual_seed(1)
    return ClassTokenViT(**cfg).eval()


def convert_into(model: ClassTokenViT, sd, **kw):
    converted, report = convert_state_dict(sd, model, num_heads=HEADS, **kw)
    model.load_state_dict(converted, strict=False)
    return converted, report


@pytest.mark.parametrize(("source", "registers"), [
    ({}, 0),
    ({"qkv_bias": False}, 0),
    ({"layer_scale": True, "dinov2": True}, 0),
    ({"layer_scale": True, "dinov2": True, "registers": 3}, 3),
    ({"registers": 2, "reg_name": "reg_token", "reg_pos": True}, 2),
    ({"registers": 2, "reg_name": "reg_token", "cls_pos": False}, 2),
])
def test_converted_model_equals_reference_vit(source, registers):
    sd = make_source(**source)
    model = make_model(registers=registers)
    _, report = convert_into(model, sd)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    ref_cls, ref_patch = reference_vit(sd, x)
    with torch.no_grad():
        out = model.forward_features(x)
    assert_close(out["cls"][:, 0], ref_cls, **EXACT)
    assert_close(out["patch"], ref_patch, **EXACT)
    assert report.fresh == ["head_weight", "head_bias"]
    assert {"head.weight", "head.bias"} <= set(report.dropped)
    assert ("mask_token" in report.dropped) == source.get("dinov2", False)
    assert report.source == ("dinov2" if source.get("dinov2") else "timm")


def test_layer_scale_matters_in_reference():
    """Guards the exactness test: the reference does apply gamma, so folding is exercised."""
    sd = make_source(layer_scale=True)
    x = torch.randn(1, 3, GRID * PATCH, GRID * PATCH)
    plain = {k: v for k, v in sd.items() if ".ls" not in k}
    assert not torch.allclose(reference_vit(sd, x)[0], reference_vit(plain, x)[0], atol=1e-3)


def test_class_tokens_and_registers_start_from_cls():
    sd = make_source(registers=4, dinov2=True)
    model = make_model(k=3, registers=2)
    converted, report = convert_into(model, sd)
    start = sd["cls_token"][0, 0] + sd["pos_embed"][0, 0]
    assert_close(converted["cls_token"], start.expand(1, 3, DIM))
    assert_close(converted["reg_token"], start.expand(1, 2, DIM))
    assert "register_tokens" in report.dropped
    assert any("register tokens (2) start from the cls_token" in note for note in report.notes)


def test_distilled_deit_drops_dist_token_and_its_position():
    sd = make_source(dist=True)
    model = make_model()
    converted, report = convert_into(model, sd)
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.dropped)
    assert_close(converted["pos_embed"], sd["pos_embed"][:, 2:])
    assert_close(converted["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    # The same ViT without its distillation token (and that token's position slot).
    plain = {k: v for k, v in sd.items() if k != "dist_token"}
    plain["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], 1)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        out = model.forward_features(x)
    ref_cls, ref_patch = reference_vit(plain, x)
    assert_close(out["cls"][:, 0], ref_cls, **EXACT)
    assert_close(out["patch"], ref_patch, **EXACT)


def test_pos_embed_resampled_to_model_grid():
    sd = make_source()
    model = make_model(img_size=(6 * PATCH, 8 * PATCH))
    converted, report = convert_into(model, sd)
    grid = sd["pos_embed"][:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    assert converted["pos_embed"].shape == (1, 48, DIM)
    assert_close(converted["pos_embed"], want.permute(0, 2, 3, 1).reshape(1, 48, DIM))
    assert any("4x4 to a 6x8" in note for note in report.notes)
    # Same resampling as the model applies at run time to other input sizes.
    source_grid_model = make_model()
    convert_into(source_grid_model, sd)
    with torch.no_grad():
        runtime = source_grid_model._pos_embed((6, 8))
    assert_close(converted["pos_embed"], runtime)
    assert_close(resample_pos_embed(sd["pos_embed"][:, 1:], (4, 4), (4, 4)),
                 sd["pos_embed"][:, 1:])


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _chunked(sd):
    """DINOv2 block_chunks=1 layout: ``blocks.<chunk>.<global index>.``, all in chunk 0."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            k = f"blocks.0.{i}.{rest}"
        out[k] = v
    return out


def _dino_training_checkpoint(sd, other):
    teacher = {**_prefixed(sd, "backbone."), "head.mlp.fc1.weight": other["head.weight"]}
    return {"teacher": teacher, "student": _prefixed(other, "module.backbone."), "epoch": 3}


def _deit3_names(sd, other):
    return {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
            for k, v in sd.items()}


@pytest.mark.parametrize("wrap", [
    lambda sd, other: {"model": sd},
    lambda sd, other: {"state_dict": _prefixed(sd, "module.")},
    lambda sd, other: _prefixed(sd, "backbone."),
    _dino_training_checkpoint,
    lambda sd, other: {**_prefixed(sd, "teacher.backbone."),
                       **_prefixed(other, "student.backbone.")},
    lambda sd, other: _chunked(sd),
    _deit3_names,
], ids=["model", "state_dict+module", "backbone", "dino-teacher-student", "flat-teacher",
        "chunked", "deit3-gamma"])
def test_containers_prefixes_and_chunks(wrap):
    sd = make_source(layer_scale=True)
    want, _ = convert_state_dict(sd, make_model(), num_heads=HEADS)
    got, report = convert_state_dict(wrap(sd, make_source(seed=5)), make_model(), num_heads=HEADS)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], rtol=0, atol=0)
    assert report.fresh == ["head_weight", "head_bias"]


def test_chunked_keys_really_are_nested():
    assert "blocks.0.1.norm1.weight" in _chunked(make_source())


@pytest.mark.parametrize(("model_kw", "source_kw", "convert_kw", "words"), [
    ({"stem": "conv"}, {}, {}, ["patch_embed.proj.weight", "model.stem=linear"]),
    ({"patch_size": 2, "img_size": (16, 16)}, {}, {},
     ["patch_embed.proj.weight", "(4, 4)", "patch_size=2", "model.patch_size=4",
      "adapt_patch_size"]),
    ({"embed_dim": 16}, {}, {}, ["embed_dim=32", "embed_dim=16", "model.embed_dim=32"]),
    ({"depth": 3}, {}, {}, ["blocks", "depth=2", "depth=3", "model.depth=2"]),
    ({"in_chans": 13}, {}, {}, ["in_chans=3", "in_chans=13", "model.in_chans=3",
                                "adapt_channels"]),
    ({"mlp_ratio": 2.0}, {}, {}, ["blocks.0.mlp.fc1.weight", "hidden=128", "model.mlp_ratio=4"]),
    ({}, {}, {"num_heads": 4}, ["blocks.0.attn.qkv.weight", "num_heads=4", "num_heads=2",
                                "model.num_heads=4"]),
    ({"embed_dim": 192, "num_heads": 4}, {"dim": 192, "depth": 1}, {"num_heads": None},
     ["num_heads=3", "num_heads=4", "model.num_heads=3"]),
    ({"qkv_bias": False}, {}, {}, ["blocks.0.attn.qkv.bias", "model.qkv_bias=true"]),
])
def test_mismatch_errors_name_key_values_and_setting(model_kw, source_kw, convert_kw, words):
    kw = {"num_heads": HEADS, **convert_kw}
    model_cfg = {"depth": source_kw.get("depth", DEPTH), **model_kw}
    with pytest.raises(ValueError) as err:
        convert_state_dict(make_source(**source_kw), make_model(**model_cfg), **kw)
    for word in words:
        assert word in str(err.value)


def test_unknown_source_keys_are_rejected():
    sd = make_source()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(DIM)
    with pytest.raises(ValueError, match="blocks.0.attn.q_norm.weight"):
        convert_state_dict(sd, make_model(), num_heads=HEADS)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        convert_state_dict({"conv1.weight": torch.ones(3)}, make_model())


def test_unknown_width_is_noted_not_rejected():
    _, report = convert_state_dict(make_source(), make_model())
    assert any("could not check" in note for note in report.notes)


def test_adapt_channels_keeps_grey_response():
    sd = make_source()
    model = make_model(in_chans=13)
    converted, report = convert_into(model, sd, adapt_channels=True)
    grey = torch.randn(2, 1, GRID * PATCH, GRID * PATCH)
    want = F.conv2d(grey.expand(-1, 3, -1, -1), sd["patch_embed.proj.weight"],
                    sd["patch_embed.proj.bias"], stride=PATCH)
    with torch.no_grad():
        got = model.patch_embed(grey.expand(-1, 13, -1, -1))
    assert_close(got, want, **EXACT)
    assert_close(converted["patch_embed.proj.weight"][:, 5],
                 sd["patch_embed.proj.weight"].mean(1) * 3 / 13)
    assert any("3 to 13 input channels" in note for note in report.notes)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_pretrained_round_trip(tmp_path, suffix):
    sd = make_source(layer_scale=True, dinov2=True)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save({"teacher": _prefixed(sd, "backbone."), "epoch": 7}, path)
    else:
        save_file(sd, str(path))
    model = make_model(k=2, registers=1, gates=True, head="joint")
    report = load_pretrained(path, model, num_heads=HEADS)
    want, _ = convert_state_dict(sd, make_model(k=2, registers=1, gates=True, head="joint"),
                                 num_heads=HEADS)
    state = model.state_dict()
    for key in want:
        assert_close(state[key], want[key], rtol=0, atol=0)
    assert report.fresh == ["blocks.0.attn.gate.log_alpha", "blocks.1.attn.gate.log_alpha",
                            "head.weight", "head.bias"]
    text = str(report)
    assert "blocks.*.attn.gate.log_alpha (x2)" in text
    assert f"{len(report.loaded)} tensors loaded" in text
    assert not is_attnmaps_checkpoint(path)


def test_load_pretrained_rejects_incomplete_and_unsafe_files(tmp_path):
    sd = make_source()
    del sd["norm.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    model = make_model()
    before = model.state_dict()["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(ValueError, match="norm.weight"):
        load_pretrained(path, model, num_heads=HEADS)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], before)
    unsafe = tmp_path / "args.pth"
    # DeiT's checkpoints carry their argparse namespace; torch >= 2.14 allow-lists some builtins
    # (Exception among them) for weights_only, never an arbitrary class such as this one
    torch.save({"model": make_source(), "args": argparse.Namespace(lr=1e-3)}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(unsafe, model, num_heads=HEADS)


def test_is_attnmaps_checkpoint(tmp_path):
    own = tmp_path / "own.safetensors"
    save_model(make_model(), str(own))
    assert is_attnmaps_checkpoint(own)


def resize_each_patch(x: Tensor, patch: int, new: int) -> Tensor:
    """Bilinearly resize every non-overlapping ``patch`` x ``patch`` patch of ``x`` on its own to
    ``new`` x ``new`` (the resize that FlexiViT's pseudo-inverse is exact for)."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    tiles = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    tiles = F.interpolate(tiles.reshape(-1, c, patch, patch), size=(new, new), mode="bilinear",
                          align_corners=False)
    tiles = tiles.reshape(b, gh, gw, c, new, new).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(b, c, gh * new, gw * new)


def test_resize_matrix_matches_interpolate():
    x = torch.randn(3, 5, dtype=torch.float64)
    want = F.interpolate(x[None, None], size=(4, 7), mode="bilinear", align_corners=False)
    assert_close((resize_matrix((3, 5), (4, 7)) @ x.flatten()).reshape(4, 7), want[0, 0])


@pytest.mark.parametrize("new_patch", [6, 8])
def test_adapt_patch_size_enlarged_gives_source_model(new_patch):
    sd = make_source(layer_scale=True, dinov2=True)
    model = make_model(patch_size=new_patch, img_size=(GRID * new_patch,) * 2)
    _, report = convert_into(model, sd, adapt_patch_size=True)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    ref_cls, ref_patch = reference_vit(sd, x)
    with torch.no_grad():
        out = model.forward_features(resize_each_patch(x, PATCH, new_patch))
    assert_close(out["cls"][:, 0], ref_cls, rtol=1e-4, atol=1e-4)
    assert_close(out["patch"], ref_patch, rtol=1e-4, atol=1e-4)
    assert any(f"from 4x4 to {new_patch}x{new_patch}" in note for note in report.notes)


def test_adapt_patch_size_shrunk_is_exact_on_block_constant_patches():
    """16 -> 8-style halving: the bilinear resize is 2x2 average pooling, so a patch constant on
    2x2 pixel blocks keeps its token; other patches get the least-squares kernel."""
    sd = make_source()
    big = torch.randn(DIM, 3, 2 * PATCH, 2 * PATCH, generator=torch.Generator().manual_seed(5))
    sd["patch_embed.proj.weight"] = big
    model = make_model()
    converted, report = convert_into(model, sd, adapt_patch_size=True)
    small = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    blocky = small.repeat_interleave(2, -1).repeat_interleave(2, -2)
    want = F.conv2d(blocky, big, sd["patch_embed.proj.bias"], stride=2 * PATCH)
    with torch.no_grad():
        assert_close(model.patch_embed(small), want, rtol=1e-4, atol=1e-4)
    assert any("least squares" in note for note in report.notes)
    # Least squares: the residual B^T w' - w is orthogonal to every B^T z.
    b = resize_matrix((2 * PATCH,) * 2, (PATCH,) * 2)
    residual = b.T @ converted["patch_embed.proj.weight"][0, 0].double().flatten() - \
        big[0, 0].double().flatten()
    assert_close(b @ residual, torch.zeros(PATCH * PATCH, dtype=torch.float64), atol=1e-4,
                 rtol=0)


def test_resample_patch_kernel_same_size_is_identity():
    w = torch.randn(4, 3, PATCH, PATCH)
    assert_close(resample_patch_kernel(w, PATCH), w)


def test_load_pretrained_adapts_patch_size(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    sd = make_source()
    save_file(sd, str(path))
    model = make_model(patch_size=8, img_size=(GRID * 8,) * 2)
    with pytest.raises(ValueError, match="adapt_patch_size"):
        load_pretrained(path, model, num_heads=HEADS)
    load_pretrained(path, model, num_heads=HEADS, adapt_patch_size=True)
    assert_close(model.state_dict()["patch_embed.proj.weight"],
                 resample_patch_kernel(sd["patch_embed.proj.weight"], 8))
