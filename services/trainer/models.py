"""Host models: the built-in templates and user factories, built from a `ModelSpec`.

Templates (params validated, unknown keys refused; shape params left out are
taken from the data):

- `mlp`: `in_features`, `out_features`, `hidden` [(64, 64)], `activation`
  ["relu"], `dropout` [0]. Slot sites: `blocks.<i>.fc` (linear).
- `cnn`: `in_channels`, `out_features`, `dims` (1 or 2), `channels` [(16, 32)],
  `kernel_size` [3], `batch_norm` [true], `dropout` [0]. Each block is
  conv-BN-ReLU-maxpool; global average pooling, then a linear head. Slot
  sites: `blocks.<i>.conv` (conv2d; over (C, 1, L) when `dims` is 1).
- `resnet`: `in_channels`, `out_features`, `dims`, `width` [16], `stages`
  [(1, 1)] (basic blocks per stage; width doubles and resolution halves from
  one stage to the next). Slot sites: `stages.<s>.<b>` (block outputs).
- `transformer`: a pre-norm encoder over patches of a flat input:
  `in_features`, `out_features`, `patch` [4], `d_model` [32], `heads` [2],
  `layers` [2], `mlp_ratio` [2], `dropout` [0]. Slot sites:
  `blocks.<i>.mlp.fc2` (linear over d_model).

Every template module has `slot_sites`, the module paths where a slot makes
sense, used when a job names no slots. A `factory` (`package.module:callable`)
is imported and called with the params as keyword arguments; it must return an
`nn.Module` taking one tensor.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from common.errors import InvalidArgumentError
from services.trainer.spec import ModelSpec, invalid_argument

__all__ = [
    "TEMPLATES",
    "CNNParams",
    "DataShape",
    "MLPParams",
    "ResNetParams",
    "TransformerParams",
    "build_model",
    "load_factory",
    "slot_sites",
]

PosInt = Annotated[int, Field(gt=0)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


@dataclass(frozen=True)
class DataShape:
    """What a host needs to know about the data: one sample's shape and the output width."""

    input_shape: tuple[int, ...]
    num_outputs: int


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


# --- mlp -------------------------------------------------------------------------------------


class MLPParams(_Params):
    in_features: PosInt
    out_features: PosInt
    hidden: tuple[PosInt, ...] = (64, 64)
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    dropout: Dropout = 0.0


class _MLPBlock(nn.Module):
    def __init__(self, fan_in: int, width: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(fan_in, width)
        self.act = _ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop(self.act(self.fc(x)))  # (B, width)
        return out


class MLP(nn.Module):
    """Flatten, hidden blocks (Linear, activation, dropout), linear head."""

    def __init__(self, p: MLPParams) -> None:
        super().__init__()
        widths = (p.in_features, *p.hidden)
        self.blocks = nn.ModuleList(
            _MLPBlock(widths[i], widths[i + 1], p.activation, p.dropout)
            for i in range(len(p.hidden))
        )
        self.head = nn.Linear(widths[-1], p.out_features)
        self.slot_sites = tuple(f"blocks.{i}.fc" for i in range(len(p.hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, F)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(x)  # (B, out)
        return out


# --- cnn -------------------------------------------------------------------------------------


class CNNParams(_Params):
    in_channels: PosInt
    out_features: PosInt
    dims: Literal[1, 2] = 2
    channels: tuple[PosInt, ...] = (16, 32)
    kernel_size: PosInt = 3
    batch_norm: bool = True
    dropout: Dropout = 0.0


def _conv(dims: int, cin: int, cout: int, k: int, stride: int = 1) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _norm(dims: int, c: int) -> nn.Module:
    return nn.BatchNorm1d(c) if dims == 1 else nn.BatchNorm2d(c)


class _ConvBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, p: CNNParams) -> None:
        super().__init__()
        self.conv = _conv(dims, cin, cout, p.kernel_size)
        self.norm = _norm(dims, cout) if p.batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.pool = (
            nn.MaxPool1d(2, ceil_mode=True) if dims == 1 else nn.MaxPool2d(2, ceil_mode=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pool(self.act(self.norm(self.conv(x))))  # (B, C, *spatial/2)
        return out


def _as_channels_first(x: torch.Tensor, dims: int, in_channels: int) -> torch.Tensor:
    # Flat samples (B, L) of a one-channel signal become (B, 1, L).
    if x.dim() == dims + 1 and in_channels == 1:
        return x.unsqueeze(1)
    return x


class CNN(nn.Module):
    """Conv blocks (conv, BN, ReLU, maxpool), global average pooling, linear head."""

    def __init__(self, p: CNNParams) -> None:
        super().__init__()
        self.dims = p.dims
        self.in_channels = p.in_channels
        widths = (p.in_channels, *p.channels)
        self.blocks = nn.ModuleList(
            _ConvBlock(p.dims, widths[i], widths[i + 1], p) for i in range(len(p.channels))
        )
        self.drop = nn.Dropout(p.dropout) if p.dropout > 0 else nn.Identity()
        self.head = nn.Linear(widths[-1], p.out_features)
        self.slot_sites = tuple(f"blocks.{i}.conv" for i in range(len(p.channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_channels_first(x, self.dims, self.in_channels)  # (B, C, *spatial)
        for block in self.blocks:
            x = block(x)
        x = x.flatten(2).mean(-1)  # (B, C)
        out: torch.Tensor = self.head(self.drop(x))
        return out


# --- resnet ----------------------------------------------------------------------------------


class ResNetParams(_Params):
    in_channels: PosInt
    out_features: PosInt
    dims: Literal[1, 2] = 2
    width: PosInt = 16
    stages: tuple[PosInt, ...] = (1, 1)


class _BasicBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(dims, cin, cout, 3, stride)
        self.bn1 = _norm(dims, cout)
        self.conv2 = _conv(dims, cout, cout, 3)
        self.bn2 = _norm(dims, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(dims, cin, cout, 1, stride), _norm(dims, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))  # (B, cout, *spatial)


class ResNet(nn.Module):
    """Stem, stages of basic residual blocks, global average pooling, linear head."""

    def __init__(self, p: ResNetParams) -> None:
        super().__init__()
        self.dims = p.dims
        self.in_channels = p.in_channels
        self.stem = nn.Sequential(_conv(p.dims, p.in_channels, p.width, 3), _norm(p.dims, p.width))
        stages: list[nn.Module] = []
        sites: list[str] = []
        width = p.width
        for s, count in enumerate(p.stages):
            out = p.width * 2**s
            blocks = []
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(_BasicBlock(p.dims, width, out, stride))
                width = out
                sites.append(f"stages.{s}.{b}")
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(width, p.out_features)
        self.slot_sites = tuple(sites)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(_as_channels_first(x, self.dims, self.in_channels)))
        for stage in self.stages:
            x = stage(x)
        out: torch.Tensor = self.head(x.flatten(2).mean(-1))
        return out


# --- transformer -----------------------------------------------------------------------------


class TransformerParams(_Params):
    in_features: PosInt
    out_features: PosInt
    patch: PosInt = 4
    d_model: PosInt = 32
    heads: PosInt = 2
    layers: PosInt = 2
    mlp_ratio: PosInt = 2
    dropout: Dropout = 0.0


class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D/H)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return out


class _FeedForward(nn.Module):
    def __init__(self, d: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d * ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d * ratio, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.act(self.fc1(x)))
        return out


class _EncoderBlock(nn.Module):
    def __init__(self, p: TransformerParams) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(p.d_model)
        self.attn = _SelfAttention(p.d_model, p.heads, p.dropout)
        self.ln2 = nn.LayerNorm(p.d_model)
        self.mlp = _FeedForward(p.d_model, p.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))  # (B, T, D)
        return out


class Transformer(nn.Module):
    """Patch embedding of a flat input, learned positions, pre-norm encoder, mean-pool head."""

    def __init__(self, p: TransformerParams) -> None:
        super().__init__()
        self.patch = p.patch
        tokens = p.in_features // p.patch
        self.embed = nn.Linear(p.patch, p.d_model)
        self.pos = nn.Parameter(torch.zeros(1, tokens, p.d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_EncoderBlock(p) for _ in range(p.layers))
        self.norm = nn.LayerNorm(p.d_model)
        self.head = nn.Linear(p.d_model, p.out_features)
        self.slot_sites = tuple(f"blocks.{i}.mlp.fc2" for i in range(p.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.embed(x.view(x.shape[0], -1, self.patch)) + self.pos  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.norm(x).mean(1))  # (B, out)
        return out


def _check_transformer(p: TransformerParams) -> None:
    if p.in_features % p.patch:
        raise InvalidArgumentError(
            f"patch {p.patch} must divide in_features {p.in_features}", field="model.params.patch"
        )
    if p.d_model % p.heads:
        raise InvalidArgumentError(
            f"heads {p.heads} must divide d_model {p.d_model}", field="model.params.heads"
        )


# --- building --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    params: type[_Params]
    build: Callable[[Any], nn.Module]
    defaults: Callable[[DataShape], dict[str, Any]]


def _flat_defaults(shape: DataShape) -> dict[str, Any]:
    return {"in_features": math.prod(shape.input_shape), "out_features": shape.num_outputs}


def _conv_defaults(shape: DataShape) -> dict[str, Any]:
    if len(shape.input_shape) == 1:  # a flat signal: one channel
        return {"in_channels": 1, "dims": 1, "out_features": shape.num_outputs}
    dims = min(2, len(shape.input_shape) - 1)
    return {"in_channels": shape.input_shape[0], "dims": dims, "out_features": shape.num_outputs}


def _build_transformer(p: TransformerParams) -> nn.Module:
    _check_transformer(p)
    return Transformer(p)


TEMPLATES: Mapping[str, _Template] = {
    "mlp": _Template(MLPParams, MLP, _flat_defaults),
    "cnn": _Template(CNNParams, CNN, _conv_defaults),
    "resnet": _Template(ResNetParams, ResNet, _conv_defaults),
    "transformer": _Template(TransformerParams, _build_transformer, _flat_defaults),
}
"""Built-in host templates by name."""


def build_model(spec: ModelSpec, shape: DataShape | None = None) -> nn.Module:
    """The host `spec` names, its shape params filled from `shape` where not given.

    Raises `InvalidArgumentError` (field `model.template`, `model.params.<name>`
    or `model.factory`) with what to change.
    """
    if spec.factory is not None:
        factory = load_factory(spec.factory, field="model.factory")
        try:
            model = factory(**spec.params)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"model factory {spec.factory!r} rejected its params: {exc}; "
                "check model.params against the factory's signature",
                field="model.params",
            ) from exc
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model factory {spec.factory!r} returned {type(model).__name__}, "
                "not a torch.nn.Module; return the model instance",
                field="model.factory",
            )
        return model
    assert spec.template is not None
    template = TEMPLATES.get(spec.template)
    if template is None:
        raise InvalidArgumentError(
            f"unknown template {spec.template!r}; built-in templates: {', '.join(TEMPLATES)} "
            "(or give a factory 'package.module:callable')",
            field="model.template",
        )
    params = dict(template.defaults(shape)) if shape is not None else {}
    params.update(spec.params)
    try:
        parsed = template.params.model_validate(params)
    except ValidationError as exc:
        raise invalid_argument(exc, "model.params") from None
    return template.build(parsed)


def load_factory(reference: str, *, field: str) -> Callable[..., Any]:
    """Import `package.module:name` and return the callable; errors say what to fix."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgumentError(
            f"{reference!r} is not 'package.module:name'; write e.g. 'my_models.nets:make_net'",
            field=field,
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(
            f"cannot import {module_name!r} ({exc}); install the package that provides it in "
            "the trainer's environment or fix the module path",
            field=field,
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgumentError(
                f"module {module_name!r} has no attribute {attr!r}; check the name after ':'",
                field=field,
            ) from None
    if not callable(target):
        raise InvalidArgumentError(f"{reference!r} is not callable", field=field)
    result: Callable[..., Any] = target
    return result


def slot_sites(model: nn.Module) -> Sequence[str]:
    """The module paths where a template suggests slots (empty for a factory model without them)."""
    sites = getattr(model, "slot_sites", ())
    return tuple(str(s) for s in sites)
