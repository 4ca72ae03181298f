"""The data engine's settings (``EngineSettings``, a pydantic model): the schema Prefect builds a
deployment's form from, the errors bad values get from pydantic, from Prefect's parameter
validation and from ``maskmill run``, and ``prefect.yaml``'s parameters. No Prefect server and no
Ray: nothing here runs a flow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from maskmill.engine.run import EngineSettings
from maskmill.flows import data_engine as engine_flows
from maskmill.flows.cli import build_parser, main
from maskmill.flows.cli_engine import settings_values

REPO = Path(__file__).resolve().parents[1]
# The defaults of the settings (those of ``maskmill run`` with no options).
DEFAULTS = {
    "store": "out/engine/store",
    "images": None,
    "annotations": None,
    "checkpoint": None,
    "manual_rounds": 2,
    "semi_rounds": 1,
    "auto": True,
    "seed": 0,
    "workers": 2,
    "ray_address": None,
    "holdout": 0.25,
    "scenes": 14,
    "scene_size": 256,
    "retrain_steps": None,
    "include_auto": False,
    "accept_iou": 0.9,
    "max_clicks": 20,
    "points_per_side": 16,
    "prefill_concepts": [],
    "clip_model": None,
    "clip_weights": None,
    "progress": True,
    "embedding_cache": True,
    "encoder_precision": "fp32",
    "generator_options": {},
}
# The JSON-schema limits each field carries into the form (fields without limits: {}).
LIMIT_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength")
LIMITS = {
    "store": {"minLength": 1},
    "manual_rounds": {"minimum": 0},
    "semi_rounds": {"minimum": 0},
    "seed": {"minimum": 0},
    "workers": {"minimum": 1},
    "holdout": {"minimum": 0.0, "exclusiveMaximum": 1.0},
    "scenes": {"minimum": 1},
    "scene_size": {"minimum": 16},
    "accept_iou": {"exclusiveMinimum": 0.0, "maximum": 1.0},
    "max_clicks": {"minimum": 1},
    "points_per_side": {"minimum": 1},
}
GROUND_TRUTH_RULE = "manual and semi rounds need ground truth for the simulated annotator"


def test_defaults_are_the_runs_defaults():
    assert EngineSettings().model_dump() == DEFAULTS


def test_the_flows_parameter_schema_shows_every_field_with_its_description_and_limits():
    schema = parameter_schema(engine_flows.data_engine).model_dump_for_openapi()
    assert list(schema["properties"]) == ["settings"]  # one parameter, no `options` dict
    settings = schema["properties"]["settings"]
    assert settings["$ref"] == "#/definitions/EngineSettings"
    assert settings["default"] == DEFAULTS  # the form starts from the defaults
    assert "settings" not in schema.get("required", [])

    definition = schema["definitions"]["EngineSettings"]
    assert definition["additionalProperties"] is False
    properties = definition["properties"]
    assert list(properties) == list(DEFAULTS)
    for name, field in EngineSettings.model_fields.items():
        assert field.description and len(field.description) > 20, name
        assert properties[name]["description"] == field.description
        assert properties[name]["default"] == DEFAULTS[name]
    limits = {
        name: {key: value for key, value in prop.items() if key in LIMIT_KEYS}
        for name, prop in properties.items()
    }
    assert limits == {name: LIMITS.get(name, {}) for name in DEFAULTS}


@pytest.mark.parametrize("flow_name", ["annotate_round", "retrain"])
def test_the_sub_flows_take_the_same_settings(flow_name):
    schema = parameter_schema(getattr(engine_flows, flow_name)).model_dump_for_openapi()
    assert list(schema["properties"]) == ["settings", "round_"]
    assert schema["properties"]["settings"]["$ref"] == "#/definitions/EngineSettings"
    assert schema["properties"]["round_"]["type"] == "integer"
    assert sorted(schema["required"]) == ["round_", "settings"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("workers", 0, "greater than or equal to 1"),
        ("holdout", 2, "less than 1"),
        ("holdout", -0.1, "greater than or equal to 0"),
        ("accept_iou", 0.0, "greater than 0"),
        ("accept_iou", 1.5, "less than or equal to 1"),
        ("manual_rounds", -1, "greater than or equal to 0"),
        ("scene_size", 8, "greater than or equal to 16"),
        ("points_per_side", 0, "greater than or equal to 1"),
        ("workers", "two", "valid integer"),
        ("wrokers", 3, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(field, value, message):
    with pytest.raises(ValidationError) as caught:
        EngineSettings.model_validate({field: value})
    assert [(e["loc"], message in e["msg"]) for e in caught.value.errors()] == [((field,), True)]
    # Prefect refuses the same value when the flow's parameters are validated (a deployment
    # run, or a call with a dict), naming the field under its parameter.
    with pytest.raises(ParameterTypeError, match=f"settings.{field}: .*{message}"):
        engine_flows.data_engine.validate_parameters({"settings": {field: value}})


def test_rules_between_fields():
    with pytest.raises(ValidationError, match="annotations needs images"):
        EngineSettings(annotations="instances.json")
    with pytest.raises(ValidationError, match=GROUND_TRUTH_RULE):
        EngineSettings(images="photos/", store="s")
    # A misspelled generator option is refused when the settings are read, not mid-run.
    with pytest.raises(ValidationError, match=r"\['pred_iou_thres'\] are not MaskGenerator"):
        EngineSettings(generator_options={"pred_iou_thres": 0.5})
    # a folder without ground truth is fine for the automatic pass alone
    alone = EngineSettings(images="photos/", manual_rounds=0, semi_rounds=0)
    assert (alone.images, alone.manual_rounds, alone.semi_rounds) == ("photos/", 0, 0)


def test_a_dict_of_some_fields_becomes_settings_with_the_rest_defaulted():
    validated = engine_flows.data_engine.validate_parameters(
        {"settings": {"workers": 3, "generator_options": {"pred_iou_thresh": 0.5}}}
    )
    settings = validated["settings"]
    assert isinstance(settings, EngineSettings)
    assert settings.model_dump() == {
        **DEFAULTS,
        "workers": 3,
        "generator_options": {"pred_iou_thresh": 0.5},
    }
    assert EngineSettings.model_validate(settings.model_dump()) == settings


def test_prefect_yaml_parameters_are_valid_flow_parameters():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    checked = {}
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        assert path == "flows/data_engine.py"
        if "parameters" in deployment:
            flow = getattr(engine_flows, name)
            checked[name] = flow.validate_parameters(deployment["parameters"])
    assert sorted(checked) == ["data_engine", "stats"]
    assert checked["data_engine"]["settings"] == EngineSettings(
        store="out/engine/store", manual_rounds=2, semi_rounds=1, seed=0, workers=2
    )


def test_maskmill_run_options_become_settings_with_the_models_defaults():
    args = build_parser().parse_args(
        ["run", "--workers", "3", "--no-auto", "--pred-iou-thresh", "0.5", "--quiet"]
    )
    values = settings_values(args)
    assert values == {
        "workers": 3,
        "auto": False,
        "generator_options": {"pred_iou_thresh": 0.5},
        "progress": False,
    }
    # options not given are left to the settings' defaults
    assert settings_values(build_parser().parse_args(["run"])) == {}


@pytest.mark.parametrize(
    "argv, lines",
    [
        (
            ["--workers", "0"],
            ["maskmill run: workers: Input should be greater than or equal to 1"],
        ),
        (
            ["--workers", "0", "--holdout", "2"],
            [
                "maskmill run: workers: Input should be greater than or equal to 1",
                "maskmill run: holdout: Input should be less than 1",
            ],
        ),
        (["--images", "photos/", "--store", "s"], [f"maskmill run: {GROUND_TRUTH_RULE}"]),
    ],
)
def test_maskmill_run_prints_one_line_per_problem_and_exits_2(argv, lines, capsys):
    """Each expected line is the start of the printed one (the rule's message goes on)."""
    assert main(["run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    printed = err.splitlines()
    assert len(printed) == len(lines), err
    assert all(line.startswith(start) for line, start in zip(printed, lines, strict=True)), err
