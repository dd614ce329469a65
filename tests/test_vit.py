"""ClassTokenViT, GatedAttention, parse_attn_blocks and ConvStemPatchEmbed against explicit
reference computations (plain matmul/softmax attention, hand-built token sequences)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from vit_helpers import randomise

from attnmaps.config import load_config
from attnmaps.models.factory import create_model
from attnmaps.models.vit import (
    ClassTokenViT,
    ConvStemPatchEmbed,
    GatedAttention,
    parse_attn_blocks,
)

K = 3
TOL = {"rtol": 1e-9, "atol": 1e-10}


def make_model(**overrides) -> ClassTokenViT:
    cfg = {"num_classes": K, "img_size": (16, 24), "patch_size": 8, "embed_dim": 16,
           "depth": 2, "num_heads": 4, "num_registers": 1}
    cfg.update(overrides)
    torch.manual_seed(0)
    return ClassTokenViT(**cfg)


def set_gates(model: ClassTokenViT, per_block: list[list[float]]) -> None:
    with torch.no_grad():
        for block, values in zip(model.blocks, per_block):
            block.attn.gate.log_alpha.copy_(torch.tensor(values))


def closed_form_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (1.1 - (-0.1)) + (-0.1)).clamp(0, 1)


def ref_attention(attn: GatedAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T/sqrt(d))V per head, each head scaled by its eval gate, then W^O.

    Returns the output [B,N,D] and the full attention probabilities [B,heads,N,N].
    """
    b, n, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, hd).transpose(1, 2)
               for i in range(3))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    out = probs @ v
    if attn.gate is not None:
        out = out * closed_form_gate(attn.gate.log_alpha.detach()).view(1, -1, 1, 1)
    concat = out.transpose(1, 2).reshape(b, n, d)
    return concat @ attn.proj.weight.T + attn.proj.bias, probs


def ref_forward(model: ClassTokenViT, x: torch.Tensor) -> dict:
    """The whole eval-mode forward pass at the native size, built by hand."""
    feats = model.patch_embed(x)
    b, d, gh, gw = feats.shape
    patches = feats.permute(0, 2, 3, 1).reshape(b, gh * gw, d) + model.pos_embed
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), patches,
                        model.reg_token.expand(b, -1, -1)], dim=1)
    probs = []
    for block in model.blocks:
        out, p = ref_attention(block.attn, block.norm1(tokens))
        probs.append(p)
        tokens = tokens + out
        tokens = tokens + block.mlp(block.norm2(tokens))
    final = model.norm(tokens)
    cls = final[:, :K]
    logits = cls.reshape(b, -1) @ model.head.weight.T + model.head.bias
    return {"probs": probs, "cls": cls, "logits": logits, "grid": (gh, gw)}


def ref_map(model: ClassTokenViT, probs: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Class-to-patch rows [B,K,N] averaged uniformly over the heads whose eval gate is > 0."""
    gates = closed_form_gate(model.blocks[block].attn.gate.log_alpha.detach())
    open_heads = [h for h in range(len(gates)) if gates[h] > 0]
    if not open_heads:
        open_heads = list(range(len(gates)))
    return probs[:, open_heads, :K, K:K + n].mean(1)


@pytest.fixture
def tiny():
    model = randomise(make_model()).double().eval()
    set_gates(model, [[3.0, -10.0, 0.0, 1.0], [-10.0, 2.0, 0.5, 3.0]])
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return model, x


# ---------------------------------------------------------------- attention and class maps


def test_gated_attention_equals_explicit():
    torch.manual_seed(0)
    attn = randomise(GatedAttention(16, 4)).double().eval()
    with torch.no_grad():
        attn.gate.log_alpha.copy_(torch.tensor([3.0, -10.0, 0.0, 1.0]))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, rows = attn(x, num_query_rows=3)
    ref_out, probs = ref_attention(attn, x)
    assert_close(out, ref_out, **TOL)
    assert_close(rows, probs[:, :, :3], **TOL)
    assert rows.shape == (2, 4, 3, 7)
    assert attn(x)[1] is None


def test_gated_attention_closed_head_contributes_nothing():
    torch.manual_seed(0)
    attn = randomise(GatedAttention(16, 4)).double().eval()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        attn.gate.log_alpha.copy_(torch.tensor([3.0, -10.0, 3.0, 3.0]))
    base = attn(x)[0]
    with torch.no_grad():  # head 1 is closed: its value slice can be anything
        attn.qkv.weight[32 + 4:32 + 8].normal_()
    assert_close(attn(x)[0], base, **TOL)
    with torch.no_grad():  # head 0 is open: changing its values changes the output
        attn.qkv.weight[32:32 + 4].normal_()
    assert not torch.allclose(attn(x)[0], base)


def test_gated_attention_all_closed_in_training_gives_bias():
    torch.manual_seed(0)
    attn = randomise(GatedAttention(16, 4)).train()
    with torch.no_grad():
        attn.gate.log_alpha.fill_(-100.0)
    out, _ = attn(torch.randn(2, 5, 16))
    assert_close(out, attn.proj.bias.detach().expand(2, 5, 16))


def test_gated_attention_without_gates_is_plain_attention():
    torch.manual_seed(0)
    attn = randomise(GatedAttention(16, 2, gates=False)).double().train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    assert_close(attn(x)[0], ref_attention(attn, x)[0], **TOL)
    assert torch.equal(attn.head_weights(), torch.ones(2))


def test_gated_attention_dim_not_divisible():
    with pytest.raises(ValueError, match="num_heads=3"):
        GatedAttention(16, 3)


def test_full_forward_equals_reference(tiny):
    model, x = tiny
    ref = ref_forward(model, x)
    out = model.forward_features(x)
    assert_close(out["cls"], ref["cls"], **TOL)
    assert_close(model(x), ref["logits"], **TOL)
    assert out["grid"] == (2, 3)


@pytest.mark.parametrize("options", [{}, {"class_blocks": 1},
                                     {"drop_path": 0.3, "grad_checkpointing": True}])
def test_class_only_last_block_gives_same_outputs_and_gradients(options):
    """patch_outputs=False (what forward, predict and training use) runs the last block for
    the class queries only: same class outputs, maps and every gradient as the full pass (also
    with stochastic depth and activation checkpointing, whose random draws must line up)."""
    model = randomise(make_model(depth=3, **options)).double().train()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    results = []
    for patch_outputs in (True, False):
        model.zero_grad()
        torch.manual_seed(5)
        out = model.forward_features(x, labels, attn_blocks="all", patch_outputs=patch_outputs)
        loss = (model.forward_head(out["cls"]).sin().sum()
                + sum(rows[..., K:].square().sum() for rows in out["attn"]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (short, short_grads) = results
    assert "patch" in full and "patch" not in short and "reg" not in short
    assert_close(short["cls"], full["cls"], **TOL)
    for a, b in zip(short["attn"], full["attn"]):
        assert_close(a, b, **TOL)
    assert short_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert_close(short_grads[name], grad, rtol=1e-9, atol=1e-9, msg=name)
    assert full_grads["blocks.2.mlp.fc1.weight"].abs().sum() > 0

@pytest.mark.parametrize("block", [0, 1])
def test_class_attention_rows_equal_explicit(tiny, block):
    model, x = tiny
    probs = ref_forward(model, x)["probs"][block]
    (rows,) = model.forward_features(x, attn_blocks=[block])["attn"]
    assert rows.shape == (2, 4, K, K + 6 + 1)
    assert_close(rows, probs[:, :, :K], **TOL)
    assert_close(rows.sum(-1), torch.ones(2, 4, K, dtype=torch.float64), **TOL)


def test_attention_list_follows_block_order(tiny):
    model, x = tiny
    probs = ref_forward(model, x)["probs"]
    attn = model.forward_features(x, attn_blocks=[0, 1])["attn"]
    assert len(attn) == 2
    for rows, p in zip(attn, probs):
        assert_close(rows, p[:, :, :K], **TOL)
    assert model.forward_features(x)["attn"] == []


@pytest.mark.parametrize("spec,blocks", [("last", [1]), ([0], [0]), ("all", [0, 1])])
def test_predict_maps_average_open_heads_and_blocks(tiny, spec, blocks):
    model, x = tiny
    ref = ref_forward(model, x)
    gh, gw = ref["grid"]
    flat = torch.stack([ref_map(model, ref["probs"][i], i, gh * gw) for i in blocks]).mean(0)
    logits, maps = model.predict(x, attn_blocks=spec)
    assert_close(logits, ref["logits"], **TOL)
    assert maps.shape == (2, K, 2, 3)
    for r in range(gh):  # row-major patch order: patch (r, c) is flat index r * w + c
        for c in range(gw):
            assert_close(maps[:, :, r, c], flat[:, :, r * gw + c], **TOL)
    # patch (1, 0) is the 4th patch, i.e. column K + 3 of the class rows
    assert_close(maps[1, 2, 1, 0], flat[1, 2, 3], **TOL)


def test_class_maps_ignore_closed_head_and_weight_open_heads_equally(tiny):
    model, x = tiny
    ref = ref_forward(model, x)
    _, maps = model.predict(x, attn_blocks=[0])
    p = ref["probs"][0][:, :, :K, K:K + 6]
    # block 0 gates: head 0 -> 1, head 1 -> 0 (closed), head 2 -> 0.5, head 3 -> ~0.78
    expected = (p[:, 0] + p[:, 2] + p[:, 3]) / 3
    assert_close(maps.flatten(2), expected, **TOL)
    assert not torch.allclose(maps.flatten(2), p.mean(1))


def test_class_maps_all_closed_block_falls_back_to_all_heads(tiny):
    model, x = tiny
    set_gates(model, [[-10.0] * 4, [3.0] * 4])
    ref = ref_forward(model, x)
    _, maps = model.predict(x, attn_blocks=[0])
    assert_close(maps.flatten(2), ref["probs"][0][:, :, :K, K:K + 6].mean(1), **TOL)
    assert torch.isfinite(maps).all()


def test_class_maps_at_non_native_size(tiny):
    model, x = tiny
    x = torch.randn(1, 3, 24, 16, dtype=torch.float64)
    out = model.forward_features(x, attn_blocks=[1])
    assert out["grid"] == (3, 2)
    _, maps = model.predict(x)
    assert maps.shape == (1, K, 3, 2)
    rows = out["attn"][0]
    open_heads = [1, 2, 3]
    assert_close(maps[0, 1, 2, 1], rows[0, open_heads, 1, K + 2 * 2 + 1].mean(), **TOL)


# ---------------------------------------------------------------- class-token masking


def _labels(rows: int, seed: int) -> torch.Tensor:
    return (torch.rand(rows, 4, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def test_token_mask_never_drops_present_classes():
    model = make_model(num_classes=4, mask_rate=1.0)
    labels = _labels(20000, 0)
    keep = model.token_mask(labels)
    assert keep.dtype == torch.bool and keep.shape == labels.shape
    assert keep[labels == 1].all()
    assert not keep[labels == 0].any()


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_token_mask_drop_rate(rate):
    torch.manual_seed(5)
    model = make_model(num_classes=4, mask_rate=rate)
    labels = _labels(20000, 1)
    keep = model.token_mask(labels)
    assert keep[labels == 1].all()
    absent = labels == 0
    assert (~keep[absent]).float().mean().item() == pytest.approx(rate, abs=0.015)
    for c in range(4):  # every class column is masked at the same rate
        col = absent[:, c]
        assert (~keep[col, c]).float().mean().item() == pytest.approx(rate, abs=0.03)


def test_token_mask_rate_zero_never_drops():
    model = make_model(num_classes=4, mask_rate=0.0)
    assert model.token_mask(torch.zeros(5000, 4)).all()
    model.train()
    cls = model.forward_features(torch.randn(4, 3, 16, 24), torch.zeros(4, 4))["cls"]
    assert (cls.abs().sum(-1) > 0).all()


def test_eval_mode_does_not_mask(tiny):
    model, x = tiny
    model.mask_rate = 1.0
    labels = torch.zeros(2, K, dtype=torch.float64)
    masked = model.forward_features(x, labels)["cls"]
    assert_close(masked, model.forward_features(x)["cls"], **TOL)
    assert (masked.abs().sum(-1) > 0).all()


def test_training_zeroes_exactly_the_chosen_absent_classes():
    model = randomise(make_model(gates=False, num_classes=4, mask_rate=0.5))
    x = torch.randn(8, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    labels = _labels(8, 2)
    clean = model.eval().forward_features(x)["cls"]
    model.train()  # no gates, no drop path: token_mask is the only random draw
    for seed in range(5):
        torch.manual_seed(seed)
        keep = model.token_mask(labels)
        torch.manual_seed(seed)
        cls = model.forward_features(x, labels)["cls"]
        zero_rows = cls.abs().sum(-1) == 0
        assert torch.equal(zero_rows, ~keep)
        assert not zero_rows[labels == 1].any()
        assert_close(cls, clean * keep.unsqueeze(-1).float())


def test_training_masking_with_gates_never_hits_present_classes():
    model = make_model(num_classes=4, mask_rate=0.5).train()
    x = torch.randn(6, 3, 16, 24)
    dropped = 0
    for seed in range(10):
        labels = _labels(6, 10 + seed)
        cls = model.forward_features(x, labels)["cls"]
        zero_rows = cls.abs().sum(-1) == 0
        assert not zero_rows[labels == 1].any()
        dropped += int(zero_rows.sum())
    assert dropped > 0


# ---------------------------------------------------------------- shapes and options


@pytest.mark.parametrize("chans", [1, 13, 15])
def test_any_channel_count(chans):
    model = make_model(in_chans=chans).eval()
    assert model(torch.randn(2, chans, 16, 24)).shape == (2, K)


@pytest.mark.parametrize("stem,patch,size,grid", [
    ("conv", 4, (16, 24), (4, 6)),
    ("conv", 8, (16, 24), (2, 3)),
    ("linear", 14, (28, 42), (2, 3)),
])
def test_patch_sizes_and_stems(stem, patch, size, grid):
    model = make_model(stem=stem, patch_size=patch, img_size=size)
    x = torch.randn(2, 3, *size)
    model.train()
    assert model(x).shape == (2, K)
    model.eval()
    out = model.forward_features(x, attn_blocks=[1])
    assert out["grid"] == grid
    assert out["patch"].shape == (2, grid[0] * grid[1], 16)
    logits, maps = model.predict(x)
    assert logits.shape == (2, K) and maps.shape == (2, K, *grid)


@pytest.mark.parametrize("convs_per_stage", [1, 2, 3])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_structure(patch, convs_per_stage):
    stem = ConvStemPatchEmbed(5, 32, patch, convs_per_stage)
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    strides = [m.stride[0] for m in convs]
    assert strides == ([2] + [1] * (convs_per_stage - 1)) * int(math.log2(patch))
    assert stem.eval()(torch.randn(1, 5, 16, 24)).shape == (1, 32, 16 // patch, 24 // patch)


def test_one_conv_stem_is_a_chain_of_strided_convolutions():
    """With one convolution per stage, the stem in eval mode equals conv -> BN -> GELU per stage
    then the 1x1 projection, computed here with the functional ops on the same weights."""
    stem = ConvStemPatchEmbed(3, 64, 4, convs_per_stage=1)
    for m in stem.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    stem.eval()
    x = torch.randn(2, 3, 12, 20)
    layers = list(stem.proj)
    y = x
    for conv, bn in ((layers[0], layers[1]), (layers[3], layers[4])):
        y = F.conv2d(y, conv.weight, stride=2, padding=1)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None]
                                                              + bn.eps)
        y = F.gelu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
    y = F.conv2d(y, layers[6].weight, layers[6].bias)
    assert_close(stem(x), y)
    assert sum(p.numel() for p in stem.parameters()) < sum(
        p.numel() for p in ConvStemPatchEmbed(3, 64, 4).parameters())


def test_stem_convs_per_stage_config_builds_the_stem():
    cfg = load_config(None, ["model.stem_convs_per_stage=1", "model.patch_size=4"])
    model = create_model(cfg.model, K)
    strided = [m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)
               and m.kernel_size == (3, 3)]
    assert [m.stride[0] for m in strided] == [2, 2]
    with pytest.raises(ValueError, match="stem_convs_per_stage"):
        ConvStemPatchEmbed(3, 16, 4, convs_per_stage=0)


@pytest.mark.parametrize("patch", [14, 6, 12])
def test_conv_stem_needs_power_of_two(patch):
    with pytest.raises(ValueError, match="stem"):
        ConvStemPatchEmbed(3, 16, patch)
    with pytest.raises(ValueError, match="stem"):
        make_model(stem="conv", patch_size=patch, img_size=(patch * 2, patch * 3))


def test_no_registers():
    model = make_model(num_registers=0).eval()
    x = torch.randn(2, 3, 16, 24)
    out = model.forward_features(x, attn_blocks=[0])
    assert out["reg"].shape == (2, 0, 16)
    assert out["attn"][0].shape == (2, 4, K, K + 6)
    assert model.predict(x)[1].shape == (2, K, 2, 3)


def test_register_tokens_shape():
    out = make_model(num_registers=2).eval().forward_features(torch.randn(1, 3, 16, 24))
    assert out["cls"].shape == (1, K, 16) and out["reg"].shape == (1, 2, 16)


def test_pos_embed_native_size_is_stored():
    model = make_model()
    assert torch.equal(model._pos_embed((2, 3)), model.pos_embed)


def test_pos_embed_resampling_keeps_row_column_layout():
    model = make_model(img_size=(24, 32), embed_dim=16)  # grid 3x4
    rows = torch.arange(3.0).view(3, 1).expand(3, 4)
    cols = torch.arange(4.0).view(1, 4).expand(3, 4)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, :, 0] = rows.reshape(-1)
        model.pos_embed[0, :, 1] = cols.reshape(-1)
        model.pos_embed[0, :, 2] = 0.7
    pos = model._pos_embed((3, 8)).detach()  # only the width changes
    assert pos.shape == (1, 24, 16)
    grid = pos.reshape(3, 8, 16)
    assert_close(grid[..., 0], torch.arange(3.0).view(3, 1).expand(3, 8))  # rows unchanged
    assert torch.all(grid[:, :, 1] == grid[:1, :, 1])  # column code constant down each column
    assert_close(grid[..., 2], torch.full((3, 8), 0.7))


def test_other_input_size_runs():
    model = make_model().eval()
    out = model.forward_features(torch.randn(1, 3, 32, 40), attn_blocks=[1])
    assert out["grid"] == (4, 5)
    assert out["patch"].shape == (1, 20, 16)
    assert out["attn"][0].shape == (1, 4, K, K + 20 + 1)


def test_input_not_divisible_raises():
    model = make_model()
    with pytest.raises(ValueError, match="17x24") as info:
        model(torch.randn(1, 3, 17, 24))
    assert "patch_size=8" in str(info.value)


@pytest.mark.parametrize("shape", [(1, 4, 16, 24), (1, 1, 16, 24), (3, 16, 24)])
def test_wrong_channels_raises(shape):
    with pytest.raises(ValueError, match="in_chans"):
        make_model()(torch.randn(*shape))


@pytest.mark.parametrize("kwargs,word", [
    ({"head": "mean"}, "head"),
    ({"stem": "vit"}, "stem"),
    ({"mask_rate": 1.5}, "mask_rate"),
    ({"img_size": (20, 24)}, "img_size"),
])
def test_invalid_options_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_model(**kwargs)


@pytest.mark.parametrize("head", ["joint", "per_token"])
def test_heads_give_logits(head):
    model = make_model(head=head).eval()
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, K)


def test_per_token_head_reads_only_its_token():
    model = randomise(make_model(head="per_token"))
    cls = torch.randn(2, K, 16)
    base = model.forward_head(cls).detach()
    expected = torch.einsum("bkd,kd->bk", cls, model.head_weight.detach()) + model.head_bias
    assert_close(base, expected.detach())
    for j in range(K):
        moved = cls.clone()
        moved[:, j] += torch.randn(2, 16)
        logits = model.forward_head(moved).detach()
        others = [c for c in range(K) if c != j]
        assert torch.equal(logits[:, others], base[:, others])
        assert not torch.allclose(logits[:, j], base[:, j])


def test_joint_head_reads_all_tokens():
    model = randomise(make_model(head="joint"))
    cls = torch.randn(2, K, 16)
    base = model.forward_head(cls).detach()
    moved = cls.clone()
    moved[:, 0] += 1.0
    changed = model.forward_head(moved).detach()
    assert not torch.allclose(changed[:, 1:], base[:, 1:])


def test_gates_off():
    model = make_model(gates=False)
    assert model.l0_penalty().item() == 0.0
    assert torch.equal(model.gate_values(), torch.ones(2, 4))


def test_gate_values_and_l0_penalty():
    model = make_model()
    values = [[3.0, -10.0, 0.0, 1.0], [-2.0, 2.0, 0.5, 3.0]]
    set_gates(model, values)
    la = torch.tensor(values)
    assert_close(model.gate_values(), closed_form_gate(la))
    expected = torch.sigmoid(la - 0.33 * math.log(0.1 / 1.1)).sum()
    assert_close(model.l0_penalty(), expected)


def test_backward_reaches_every_trainable_part():
    model = make_model(stem="conv", drop_path=0.1).train()
    x = torch.randn(2, 3, 16, 24)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = nn.functional.binary_cross_entropy_with_logits(model(x, labels), labels)
    (loss + 0.01 * model.l0_penalty()).backward()
    for name in ("cls_token", "pos_embed", "reg_token", "blocks.0.attn.gate.log_alpha",
                 "blocks.1.attn.qkv.weight", "head.weight", "patch_embed.proj.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
    assert dict(model.named_parameters())["cls_token"].grad.abs().sum() > 0


def test_no_weight_decay_names_are_parameters():
    for head in ("joint", "per_token"):
        model = make_model(head=head, num_registers=0)
        params = dict(model.named_parameters())
        names = model.no_weight_decay()
        assert names and names <= set(params)


# ---------------------------------------------------------------- parse_attn_blocks


@pytest.mark.parametrize("spec,depth,expected", [
    ("last", 4, [3]),
    ("last", 1, [0]),
    ("last1", 4, [3]),
    ("last3", 4, [1, 2, 3]),
    ("last4", 4, [0, 1, 2, 3]),
    ("all", 3, [0, 1, 2]),
    ([0, 2], 4, [0, 2]),
    ((2, 0), 4, [0, 2]),
    ([-1], 4, [3]),
    ([0, -1, 3], 4, [0, 3]),
    ([-4, -2], 4, [0, 2]),
])
def test_parse_attn_blocks(spec, depth, expected):
    assert parse_attn_blocks(spec, depth) == expected


@pytest.mark.parametrize("spec", ["last0", "lastx", "first", "last5", "last-1", "", "All"])
def test_parse_attn_blocks_rejects(spec):
    with pytest.raises(ValueError, match="attn_blocks"):
        parse_attn_blocks(spec, 4)


@pytest.mark.parametrize("spec", [[4], [-5], [0, 7], []])
def test_parse_attn_blocks_rejects_out_of_range_index(spec):
    with pytest.raises(ValueError):
        parse_attn_blocks(spec, 4)


@pytest.mark.parametrize("convs_per_stage", [1, 3])
def test_channels_last_stem_matches_the_contiguous_one(convs_per_stage):
    """The channels-last stem (the default) gives the contiguous stem's output and gradients."""
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed(3, 32, 4, convs_per_stage).train()
    x = torch.randn(2, 3, 12, 20)
    results = []
    for channels_last in (False, True):
        stem.channels_last = channels_last
        stem.zero_grad()
        out = stem(x)
        out.square().sum().backward()
        results.append((out, [p.grad.clone() for p in stem.parameters()]))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for fast, plain in zip(results[1][1], results[0][1]):
        assert_close(fast, plain, rtol=1e-4, atol=1e-4)
