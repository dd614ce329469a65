"""ClassTokenViT class-attention mode (``class_blocks``, CaiT style) and activation checkpointing,
against hand-written attention (softmax(q k^T / sqrt(d)) v from the fused qkv weights) and
against the plain, non-checkpointed forward/backward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from vit_helpers import randomise

from attnmaps.models.vit import ClassTokenViT, GatedAttention, parse_attn_blocks

K = 3
GRID = (2, 3)
N = GRID[0] * GRID[1]
TOL = {"rtol": 1e-9, "atol": 1e-10}
GATES = [[3.0, -10.0, 0.0, 1.0], [-10.0, 2.0, 0.5, 3.0], [3.0, 3.0, -10.0, 1.0]]


def make_model(**overrides) -> ClassTokenViT:
    cfg = {"num_classes": K, "img_size": (16, 24), "patch_size": 8, "embed_dim": 16,
           "depth": 3, "num_heads": 4, "num_registers": 1, "class_blocks": 2}
    cfg.update(overrides)
    torch.manual_seed(0)
    return ClassTokenViT(**cfg)


def closed_form_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1)


def images(batch: int = 2, dtype: torch.dtype = torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 24, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def tiny() -> ClassTokenViT:
    model = randomise(make_model()).double().eval()
    with torch.no_grad():
        for block, values in zip(model.blocks, GATES):
            block.attn.gate.log_alpha.copy_(torch.tensor(values))
    return model


def ref_attention(attn: GatedAttention, x: torch.Tensor,
                  num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode gated attention by hand; queries are the first ``num_queries`` tokens (all when
    None). Returns the output [B,q,D] and the attention probabilities [B,heads,q,L]."""
    b, n, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, hd).transpose(1, 2)
               for i in range(3))
    q = q[:, :, :num_queries]
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    out = probs @ v
    if attn.gate is not None:
        out = out * closed_form_gate(attn.gate.log_alpha.detach()).view(1, -1, 1, 1)
    concat = out.transpose(1, 2).reshape(b, q.shape[2], d)
    return concat @ attn.proj.weight.T + attn.proj.bias, probs


def ref_forward(model: ClassTokenViT, x: torch.Tensor) -> dict:
    """The eval-mode forward pass in class-attention mode, built by hand."""
    feats = model.patch_embed(x)
    b, d, gh, gw = feats.shape
    patches = feats.permute(0, 2, 3, 1).reshape(b, gh * gw, d) + model.pos_embed
    seq = torch.cat([patches, model.reg_token.expand(b, -1, -1)], dim=1)
    first = len(model.blocks) - model.class_blocks
    for block in model.blocks[:first]:  # self-attention over [patches | REG] only
        seq = seq + ref_attention(block.attn, block.norm1(seq))[0]
        seq = seq + block.mlp(block.norm2(seq))
    cls = model.cls_token.expand(b, -1, -1)
    probs = {}
    for i in range(first, len(model.blocks)):  # class tokens query [CLS | patches | REG]
        block = model.blocks[i]
        out, probs[i] = ref_attention(block.attn, block.norm1(torch.cat([cls, seq], 1)), K)
        cls = cls + out
        cls = cls + block.mlp(block.norm2(cls))
    final = model.norm(torch.cat([cls, seq], dim=1))
    logits = final[:, :K].reshape(b, -1) @ model.head.weight.T + model.head.bias
    return {"cls": final[:, :K], "patch": final[:, K:K + gh * gw], "reg": final[:, K + gh * gw:],
            "logits": logits, "probs": probs}


# ---------------------------------------------------------------- attention with K queries


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_query_only_attention_equals_explicit(qkv_bias):
    torch.manual_seed(0)
    attn = randomise(GatedAttention(16, 4, qkv_bias=qkv_bias)).double().eval()
    with torch.no_grad():
        attn.gate.log_alpha.copy_(torch.tensor([3.0, -10.0, 0.0, 1.0]))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, rows = attn(x, num_query_rows=3, num_queries=3)
    ref_out, probs = ref_attention(attn, x)  # full self-attention: its first 3 rows
    assert out.shape == (2, 3, 16) and rows.shape == (2, 4, 3, 7)
    assert_close(out, ref_out[:, :3], **TOL)
    assert_close(rows, probs[:, :, :3], **TOL)
    assert attn(x, num_queries=3)[1] is None
    with pytest.raises(ValueError, match="num_query_rows=4"):
        attn(x, num_query_rows=4, num_queries=3)


def test_class_attention_rows_and_outputs_equal_explicit(tiny):
    x = images()
    ref = ref_forward(tiny, x)
    out = tiny.forward_features(x, attn_blocks="all")
    assert len(out["attn"]) == 2
    for rows, block in zip(out["attn"], (1, 2)):
        assert rows.shape == (2, 4, K, K + N + 1)
        assert_close(rows, ref["probs"][block], **TOL)
        assert_close(rows.sum(-1), torch.ones(2, 4, K, dtype=torch.float64), **TOL)
    for key in ("cls", "patch", "reg"):
        assert_close(out[key], ref[key], **TOL)
    assert_close(tiny(x), ref["logits"], **TOL)


def test_maps_average_open_heads_of_class_blocks(tiny):
    x = images()
    ref = ref_forward(tiny, x)
    # block 1 gates: head 0 closed; block 2: head 2 closed (see GATES)
    block1 = ref["probs"][1][:, [1, 2, 3], :, K:K + N].mean(1)
    block2 = ref["probs"][2][:, [0, 1, 3], :, K:K + N].mean(1)
    logits, maps = tiny.predict(x, attn_blocks="all")
    assert_close(logits, ref["logits"], **TOL)
    assert maps.shape == (2, K, *GRID)
    assert_close(maps.flatten(2), (block1 + block2) / 2, **TOL)
    assert_close(tiny.predict(x, attn_blocks="last2")[1], maps, **TOL)
    assert_close(tiny.predict(x)[1].flatten(2), block2, **TOL)
    assert_close(tiny.predict(x, attn_blocks=[-2])[1].flatten(2), block1, **TOL)


def test_closed_head_of_class_block_contributes_nothing(tiny):
    x = images()
    base = tiny.forward_features(x)["cls"].detach()
    value = 2 * 16  # value rows of the fused qkv weight
    with torch.no_grad():  # block 2, head 2 is closed: its values can be anything
        tiny.blocks[2].attn.qkv.weight[value + 8:value + 12].normal_()
    assert_close(tiny.forward_features(x)["cls"], base, **TOL)
    with torch.no_grad():  # head 3 is open
        tiny.blocks[2].attn.qkv.weight[value + 12:value + 16].normal_()
    assert not torch.allclose(tiny.forward_features(x)["cls"], base)


# ---------------------------------------------------------------- patch and register tokens


def test_patch_outputs_do_not_depend_on_class_tokens():
    x = images(dtype=torch.float32)
    model = randomise(make_model()).train()
    out = model.forward_features(x)
    (grad,) = torch.autograd.grad(out["patch"].sum() + out["reg"].sum(), model.cls_token,
                                  allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    model.eval()
    before = model.forward_features(x)
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
    after = model.forward_features(x)
    assert torch.equal(after["patch"], before["patch"])
    assert torch.equal(after["reg"], before["reg"])
    assert not torch.allclose(after["cls"], before["cls"])

    everywhere = randomise(make_model(class_blocks=0)).eval()  # the same check can fail
    out = everywhere.forward_features(x)
    (grad,) = torch.autograd.grad(out["patch"].sum(), everywhere.cls_token)
    assert torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("class_blocks", [1, 2, 3])
def test_patch_outputs_equal_first_blocks_alone(class_blocks):
    model = randomise(make_model(class_blocks=class_blocks)).double().eval()
    x = images()
    patches = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    seq = torch.cat([patches, model.reg_token.expand(2, -1, -1)], dim=1)
    for block in model.blocks[:3 - class_blocks]:
        seq = block(seq)[0]
    seq = model.norm(seq)
    out = model.forward_features(x)
    assert_close(out["patch"], seq[:, :N], **TOL)
    assert_close(out["reg"], seq[:, N:], **TOL)


# ---------------------------------------------------------------- attn_blocks


@pytest.mark.parametrize("spec,depth,class_blocks,expected", [
    ("all", 4, 2, [2, 3]),
    ("all", 4, 4, [0, 1, 2, 3]),
    ("last", 4, 2, [3]),
    ("last2", 4, 2, [2, 3]),
    ("last1", 4, 1, [3]),
    ([2], 4, 2, [2]),
    ([-1, -2], 4, 2, [2, 3]),
    ((3, -1), 4, 2, [3]),
    ("all", 4, 0, [0, 1, 2, 3]),
])
def test_parse_attn_blocks_in_class_attention_mode(spec, depth, class_blocks, expected):
    assert parse_attn_blocks(spec, depth, class_blocks) == expected


@pytest.mark.parametrize("spec", ["last3", [1], [0, 3], [-3], [4], []])
def test_parse_attn_blocks_rejects_blocks_without_class_tokens(spec):
    with pytest.raises(ValueError, match="class_blocks=2") as info:
        parse_attn_blocks(spec, 4, 2)
    assert "attn_blocks" in str(info.value)
    if not isinstance(spec, str):
        assert "2..3" in str(info.value) and "-2..-1" in str(info.value)


@pytest.mark.parametrize("class_blocks", [-1, 5])
def test_parse_attn_blocks_rejects_bad_class_blocks(class_blocks):
    with pytest.raises(ValueError, match="class_blocks"):
        parse_attn_blocks("last", 4, class_blocks)


@pytest.mark.parametrize("class_blocks", [-1, 4])
def test_constructor_rejects_bad_class_blocks(class_blocks):
    with pytest.raises(ValueError, match=f"class_blocks={class_blocks}"):
        make_model(class_blocks=class_blocks)


def test_model_rejects_blocks_without_class_tokens(tiny):
    x = images()
    assert tiny.resolve_attn_blocks("all") == [1, 2]
    with pytest.raises(ValueError, match=r"1\.\.2"):
        tiny.forward_features(x, attn_blocks=[0])
    with pytest.raises(ValueError, match=r"1\.\.2"):
        tiny.predict(x, attn_blocks=[0, 2])
    with pytest.raises(ValueError, match="last<n>"):
        tiny.predict(x, attn_blocks="last3")
    rows = tiny.forward_features(x, attn_blocks=[2])["attn"]
    with pytest.raises(ValueError, match=r"1\.\.2"):
        tiny.class_maps(rows, [0], GRID)


# ---------------------------------------------------------------- shapes, backward, gates


@pytest.mark.parametrize("k,head", [(1, "joint"), (1, "per_token"), (151, "per_token"),
                                    (151, "joint")])
def test_shapes_and_backward(k, head):
    model = make_model(num_classes=k, head=head, num_registers=2).train()
    x = images(dtype=torch.float32)
    labels = (torch.rand(2, k, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    labels[0] = 1.0  # sample 0 keeps every class token, so the last MLP gets a gradient
    out = model.forward_features(x, labels, attn_blocks="all")
    assert out["cls"].shape == (2, k, 16) and out["patch"].shape == (2, N, 16)
    assert [rows.shape for rows in out["attn"]] == [(2, 4, k, k + N + 2)] * 2
    logits, maps = model.forward_head(out["cls"]), model.class_maps(out["attn"], "all", GRID)
    assert logits.shape == (2, k) and maps.shape == (2, k, *GRID)
    loss = F.binary_cross_entropy_with_logits(logits, labels) + maps.square().mean()
    (loss + 0.01 * model.l0_penalty()).backward()
    params = dict(model.named_parameters())
    for name in ("cls_token", "pos_embed", "reg_token", "blocks.0.attn.gate.log_alpha",
                 "blocks.0.attn.qkv.weight", "blocks.2.attn.gate.log_alpha",
                 "blocks.2.attn.qkv.weight", "blocks.2.mlp.fc1.weight"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.eval()
    logits, maps = model.predict(x)
    assert logits.shape == (2, k) and maps.shape == (2, k, *GRID)


def test_gates_and_l0_cover_class_blocks(tiny):
    la = torch.tensor(GATES, dtype=torch.float64)
    assert tiny.gate_values().shape == (3, 4)
    assert_close(tiny.gate_values(), closed_form_gate(la), **TOL)
    expected = torch.sigmoid(la - 0.33 * math.log(0.1 / 1.1)).sum()
    assert_close(tiny.l0_penalty(), expected, **TOL)
    tiny.l0_penalty().backward()
    assert tiny.blocks[2].attn.gate.log_alpha.grad.abs().sum() > 0


def test_head_parameter_counts():
    def head_params(k: int, head: str) -> int:
        model = make_model(num_classes=k, head=head)
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith("head"))
    assert head_params(10, "joint") == 10 * 16 * 10 + 10
    assert head_params(10, "per_token") == 10 * 16 + 10


# ---------------------------------------------------------------- class_blocks=0 unchanged

# Computed with the code before class-attention mode existed (commit b5d6f8d), float64.
OLD_EVAL_LOGITS = [[-2.882226673155491, 0.6191034807017696, -0.5772577280260416],
                   [-2.958401315893099, 0.5854552832204516, -0.6483336151316859]]
OLD_EVAL_ROWS = [0.2972133437587767, 0.15256524852743375]
OLD_EVAL_PATCH = 6.615187428518714
OLD_TRAIN_LOGITS = {
    7: [[-2.742707472015182, 0.42751774513894286, -0.4770497427567516],
        [-2.8484679876434633, 0.3874162690116639, -0.569817477026717]],
    8: [[0.03384113339064182, 0.2780004945061192, 1.5167318014118323],
        [-2.428736600544574, 0.611638842953383, -1.536202432877079]],
}


def test_class_blocks_zero_matches_saved_reference():
    model = randomise(make_model(depth=2, class_blocks=0, drop_path=0.1)).double().eval()
    x = images()
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = model.forward_features(x, attn_blocks=[0, 1])
    weights = torch.arange(out["attn"][0].numel(), dtype=torch.float64).cos()
    patch_weights = torch.arange(out["patch"].numel(), dtype=torch.float64).sin()
    tol = {"rtol": 0.0, "atol": 1e-12}
    logits = model.forward_head(out["cls"])
    assert_close(logits, torch.tensor(OLD_EVAL_LOGITS, dtype=torch.float64), **tol)
    assert_close(torch.stack([(r.flatten() * weights).sum() for r in out["attn"]]),
                 torch.tensor(OLD_EVAL_ROWS, dtype=torch.float64), **tol)
    assert_close((out["patch"].flatten() * patch_weights).sum(),
                 torch.tensor(OLD_EVAL_PATCH, dtype=torch.float64), **tol)
    model.train()  # gates, drop path and token masking draw random numbers in the old order
    for seed, expected in OLD_TRAIN_LOGITS.items():
        torch.manual_seed(seed)
        assert_close(model(x, labels), torch.tensor(expected, dtype=torch.float64), **tol)


# ---------------------------------------------------------------- activation checkpointing


def loss_and_grads(model: ClassTokenViT, x: torch.Tensor, labels: torch.Tensor,
                   seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model.forward_features(x, labels, attn_blocks="last")
    logits = model.forward_head(out["cls"])
    maps = model.class_maps(out["attn"], "last", out["grid"])
    loss = (F.binary_cross_entropy_with_logits(logits, labels) + maps.square().mean()
            + 0.01 * model.l0_penalty())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("class_blocks", [0, 2])
def test_checkpointing_gives_same_loss_and_grads(class_blocks):
    model = randomise(make_model(class_blocks=class_blocks, drop_path=0.3, mask_rate=0.5),
                      std=0.1).train()
    x = images(batch=4, dtype=torch.float32)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))

    plain_loss, plain = loss_and_grads(model, x, labels)
    assert len(calls) == 1
    model.grad_checkpointing = True
    loss, grads = loss_and_grads(model, x, labels)
    assert len(calls) == 3  # forward, then recomputed in backward
    assert_close(loss, plain_loss, rtol=0, atol=1e-5)
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        assert_close(grad, plain[name], rtol=0, atol=1e-5, msg=name)
    # the pass is random (gates, drop path, masking), so the recomputation had to replay it
    assert not torch.allclose(loss_and_grads(model, x, labels, seed=4)[0], loss)


def test_checkpointing_only_in_training_with_grad():
    model = make_model(grad_checkpointing=True)
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda *args: calls.append(1))
    x = images(dtype=torch.float32)
    model.eval()
    model(x).sum().backward()
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2
    model(x).sum().backward()
    assert len(calls) == 4
