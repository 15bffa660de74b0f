"""The console's forms: read into job specs and compile requests, errors mapped to fields."""

from __future__ import annotations

from common.stubs import seed_selector_pb2
from services.console import forms


def test_the_default_job_form_is_a_growing_spec() -> None:
    spec, result = forms.job_spec(dict(forms.JOB_DEFAULTS))
    assert result.ok, result.errors
    assert spec is not None
    assert spec.model.template == "mlp"
    assert [s.module_path for s in spec.slots] == ["blocks.0.fc", "blocks.1.fc"]
    assert spec.growth.enabled
    assert spec.growth.strategy == seed_selector_pb2.SELECTION_STRATEGY_UCB1
    assert list(spec.growth.blueprints) == ["bottleneck_mlp"]
    assert spec.data.params["samples"] == 600
    assert spec.max_steps == 200


def test_unreadable_job_fields_are_reported_per_field_and_keep_the_values() -> None:
    values = {
        **forms.JOB_DEFAULTS,
        "max_steps": "lots",
        "lr": "fast",
        "model_params": "{not json",
        "data_params": "[1]",
        "strategy": "coin",
    }
    spec, result = forms.job_spec(values)
    assert spec is None
    assert set(result.errors) == {"max_steps", "lr", "model_params", "data_params", "strategy"}
    assert "not a whole number" in result.errors["max_steps"]
    assert result.values["max_steps"] == "lots"


def test_growth_off_leaves_the_growth_spec_out() -> None:
    spec, _ = forms.job_spec({**forms.JOB_DEFAULTS, "growth": ""})
    assert spec is not None
    assert not spec.HasField("growth")


def test_trainer_field_paths_map_to_the_form_fields() -> None:
    assert forms.job_field_for("spec.growth.blend_steps") == "blend_steps"
    assert forms.job_field_for("spec.growth.enabled") == "growth"
    assert forms.job_field_for("spec.model.params.hidden") == "model_params"
    assert forms.job_field_for("spec.model.template") == "template"
    assert forms.job_field_for("spec.data.dataset") == "dataset"
    assert forms.job_field_for("spec.slots[1].module_path") == "slots"
    assert forms.job_field_for("spec.nonsense") is None


def test_the_default_blueprint_form_is_a_compile_request() -> None:
    request, result = forms.compile_request(dict(forms.BLUEPRINT_DEFAULTS))
    assert result.ok, result.errors
    assert request is not None
    assert request.target.linear.in_features == 16
    assert [n.name for n in request.blueprint.ir.nodes] == ["down", "act", "up"]
    assert request.blueprint.ir.output == "up"


def test_blueprint_nodes_in_the_readme_form_are_accepted() -> None:
    nodes = '[{"id": "a", "op": "linear", "inputs": ["input"], "params": {"out_features": 4}}]'
    request, result = forms.compile_request(
        {
            "name": "x",
            "slot_kind": "conv2d",
            "features": "8",
            "height": "4",
            "width": "4",
            "nodes": nodes,
            "output": "a",
        }
    )
    assert result.ok, result.errors
    assert request is not None
    assert request.blueprint.ir.nodes[0].name == "a"
    assert request.blueprint.ir.nodes[0].attrs["out_features"] == 4
    assert request.target.conv2d.height == 4


def test_unreadable_blueprint_fields_are_reported_per_field() -> None:
    _, result = forms.compile_request({"slot_kind": "linear", "features": "0", "nodes": "{"})
    assert set(result.errors) == {"features", "nodes"}
    _, result = forms.compile_request({"slot_kind": "sphere", "nodes": "[1]"})
    assert set(result.errors) == {"slot_kind", "nodes"}


def test_compiler_field_paths_map_to_the_form_fields() -> None:
    assert forms.blueprint_field_for("blueprint.ir.nodes[0].attrs.out_features") == "nodes"
    assert forms.blueprint_field_for("blueprint.ir.name") == "name"
    assert forms.blueprint_field_for("blueprint.ir.output") == "output"
    assert forms.blueprint_field_for("target.linear.in_features") == "features"
    assert forms.blueprint_field_for("target.dtype") == "slot_kind"
