"""Named blueprints, sized to the slot they grow in.

Every catalogue blueprint outputs exactly zero when it is grafted (its last
projection, or the scale of its last norm, starts at zero) so the host computes
the same function as before; that last layer still gets a non-zero gradient at
init, so the seed learns from the first step. Hidden widths follow the slot and
are capped (about 1M weights per matrix), so large slots stay within the limits
where they can; a slot too large for a blueprint (attention over more positions
than the limit allows, say) is refused by the compiler with
`ResourceExhaustedError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from common.errors import InvalidArgumentError, NotFoundError
from services.compiler.blueprint import Blueprint, Conv2dSlot, LinearSlot, parse_blueprint

__all__ = ["CATALOGUE", "CatalogueEntry", "get_blueprint", "list_catalogue"]

_MATRIX_CAP = 1_000_000


@dataclass(frozen=True)
class CatalogueEntry:
    """A named blueprint family: what it does and which slot kinds it grows in."""

    name: str
    description: str
    slot_kinds: tuple[str, ...]
    nodes_for: Callable[[LinearSlot | Conv2dSlot], list[dict[str, Any]]] = field(
        repr=False, compare=False
    )
    """The node list sized for a slot (the last node is the output)."""

    def blueprint(self, slot: LinearSlot | Conv2dSlot) -> Blueprint:
        """This blueprint sized for `slot`; `InvalidArgumentError` for another slot kind."""
        if slot.kind not in self.slot_kinds:
            raise InvalidArgumentError(
                f"blueprint {self.name!r} grows in {' or '.join(self.slot_kinds)} slots, "
                f"not {slot.kind}",
                field="slot.kind",
            )
        nodes = self.nodes_for(slot)
        return parse_blueprint(
            {
                "name": self.name,
                "version": 1,
                "description": self.description,
                "slot": slot.model_dump(),
                "nodes": nodes,
                "output": nodes[-1]["id"],
            }
        )


def _n(node_id: str, op: str, inputs: str | list[str], **params: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "op": op,
        "params": params,
        "inputs": [inputs] if isinstance(inputs, str) else inputs,
    }


def _width(base: int, ratio: float, fan: int) -> int:
    """`ratio * base`, at least 1, capped so that a (fan x width) matrix stays near the cap."""
    return max(1, min(round(base * ratio), max(8, _MATRIX_CAP // max(1, fan))))


def _width_of(slot: LinearSlot | Conv2dSlot) -> int:
    return slot.features if isinstance(slot, LinearSlot) else slot.channels


def _residual_mlp(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    f = _width_of(slot)
    h = _width(f, 1.0, f)
    return [
        _n("fc1", "linear", "input", out_features=h),
        _n("act1", "relu", "fc1"),
        _n("fc2", "linear", "act1", out_features=h),
        _n("act2", "relu", "fc2"),
        _n("skip", "add", ["act1", "act2"]),
        _n("out", "linear", "skip", out_features=f, zero_init=True),
    ]


def _bottleneck_mlp(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    f = _width_of(slot)
    return [
        _n("down", "linear", "input", out_features=_width(f, 0.25, f)),
        _n("act", "gelu", "down"),
        _n("up", "linear", "act", out_features=f, zero_init=True),
    ]


def _low_rank_adapter(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    return [_n("adapter", "low_rank", "input", rank=min(8, _width_of(slot)), zero_init=True)]


def _gated_gelu_mlp(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    f = _width_of(slot)
    h = _width(f, 2.0, f)
    return [
        _n("gate", "linear", "input", out_features=h),
        _n("value", "linear", "input", out_features=h),
        _n("act", "gelu", "gate"),
        _n("gated", "mul", ["act", "value"]),
        _n("out", "linear", "gated", out_features=f, zero_init=True),
    ]


def _layer_norm_mlp(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    f = _width_of(slot)
    return [
        _n("norm", "layer_norm", "input"),
        _n("fc", "linear", "norm", out_features=_width(f, 2.0, f)),
        _n("act", "gelu", "fc"),
        _n("out", "linear", "act", out_features=f, zero_init=True),
    ]


def _attention_head(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    if isinstance(slot, LinearSlot):
        # The features split into about sqrt(F) tokens of about sqrt(F) features each.
        f = slot.features
        small = [d for d in range(1, math.isqrt(f) + 1) if f % d == 0]
        divisors = {*small, *(f // d for d in small)}
        tokens = min(sorted(divisors), key=lambda d: abs(d - math.sqrt(f)))
        head_dim = min(64, max(8, f // tokens))
        return [
            _n("norm", "layer_norm", "input"),
            _n(
                "attend", "attention_head", "norm", head_dim=head_dim, tokens=tokens, zero_init=True
            ),
        ]
    head_dim = min(64, max(8, slot.channels))
    return [
        _n("norm", "layer_norm", "input"),
        _n("attend", "attention_head", "norm", head_dim=head_dim, zero_init=True),
    ]


def _squeeze_excite(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    if isinstance(slot, LinearSlot):
        f = slot.features
        return [
            _n("fc", "linear", "input", out_features=_width(f, 1.0, f)),
            _n("act", "relu", "fc"),
            _n("gate", "squeeze_excite", "act", reduction=4),
            _n("out", "linear", "gate", out_features=f, zero_init=True),
        ]
    c = slot.channels
    return [
        _n(
            "conv",
            "conv2d",
            "input",
            out_channels=_width(c, 1.0, 9 * c),
            kernel_size=3,
            padding="same",
        ),
        _n("act", "relu", "conv"),
        _n("gate", "squeeze_excite", "act", reduction=4),
        _n("out", "conv2d", "gate", out_channels=c, kernel_size=1, zero_init=True),
    ]


def _conv3x3(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    c = _width_of(slot)
    h = _width(c, 1.0, 9 * c)
    return [
        _n("conv1", "conv2d", "input", out_channels=h, kernel_size=3, padding="same"),
        _n("act", "relu", "conv1"),
        _n("conv2", "conv2d", "act", out_channels=c, kernel_size=3, padding="same", zero_init=True),
    ]


def _depthwise_separable(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    c = _width_of(slot)
    return [
        _n("depthwise", "conv2d", "input", out_channels=c, kernel_size=3, padding="same", groups=c),
        _n("act", "relu", "depthwise"),
        _n("pointwise", "conv2d", "act", out_channels=c, kernel_size=1, zero_init=True),
    ]


def _conv_bottleneck(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    c = _width_of(slot)
    h = _width(c, 0.25, 9 * c)
    return [
        _n("reduce", "conv2d", "input", out_channels=h, kernel_size=1),
        _n("act1", "relu", "reduce"),
        _n("conv", "conv2d", "act1", out_channels=h, kernel_size=3, padding="same"),
        _n("act2", "relu", "conv"),
        _n("expand", "conv2d", "act2", out_channels=c, kernel_size=1, zero_init=True),
    ]


def _conv_residual_bn(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    c = _width_of(slot)
    h = _width(c, 1.0, 9 * c)
    return [
        _n("conv1", "conv2d", "input", out_channels=h, kernel_size=3, padding="same", bias=False),
        _n("bn1", "batch_norm", "conv1"),
        _n("act", "relu", "bn1"),
        _n("conv2", "conv2d", "act", out_channels=c, kernel_size=3, padding="same", bias=False),
        # Zero scale on the last norm (as in Goyal et al., 2017): the branch adds nothing
        # until it has learnt something.
        _n("bn2", "batch_norm", "conv2", zero_init=True),
    ]


def _inverted_bottleneck(slot: LinearSlot | Conv2dSlot) -> list[dict[str, Any]]:
    c = _width_of(slot)
    h = _width(c, 4.0, c)
    return [
        _n("expand", "conv2d", "input", out_channels=h, kernel_size=1),
        _n("act1", "silu", "expand"),
        _n("depthwise", "conv2d", "act1", out_channels=h, kernel_size=3, padding="same", groups=h),
        _n("act2", "silu", "depthwise"),
        _n("project", "conv2d", "act2", out_channels=c, kernel_size=1, zero_init=True),
    ]


_LIN = ("linear",)
_CONV = ("conv2d",)
_BOTH = ("linear", "conv2d")

_ENTRIES = (
    CatalogueEntry(
        "residual_mlp",
        "Two ReLU layers with an inner skip connection, then a zero-initialised projection.",
        _LIN,
        _residual_mlp,
    ),
    CatalogueEntry(
        "bottleneck_mlp",
        "Down-projection to a quarter of the width, GELU, zero-initialised up-projection.",
        _LIN,
        _bottleneck_mlp,
    ),
    CatalogueEntry(
        "low_rank_adapter",
        "LoRA-style adapter of rank min(8, width) (1x1 convolutions on images); up starts at zero.",
        _BOTH,
        _low_rank_adapter,
    ),
    CatalogueEntry(
        "gated_gelu_mlp",
        "GEGLU feed-forward: gelu(gate) * value at twice the width, zero-initialised output.",
        _LIN,
        _gated_gelu_mlp,
    ),
    CatalogueEntry(
        "layer_norm_mlp",
        "Pre-norm feed-forward: LayerNorm, 2x-wide GELU layer, zero-initialised output.",
        _LIN,
        _layer_norm_mlp,
    ),
    CatalogueEntry(
        "attention_head",
        "Pre-norm single-head self-attention: over the H*W positions of an image, or over "
        "about sqrt(F) tokens the features split into; zero-initialised output projection.",
        _BOTH,
        _attention_head,
    ),
    CatalogueEntry(
        "squeeze_excite",
        "A layer (3x3 convolution on images), ReLU, squeeze-and-excitation gate, "
        "zero-initialised projection.",
        _BOTH,
        _squeeze_excite,
    ),
    CatalogueEntry(
        "conv3x3",
        "Two 3x3 convolutions with a ReLU between; the second starts at zero.",
        _CONV,
        _conv3x3,
    ),
    CatalogueEntry(
        "depthwise_separable",
        "Depthwise 3x3 convolution, ReLU, zero-initialised pointwise 1x1 convolution.",
        _CONV,
        _depthwise_separable,
    ),
    CatalogueEntry(
        "conv_bottleneck",
        "ResNet bottleneck: 1x1 reduce to a quarter, 3x3, 1x1 expand starting at zero.",
        _CONV,
        _conv_bottleneck,
    ),
    CatalogueEntry(
        "conv_residual_bn",
        "ResNet basic block branch: conv-BN-ReLU-conv-BN, the last BN scale starting at zero.",
        _CONV,
        _conv_residual_bn,
    ),
    CatalogueEntry(
        "inverted_bottleneck",
        "MobileNetV2 block: 1x1 expand 4x, SiLU, depthwise 3x3, SiLU, 1x1 project from zero.",
        _CONV,
        _inverted_bottleneck,
    ),
)

CATALOGUE: Mapping[str, CatalogueEntry] = MappingProxyType({e.name: e for e in _ENTRIES})
"""Every catalogue blueprint family by name."""


def list_catalogue() -> list[CatalogueEntry]:
    """The catalogue entries, sorted by name."""
    return sorted(CATALOGUE.values(), key=lambda entry: entry.name)


def get_blueprint(name: str, slot: LinearSlot | Conv2dSlot) -> Blueprint:
    """The catalogue blueprint `name` sized for `slot`.

    Raises `NotFoundError` for an unknown name and `InvalidArgumentError`
    (field `slot.kind`) when the blueprint does not grow in that kind of slot.
    """
    entry = CATALOGUE.get(name)
    if entry is None:
        raise NotFoundError(
            f"no catalogue blueprint {name!r}; known: {', '.join(sorted(CATALOGUE))}"
        )
    return entry.blueprint(slot)
