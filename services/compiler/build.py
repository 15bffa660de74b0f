"""Blueprint IR -> `torch.nn.Module`, initialised deterministically from a seed.

Each node becomes one submodule of `BlueprintModule.nodes`, keyed by its id, so
parameter names read `nodes.<id>.weight`. Each node draws its initial weights
from its own generator, seeded from (seed, node id): the weights depend neither
on the order the nodes were listed in nor on the global RNG (compiles run in
worker threads).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from services.compiler.blueprint import (
    INPUT,
    AddNode,
    AttentionHeadNode,
    BatchNormNode,
    Blueprint,
    BlueprintAnalysis,
    Conv2dNode,
    GeluNode,
    LayerNormNode,
    LinearNode,
    LowRankNode,
    MulNode,
    Node,
    ReluNode,
    SiluNode,
    SqueezeExciteNode,
    analyse_blueprint,
    slot_shape,
)

__all__ = ["BlueprintModule", "build_module"]


class BlueprintModule(nn.Module):
    """The eager module of a blueprint: evaluates its nodes in topological order."""

    def __init__(
        self,
        nodes: Mapping[str, nn.Module],
        steps: tuple[tuple[str, tuple[str, ...]], ...],
        output: str,
    ) -> None:
        super().__init__()
        self.nodes = nn.ModuleDict(nodes)
        self._steps = steps
        self._output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {INPUT: x}
        for node_id, inputs in self._steps:
            values[node_id] = self.nodes[node_id](*(values[ref] for ref in inputs))
        return values[self._output]


def build_module(
    blueprint: Blueprint,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    analysis: BlueprintAnalysis | None = None,
) -> BlueprintModule:
    """The eager module of `blueprint`, same weights for the same (blueprint, seed).

    Weights are drawn on the CPU in float32 and then moved to `dtype` and
    `device`, so a seed gives the same starting point everywhere. `analysis`
    (from `analyse_blueprint`) saves checking the blueprint again.
    """
    analysis = analysis or analyse_blueprint(blueprint)
    by_id = {node.id: node for node in blueprint.nodes}
    shapes = {INPUT: slot_shape(blueprint.slot), **analysis.shapes}
    modules: dict[str, nn.Module] = {}
    for node_id in analysis.order:
        node = by_id[node_id]
        module = _make(node, shapes[node.inputs[0]])
        _initialise(module, _node_generator(seed, node_id), _zeroed(node))
        modules[node_id] = module
    steps = tuple((node_id, by_id[node_id].inputs) for node_id in analysis.order)
    built = BlueprintModule(modules, steps, blueprint.output)
    return built.to(dtype=dtype, device=device)


def _node_generator(seed: int, node_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{node_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _make(node: Node, shape: tuple[int, ...]) -> nn.Module:
    width = shape[0]
    image = len(shape) == 3
    if isinstance(node, LinearNode):
        prm = node.params
        return nn.Linear(width, prm.out_features, bias=prm.bias)
    if isinstance(node, Conv2dNode):
        c = node.params
        span = c.dilation * (c.kernel_size - 1)
        return nn.Conv2d(
            width,
            c.out_channels,
            c.kernel_size,
            stride=c.stride,
            padding=span // 2 if c.padding == "same" else c.padding,
            dilation=c.dilation,
            groups=c.groups,
            bias=c.bias,
        )
    if isinstance(node, BatchNormNode):
        b = node.params
        norm_cls = nn.BatchNorm2d if image else nn.BatchNorm1d
        return norm_cls(width, eps=b.eps, momentum=b.momentum, affine=b.affine)
    if isinstance(node, LayerNormNode):
        ln = node.params
        return _LayerNorm(width, eps=ln.eps, affine=ln.affine, channels_first=image)
    if isinstance(node, ReluNode):
        return nn.ReLU()
    if isinstance(node, GeluNode):
        return nn.GELU(approximate=node.params.approximate)
    if isinstance(node, SiluNode):
        return nn.SiLU()
    if isinstance(node, AddNode):
        return _Add()
    if isinstance(node, MulNode):
        return _Mul()
    if isinstance(node, SqueezeExciteNode):
        return _SqueezeExcite(width, max(1, width // node.params.reduction), image=image)
    if isinstance(node, AttentionHeadNode):
        a = node.params
        tokens = None if image else a.tokens
        dim = width if image else width // (tokens or 1)
        return _AttentionHead(dim, a.head_dim, tokens=tokens, bias=a.bias)
    if isinstance(node, LowRankNode):
        r = node.params
        return _LowRank(width, r.rank, r.out_features or width, r.scale, image=image)
    raise AssertionError(f"no module for op {node.op!r}")  # pragma: no cover


def _zeroed(node: Node) -> tuple[str, ...]:
    """The parameters that `zero_init` sets to zero: the node's last projection or scale."""
    if isinstance(node, LinearNode | Conv2dNode) and node.params.zero_init:
        return ("weight", "bias") if node.params.bias else ("weight",)
    if isinstance(node, BatchNormNode) and node.params.zero_init:
        return ("weight",)
    if isinstance(node, LayerNormNode) and node.params.zero_init:
        return ("norm.weight",)
    if isinstance(node, AttentionHeadNode) and node.params.zero_init:
        return ("proj.weight", "proj.bias") if node.params.bias else ("proj.weight",)
    if isinstance(node, LowRankNode) and node.params.zero_init:
        return ("up.weight",)
    return ()


def _initialise(module: nn.Module, generator: torch.Generator, zeroed: tuple[str, ...]) -> None:
    """PyTorch's default init (uniform +-1/sqrt(fan_in)) drawn from `generator`, then zeros."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Conv2d):
                bound = 1.0 / math.sqrt(sub.weight[0].numel())
                sub.weight.uniform_(-bound, bound, generator=generator)
                if sub.bias is not None:
                    sub.bias.uniform_(-bound, bound, generator=generator)
        params = dict(module.named_parameters())
        for name in zeroed:
            params[name].zero_()


class _LayerNorm(nn.Module):
    """LayerNorm over features, or over the channels of each position of an image."""

    def __init__(self, width: int, *, eps: float, affine: bool, channels_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=affine)
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            features: torch.Tensor = self.norm(x)  # (B, F)
            return features
        y: torch.Tensor = self.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        return y.permute(0, 3, 1, 2)  # (B, C, H, W)


class _Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


class _Mul(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        product = xs[0]
        for x in xs[1:]:
            product = product * x
        return product


class _SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(pool(x))))): a learnt gate per channel (or feature)."""

    def __init__(self, width: int, hidden: int, *, image: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3)) if self.image else x  # (B, C)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))  # (B, C)
        return x * (gate.unsqueeze(-1).unsqueeze(-1) if self.image else gate)


class _AttentionHead(nn.Module):
    """Single-head self-attention over tokens of `dim` features, projected to `head_dim`.

    Images: the tokens are the H*W positions. Features: (B, F) splits into
    `tokens` tokens of F/tokens features each.
    """

    def __init__(self, dim: int, head_dim: int, *, tokens: int | None, bias: bool) -> None:
        super().__init__()
        self.query = nn.Linear(dim, head_dim, bias=bias)
        self.key = nn.Linear(dim, head_dim, bias=bias)
        self.value = nn.Linear(dim, head_dim, bias=bias)
        self.proj = nn.Linear(head_dim, dim, bias=bias)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            seq = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        else:
            seq = x.reshape(x.shape[0], self.tokens, -1)  # (B, T, F/T)
        attended = F.scaled_dot_product_attention(
            self.query(seq), self.key(seq), self.value(seq)
        )  # (B, T, head_dim)
        out: torch.Tensor = self.proj(attended)  # (B, T, dim)
        if self.tokens is None:
            return out.transpose(1, 2).reshape(x.shape)  # (B, C, H, W)
        return out.flatten(1)  # (B, F)


class _LowRank(nn.Module):
    """scale * up(down(x)) through `rank` dimensions (1x1 convolutions on images)."""

    def __init__(self, width: int, rank: int, out: int, scale: float, *, image: bool) -> None:
        super().__init__()
        if image:
            self.down: nn.Module = nn.Conv2d(width, rank, 1, bias=False)
            self.up: nn.Module = nn.Conv2d(rank, out, 1, bias=False)
        else:
            self.down = nn.Linear(width, rank, bias=False)
            self.up = nn.Linear(rank, out, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.up(self.down(x))
        return y * self.scale if self.scale != 1.0 else y
