"""ClassTokenViT: a Vision Transformer with one [CLS] token per class and register tokens.

Token layout ``[CLS_1 ... CLS_K | patch tokens | REG_1 ... REG_R]``. Every attention head carries a
Hard-Concrete gate; during training the output embeddings of absent classes' tokens are randomly
zeroed (class-token masking), which ties token ``c`` to class ``c``. The attention of token ``c``
over the patches is the class-``c`` map used for pseudo masks.

By default the class tokens join every block. With ``class_blocks=n`` (class-attention mode, as in
CaiT, Touvron et al. 2021) the first ``depth - n`` blocks see only ``[patches | REG]`` and the
last ``n`` blocks update only the class tokens, which attend to ``[CLS | patches | REG]``; their
cost is linear in K, which suits datasets with many classes.

Example:
    >>> model = ClassTokenViT(num_classes=5, img_size=(32, 48), patch_size=8, embed_dim=32,
    ...                       depth=2, num_heads=2).eval()
    >>> logits, maps = model.predict(torch.randn(1, 3, 32, 48))
    >>> logits.shape, maps.shape
    (torch.Size([1, 5]), torch.Size([1, 5, 4, 6]))
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .gates import HardConcreteGate


class LinearPatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches projected linearly (a strided convolution)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ConvStemPatchEmbed(nn.Module):
    """log2(patch_size) stages, each a stride-2 3x3 convolution followed by
    ``convs_per_stage - 1`` stride-1 ones (BN + GELU after each), then a 1x1 projection.

    Early convolutions make small ViTs trained from scratch learn much faster (Xiao et al., 2021,
    whose stem has one convolution per stage: ``convs_per_stage=1``). The convolutions run in the
    channels-last memory format (``channels_last``, on by default), in which the CPU's oneDNN
    kernels are faster (``benchmarks/stem_cost.py``); the result is the same up to rounding.
    """

    channels_last: bool = True

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, convs_per_stage: int = 2):
        super().__init__()
        steps = round(math.log2(patch_size))
        if 2**steps != patch_size:
            raise ValueError(
                f"model.stem='conv' needs a power-of-two patch size, got patch_size={patch_size}; "
                "use model.stem=linear for patch sizes such as 14"
            )
        if convs_per_stage < 1:
            raise ValueError(f"model.stem_convs_per_stage={convs_per_stage}; expected >= 1")
        layers: list[nn.Module] = []
        channels = in_chans
        for i in range(steps):
            out = max(embed_dim // 2 ** (steps - 1 - i), 32)
            for k in range(convs_per_stage):
                layers += [nn.Conv2d(channels, out, 3, stride=2 if k == 0 else 1, padding=1,
                                     bias=False),
                           nn.BatchNorm2d(out), nn.GELU()]
                channels = out
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, the transformer block's MLP (timm's layout and names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


ATTENTION_KERNELS = ("auto", "fused", "explicit")
_LEGACY_NAMES = {"cls_tokens": "cls_token", "reg_tokens": "reg_token", ".mlp.0.": ".mlp.fc1.",
                 ".mlp.2.": ".mlp.fc2."}
_LEGACY_KEY = re.compile(r"^cls_tokens$|^reg_tokens$|\.mlp\.0\.|\.mlp\.2\.")
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def resolve_attention_kernel(kernel: str, q: Tensor) -> str:
    """The kernel :func:`attention` runs for ``kernel`` on queries like ``q``."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}; expected one of {ATTENTION_KERNELS}")
    if kernel != "auto":
        return kernel
    return "explicit" if q.device.type == "cpu" and q.dtype in REDUCED_PRECISION else "fused"


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "auto") -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for [B, heads, L, d] inputs.

    ``"fused"`` is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels; keeps no
    [L, L] matrix). ``"explicit"`` is matmul + softmax + matmul, which keeps the attention
    probabilities for backward (memory grows with L^2) but on CPU in bfloat16 / float16 runs
    1.3-2x faster than PyTorch's fused CPU kernel (benchmarks/attention_kernel.py).
    ``"auto"`` picks explicit on CPU in reduced precision (also under autocast, where q arrives in
    bfloat16) and fused everywhere else.
    """
    if resolve_attention_kernel(kernel, q) == "fused":
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class GatedAttention(nn.Module):
    """Multi-head attention, ``concat_i(g_i * head_i) W^O``, on the kernel :func:`attention`
    picks (``kernel``).

    ``forward(x)`` is self-attention over all tokens. ``forward(x, num_queries=q)`` is class
    attention (CaiT): only the first ``q`` tokens are queries, keys and values come from all
    tokens, and the output holds the ``q`` query tokens only. ``num_query_rows=K`` also returns
    the softmax attention of the first ``K`` queries (the class tokens) over all tokens,
    [B, heads, K, N], computed from those rows alone. ``proj`` holds W^O but is applied through
    ``F.linear`` with the gated weight, so forward hooks on ``proj`` do not fire.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, gates: bool = True,
                 gate_temperature: float = 0.33, kernel: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={kernel!r}; expected one of {ATTENTION_KERNELS}")
        self.kernel = kernel
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gate = HardConcreteGate(num_heads, gate_temperature) if gates else None

    def _split_heads(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        """[B, L, parts * D] -> ``parts`` tensors [B, heads, L, head_dim]."""
        batch, tokens, _ = x.shape
        x = x.reshape(batch, tokens, parts, self.num_heads, self.head_dim)
        return x.permute(2, 0, 3, 1, 4).unbind(0)

    def _project(self, x: Tensor, rows: slice, parts: int) -> tuple[Tensor, ...]:
        """Heads of the rows ``rows`` of the fused qkv projection applied to ``x``."""
        bias = None if self.qkv.bias is None else self.qkv.bias[rows]
        return self._split_heads(F.linear(x, self.qkv.weight[rows], bias), parts)

    def forward(self, x: Tensor, num_query_rows: int = 0,
                num_queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        dim = x.shape[-1]
        if num_queries is None:
            q, k, v = self._split_heads(self.qkv(x), 3)
        else:
            (q,) = self._project(x[:, :num_queries], slice(0, dim), 1)
            k, v = self._project(x, slice(dim, 3 * dim), 2)
        if num_query_rows > q.shape[2]:
            raise ValueError(f"num_query_rows={num_query_rows} exceeds the {q.shape[2]} queries")
        out = attention(q, k, v, self.kernel).transpose(1, 2).flatten(2)
        out = F.linear(out, self._gated_proj_weight(), self.proj.bias)
        rows = None
        if num_query_rows:
            scores = q[:, :, :num_query_rows] @ k.transpose(-2, -1) * self.head_dim**-0.5
            rows = scores.softmax(dim=-1)
        return out, rows

    def _gated_proj_weight(self) -> Tensor:
        """``W^O`` with the columns of head ``i`` scaled by its gate ``g_i``:
        ``concat_i(g_i * head_i) W^O = concat_i(head_i) (W^O diag(g))``, which scales D^2
        weights instead of every head output."""
        if self.gate is None:
            return self.proj.weight
        gates = self.gate().to(self.proj.weight.dtype).repeat_interleave(self.head_dim)
        return self.proj.weight * gates

    def head_weights(self) -> Tensor:
        """Deterministic gate value of every head (ones without gates)."""
        if self.gate is None:
            return torch.ones(self.num_heads, device=self.proj.weight.device)
        return self.gate.deterministic()


class Block(nn.Module):
    """Pre-norm transformer block: gated attention and an MLP, each with a residual.

    ``forward(x)`` updates every token (self-attention). ``forward(x, num_queries=q)`` is a CaiT
    class-attention block: the first ``q`` tokens attend to all of ``x`` and only they are
    updated and returned, [B, q, D]; the MLP runs on those ``q`` tokens only.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, gates: bool = True, gate_temperature: float = 0.33,
                 attention_kernel: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GatedAttention(dim, num_heads, qkv_bias, gates, gate_temperature,
                                   attention_kernel)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, num_query_rows: int = 0,
                num_queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        attn_out, rows = self.attn(self.norm1(x), num_query_rows, num_queries)
        queries = x if num_queries is None else x[:, :num_queries]
        queries = queries + self.drop_path(attn_out)
        queries = queries + self.drop_path(self.mlp(self.norm2(queries)))
        return queries, rows


def parse_attn_blocks(spec: str | Sequence[int], depth: int, class_blocks: int = 0) -> list[int]:
    """Block indices named by ``"last"``, ``"last<n>"``, ``"all"`` or an explicit index list.

    With ``class_blocks=m > 0`` (class-attention mode) only the last ``m`` blocks see the class
    tokens, so a spec may name only those: ``"all"`` means the ``m`` class-attention blocks,
    ``"last<n>"`` needs ``n <= m`` and explicit indices must lie in ``depth-m .. depth-1``
    (negative ones count from the end, ``-m .. -1``).
    """
    if not 0 <= class_blocks <= depth:
        raise ValueError(f"class_blocks={class_blocks} must lie in 0..depth={depth}")
    count = class_blocks or depth
    first = depth - count
    mode = (f" (with class_blocks={class_blocks} only the last {count} of the {depth} blocks "
            "see the class tokens)" if class_blocks else "")
    if not isinstance(spec, str):
        indices = [int(i) for i in spec]
        bad = [i for i in indices if not -count <= i < depth or 0 <= i < first]
        if not indices or bad:
            raise ValueError(f"attn_blocks={list(spec)} must be a non-empty list of block indices "
                             f"in {first}..{depth - 1} or {-count}..-1{mode}")
        indices = [i % depth for i in indices]
    elif spec == "all":
        indices = list(range(first, depth))
    elif spec == "last":
        indices = [depth - 1]
    elif spec.startswith("last") and spec[4:].isdigit() and 1 <= int(spec[4:]) <= count:
        indices = list(range(depth - int(spec[4:]), depth))
    else:
        raise ValueError(
            f"attn_blocks={spec!r} is not understood; expected 'last', 'last<n>' with "
            f"1 <= n <= {count}, 'all', or a list of block indices{mode}"
        )
    return sorted(set(indices))


def drop_patches(patches: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """A random ``1 - rate`` share (at least one) of each image's tokens ``patches`` [B,N,D], in
    their original order, and their indices [B,M] (PatchDropout, Liu et al. 2022: a regulariser
    and a cheaper step; a class seen only through some of its patches must be recognised from
    any of them, as in Hide-and-Seek)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"patch dropout rate {rate} must lie in [0, 1)")
    batch, n, dim = patches.shape
    keep = max(1, round(n * (1.0 - rate)))
    index = torch.rand(batch, n, device=patches.device).argsort(1)[:, :keep].sort(1).values
    return patches.gather(1, index.unsqueeze(-1).expand(-1, -1, dim)), index


def resample_pos_embed(pos: Tensor, src_grid: tuple[int, int],
                       dst_grid: tuple[int, int]) -> Tensor:
    """Patch position embeddings [1, h*w, D] resampled bicubically (``align_corners=False``)
    from ``src_grid`` to ``dst_grid``; returned unchanged when the grids agree."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, *src_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], dim)


class ClassTokenViT(nn.Module):
    """ViT with K class tokens, R register tokens, gated heads and class-token masking.

    Args:
        num_classes: K, one [CLS] token per class.
        in_chans: input channels (any number, e.g. 13 or 15 for multispectral rasters).
        img_size: (H, W) the position embeddings are made for; other sizes are resampled.
        patch_size: patch side in pixels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path: transformer shape.
        num_registers: R register tokens (0 allowed).
        head: ``"joint"`` reads all class-token outputs with one linear layer K*D -> K (the
            paper's design; K*D*K weights, quadratic in K); ``"per_token"`` reads logit c from
            token c alone (MCTformer style; K*(D+1) weights). Use ``per_token`` with many
            classes.
        stem: ``"conv"`` (convolutional stem) or ``"linear"`` (plain patchify).
        stem_convs_per_stage: 3x3 convolutions per stride-2 stage of the conv stem (2: a
            stride-1 one after each stride-2 one; 1: Xiao et al.'s stem, about a quarter of the
            multiply-adds at the digits shape).
        gates: Hard-Concrete gate on every head.
        gate_temperature: the gates' Concrete temperature.
        mask_rate: probability of zeroing an absent class's token output in training.
        class_blocks: 0 puts the class tokens in every block. ``n`` in 1..depth selects
            class-attention mode (CaiT): the first ``depth - n`` blocks are self-attention over
            ``[patches | REG]``, the last ``n`` update only the class tokens, whose queries attend
            to ``[CLS | patches | REG]``; patch and register tokens pass them unchanged. Attention
            maps then come from these ``n`` blocks only (``attn_blocks="all"`` means all ``n``).
        grad_checkpointing: recompute each block's activations in the backward pass (training
            only) to save memory; also settable later as the attribute of the same name.
        attention_kernel: ``"auto"``, ``"fused"`` or ``"explicit"`` (see :func:`attention`).
        patch_head: add an auxiliary linear classifier on the final patch tokens, max-pooled over
            the patches (:meth:`patch_logits`): a training signal that makes the patch features
            class-separable early on small data. The maps still come from the class tokens.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: Sequence[int] = (224, 224),
                 patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 num_registers: int = 1, head: str = "joint", stem: str = "linear",
                 stem_convs_per_stage: int = 2, gates: bool = True,
                 gate_temperature: float = 0.33, mask_rate: float = 0.5,
                 class_blocks: int = 0, grad_checkpointing: bool = False,
                 attention_kernel: str = "auto", patch_head: bool = False):
        super().__init__()
        if head not in ("joint", "per_token"):
            raise ValueError(f"head={head!r}; expected 'joint' or 'per_token'")
        if stem not in ("conv", "linear"):
            raise ValueError(f"stem={stem!r}; expected 'conv' or 'linear'")
        if not 0.0 <= mask_rate <= 1.0:
            raise ValueError(f"mask_rate={mask_rate} must lie in [0, 1]")
        if not 0 <= class_blocks <= depth:
            raise ValueError(f"class_blocks={class_blocks} must lie in 0..depth={depth} (0: class "
                             "tokens in every block; n: class attention in the last n blocks)")
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 2 or any(s % patch_size for s in img_size):
            raise ValueError(f"img_size={img_size} must be (H, W) divisible by "
                             f"patch_size={patch_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_registers = num_registers
        self.mask_rate = mask_rate
        self.head_type = head
        self.class_blocks = class_blocks
        self.grad_checkpointing = grad_checkpointing
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = (ConvStemPatchEmbed(in_chans, embed_dim, patch_size,
                                               stem_convs_per_stage)
                            if stem == "conv" else LinearPatchEmbed(in_chans, embed_dim, patch_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, gates, gate_temperature,
                  attention_kernel)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if head == "joint":
            self.head = nn.Linear(num_classes * embed_dim, num_classes)
        else:
            self.head_weight = nn.Parameter(torch.zeros(num_classes, embed_dim))
            self.head_bias = nn.Parameter(torch.zeros(num_classes))
        self.patch_head = nn.Linear(embed_dim, num_classes) if patch_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.head_type == "per_token":
            nn.init.trunc_normal_(self.head_weight, std=0.02)

    @staticmethod
    def upgrade_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with the key names of checkpoints written before attnmaps took timm's
        names (``cls_tokens`` -> ``cls_token``, ``reg_tokens`` -> ``reg_token``, ``mlp.0`` /
        ``mlp.2`` -> ``mlp.fc1`` / ``mlp.fc2``); current names pass unchanged."""
        return {_LEGACY_KEY.sub(lambda m: _LEGACY_NAMES[m[0]], key): value
                for key, value in state.items()}

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (tokens and position embeddings)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images [B, {self.in_chans}, H, W] (model.in_chans={self.in_chans}), "
                f"got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input size {h}x{w} is not divisible by patch_size={self.patch_size}; resize or "
                f"pad to a multiple, e.g. {math.ceil(h / self.patch_size) * self.patch_size}x"
                f"{math.ceil(w / self.patch_size) * self.patch_size}"
            )

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        return resample_pos_embed(self.pos_embed, self.grid, grid)

    def token_mask(self, labels: Tensor) -> Tensor:
        """Random keep-mask [B, K] for the class tokens: absent classes dropped with
        probability ``mask_rate``."""
        drop = (labels <= 0) & (torch.rand_like(labels, dtype=torch.float32) < self.mask_rate)
        return ~drop

    def resolve_attn_blocks(self, spec: str | Sequence[int]) -> list[int]:
        """Indices of the blocks ``spec`` names (see :func:`parse_attn_blocks`); in
        class-attention mode only class-attention blocks can be named."""
        return parse_attn_blocks(spec, len(self.blocks), self.class_blocks)

    def _run_block(self, block: Block, x: Tensor, num_query_rows: int,
                   num_queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, num_query_rows, num_queries, use_reentrant=False)
        return block(x, num_query_rows, num_queries)

    def forward_features(self, x: Tensor, labels: Tensor | None = None,
                         attn_blocks: str | Sequence[int] = (),
                         patch_outputs: bool = True,
                         patch_blocks: Sequence[int] = (),
                         patch_dropout: float = 0.0) -> dict[str, Tensor | list[Tensor]]:
        """Run the encoder.

        Returns a dict with ``cls`` [B,K,D], ``reg`` [B,R,D], ``patch`` [B,N,D] (final-norm
        outputs), ``grid`` (h, w), and ``attn``: for each block in ``attn_blocks`` (a spec or
        indices, see :meth:`resolve_attn_blocks`) the class-token attention rows over all tokens
        [B,heads,K,K+N+R], in block order. In training with ``labels``, the ``cls`` outputs of
        randomly chosen absent classes are zeroed.

        ``patch_outputs=False`` leaves out ``patch`` and ``reg``: nothing after the last block
        reads them, so that block updates the class tokens only (their queries still attend to
        every token). ``cls`` and ``attn`` are the same, for a fraction of the last block's cost.

        ``blocks`` holds the patch tokens [B,N,D] after each block index in ``patch_blocks``
        (before the final norm; with ``patch_outputs``), in block order: the features a
        segmentation decoder reads.

        ``patch_dropout`` > 0 (training only, see :func:`drop_patches`) keeps a random subset of
        the patch tokens of each image; ``patch`` and ``blocks`` then hold the kept tokens,
        ``kept`` [B,M] their indices, and the attention rows cover only them (no maps).
        """
        self._check_input(x)
        wanted = set(self.resolve_attn_blocks(attn_blocks)) if attn_blocks else set()
        feats = self.patch_embed(x)
        grid = (feats.shape[-2], feats.shape[-1])
        patches = feats.flatten(2).transpose(1, 2) + self._pos_embed(grid)
        kept_index = None
        if self.training and patch_dropout > 0:
            patches, kept_index = drop_patches(patches, patch_dropout)
        batch, k = x.shape[0], self.num_classes
        cls = self.cls_token.expand(batch, -1, -1)
        seq = torch.cat([patches, self.reg_token.expand(batch, -1, -1)], dim=1)
        if not self.class_blocks:
            seq = torch.cat([cls, seq], dim=1)
        depth = len(self.blocks)
        first = depth - self.class_blocks
        attn: list[Tensor] = []
        kept: list[Tensor] = []
        n, offset = patches.shape[1], 0 if self.class_blocks else k
        for i, block in enumerate(self.blocks):
            rows_k = k if i in wanted else 0
            if i >= first:
                cls, rows = self._run_block(block, torch.cat([cls, seq], dim=1), rows_k, k)
            elif i == depth - 1 and not patch_outputs:
                cls, rows = self._run_block(block, seq, rows_k, k)
            else:
                seq, rows = self._run_block(block, seq, rows_k)
            if rows is not None:
                attn.append(rows)
            if i in patch_blocks:
                kept.append(seq[:, offset:offset + n])
        extra = {} if kept_index is None else {"kept": kept_index}
        if not patch_outputs:
            return {"cls": self._masked(self.norm(cls), labels), "grid": grid, "attn": attn,
                    "blocks": kept, **extra}
        tokens = self.norm(torch.cat([cls, seq], dim=1) if self.class_blocks else seq)
        return {"cls": self._masked(tokens[:, :k], labels), "patch": tokens[:, k:k + n],
                "reg": tokens[:, k + n:], "grid": grid, "attn": attn, "blocks": kept, **extra}

    def _masked(self, cls: Tensor, labels: Tensor | None) -> Tensor:
        """``cls`` with the outputs of randomly chosen absent classes zeroed (training only)."""
        if self.training and labels is not None and self.mask_rate > 0:
            return cls * self.token_mask(labels).unsqueeze(-1).to(cls.dtype)
        return cls

    def forward_head(self, cls: Tensor) -> Tensor:
        """Class logits [B,K] from the class-token outputs [B,K,D]."""
        if self.head_type == "joint":
            return self.head(cls.flatten(1))
        return (cls * self.head_weight).sum(-1) + self.head_bias

    def patch_logits(self, patch: Tensor) -> Tensor:
        """Logits [B,K] of the auxiliary patch head: the highest score of each class over the
        final patch tokens ``patch`` [B,N,D] (global max pooling of a patch-level classifier)."""
        return self.patch_head_scores(patch).amax(dim=1)

    def attention_pooled_logits(self, patch: Tensor, maps: Tensor) -> Tensor:
        """Logits [B,K]: the patch head's class-``c`` scores of the patch tokens ``patch``
        [B,N,D] averaged with the weights of class ``c``'s attention map ``maps`` [B,K,h,w]
        (h*w = N; each map normalised to sum 1 over the patches)."""
        scores = self.patch_head_scores(patch).transpose(1, 2)
        weights = maps.flatten(2)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return (weights.to(scores.dtype) * scores).sum(-1)

    def patch_head_scores(self, patch: Tensor) -> Tensor:
        """Class scores [B,N,K] of the auxiliary patch head for every patch token."""
        if self.patch_head is None:
            raise ValueError("this model has no patch head; build it with patch_head=True "
                             "(config model.patch_head=true)")
        return self.patch_head(patch)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x, labels, patch_outputs=False)["cls"])

    def class_maps(self, attn: Sequence[Tensor], attn_blocks: str | Sequence[int],
                   grid: tuple[int, int]) -> Tensor:
        """Average class-to-patch attention [B,K,h,w] over open heads and the given blocks
        (:meth:`class_patch_attention` on the ``h * w`` patches of ``grid``)."""
        return self.class_patch_attention(attn, attn_blocks).reshape(-1, self.num_classes, *grid)

    def class_patch_attention(self, attn: Sequence[Tensor],
                              attn_blocks: str | Sequence[int]) -> Tensor:
        """Average class-to-patch attention [B,K,N] over open heads and the given blocks, for
        the N patch tokens the rows ``attn`` [B,heads,K,K+N+R] cover (all of them, or those a
        patch dropout kept).

        A head counts as open when its deterministic gate is > 0; a block whose heads are all
        closed falls back to the mean over all its heads.
        """
        k, r = self.num_classes, self.num_registers
        indices = self.resolve_attn_blocks(attn_blocks)
        if len(attn) != len(indices):
            raise ValueError(f"class_maps got attention rows of {len(attn)} blocks for "
                             f"attn_blocks={attn_blocks!r} ({len(indices)} blocks); pass the "
                             "attn_blocks the forward pass was run with")
        maps = []
        for rows, index in zip(attn, indices):
            patch_rows = rows[..., k:rows.shape[-1] - r]
            open_heads = (self.blocks[index].attn.head_weights() > 0).to(patch_rows.dtype)
            if open_heads.sum() == 0:
                open_heads = torch.ones_like(open_heads)
            weights = open_heads / open_heads.sum()
            maps.append(torch.einsum("bhkn,h->bkn", patch_rows, weights))
        return torch.stack(maps).mean(0)

    def predict(self, x: Tensor, attn_blocks: str | Sequence[int] = "last",
                labels: Tensor | None = None, fused: bool = False) -> tuple[Tensor, Tensor]:
        """Logits [B,K] and class attention maps [B,K,h,w] of ``attn_blocks`` from one forward
        pass, both in the autograd graph when gradients are enabled (so a loss on the maps
        trains the model). In training mode ``labels`` [B,K] enables class-token masking.

        ``fused``: each class's map times the sigmoid of the patch head's score of that class
        at each patch (:meth:`fused_maps`; needs the patch head)."""
        blocks = self.resolve_attn_blocks(attn_blocks)
        out = self.forward_features(x, labels, attn_blocks=blocks, patch_outputs=fused)
        maps = self.class_maps(out["attn"], blocks, out["grid"])
        if fused:
            maps = self.fused_maps(maps, out["patch"])
        return self.forward_head(out["cls"]), maps

    def fused_maps(self, maps: Tensor, patch: Tensor) -> Tensor:
        """Class maps [B,K,h,w] weighted patch by patch by ``sigmoid`` of the patch head's class
        scores of the final patch tokens ``patch`` [B,N,D] (N = h*w): attention that also
        needs the patch itself to look like the class, as MCTformer-V2 fuses class-token
        attention with patch-token CAMs."""
        scores = self.patch_head_scores(patch).transpose(1, 2).reshape(maps.shape)
        return maps * scores.sigmoid().to(maps.dtype)

    def gate_values(self) -> Tensor:
        """Deterministic gate values [depth, heads]."""
        return torch.stack([block.attn.head_weights() for block in self.blocks])

    def l0_penalty(self) -> Tensor:
        """Sum over all gated heads of P(gate != 0); zero when gates are off."""
        terms = [b.attn.gate.l0_penalty() for b in self.blocks if b.attn.gate is not None]
        return torch.stack(terms).sum() if terms else self.cls_token.new_zeros(())
