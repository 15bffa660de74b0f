"""Host templates and user factories: shapes, slot sites, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import InvalidArgumentError
from services.trainer.models import DataShape, build_model, slot_sites
from services.trainer.spec import ModelSpec, parse_job_spec
from services.trainer.surgery import insert_slot

CASES = [
    ("mlp", {}, DataShape((64,), 10)),
    ("cnn", {}, DataShape((1, 8, 8), 10)),
    ("cnn", {}, DataShape((40,), 10)),  # a flat signal: a 1-D CNN over one channel
    ("resnet", {"width": 8}, DataShape((3, 8, 8), 5)),
    ("resnet", {"width": 8}, DataShape((1, 40), 10)),
    ("transformer", {"patch": 8}, DataShape((40,), 10)),
]


@pytest.mark.parametrize(("template", "params", "shape"), CASES)
def test_templates_map_a_batch_to_logits_and_offer_slot_sites(
    template: str, params: dict[str, object], shape: DataShape
) -> None:
    model = build_model(ModelSpec(template=template, params=params), shape)
    x = torch.randn(3, *shape.input_shape)
    assert model(x).shape == (3, shape.num_outputs)
    sites = slot_sites(model)
    assert sites
    for site in sites:  # every suggested site takes a slot
        insert_slot(model, site, x)
    assert model(x).shape == (3, shape.num_outputs)


def test_a_user_factory_is_imported_and_called_with_the_params() -> None:
    spec = ModelSpec(
        factory="tests.unit.trainer.fault_injection:memory_hungry", params={"limit": 3}
    )
    model = build_model(spec)
    assert isinstance(model, nn.Module) and getattr(model, "limit", None) == 3


@pytest.mark.parametrize(
    ("spec", "field", "hint"),
    [
        (ModelSpec(template="vgg"), "model.template", "built-in templates"),
        (
            ModelSpec(template="mlp", params={"hidden": [0]}),
            "model.params.hidden.0",
            "greater than 0",
        ),
        (ModelSpec(template="transformer", params={"patch": 7}), "model.params.patch", "divide"),
        (ModelSpec(factory="no_such_package.nets:make"), "model.factory", "install the package"),
        (
            ModelSpec(factory="tests.unit.trainer.fault_injection:nope"),
            "model.factory",
            "no attribute",
        ),
        (
            ModelSpec(factory="tests.unit.trainer.fault_injection"),
            "model.factory",
            "package.module:name",
        ),
        (
            ModelSpec(
                factory="tests.unit.trainer.fault_injection:memory_hungry", params={"size": 3}
            ),
            "model.params",
            "signature",
        ),
        (
            ModelSpec(factory="tests.unit.trainer.fault_injection:math"),
            "model.factory",
            "not callable",
        ),
    ],
)
def test_bad_models_name_the_field_and_the_fix(spec: ModelSpec, field: str, hint: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        build_model(spec, DataShape((40,), 10))
    assert caught.value.field == field
    assert hint in str(caught.value)


def test_a_job_spec_needs_exactly_one_model_source_and_a_limit() -> None:
    with pytest.raises(InvalidArgumentError, match="exactly one of template"):
        parse_job_spec({"model": {}, "data": {"dataset": "digits"}, "max_steps": 1})
    with pytest.raises(InvalidArgumentError, match="epochs or max_steps"):
        parse_job_spec({"model": {"template": "mlp"}, "data": {"dataset": "digits"}})
    with pytest.raises(InvalidArgumentError) as caught:
        parse_job_spec(
            {
                "model": {"template": "mlp"},
                "data": {"dataset": "digits"},
                "max_steps": 1,
                "growth": {"blend_steps": -1},
            }
        )
    assert caught.value.field == "growth.blend_steps"
