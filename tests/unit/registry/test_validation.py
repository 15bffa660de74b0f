"""Names, aliases, file names, digests, metrics and tags: what is accepted, and the field named."""

from __future__ import annotations

import math

import pytest

from common.errors import InvalidArgumentError
from services.registry.validation import (
    check_alias,
    check_digest,
    check_file_name,
    check_metrics,
    check_model_name,
    check_tags,
)


@pytest.mark.parametrize("name", ["mnist", "MNIST-mlp_2", "7net", "a" * 128])
def test_model_names_of_letters_digits_dash_and_underscore_are_accepted(name: str) -> None:
    assert check_model_name(name, "name") == name


@pytest.mark.parametrize("name", ["", "-lead", "has.dot", "has space", "a*", "a>", "a" * 129, "é"])
def test_model_names_that_cannot_be_a_subject_token_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_model_name(name, "metadata.name")
    assert err.value.field == "metadata.name"


@pytest.mark.parametrize("alias", ["production", "canary", "a", "shadow-2", "ab_c"])
def test_lowercase_aliases_starting_with_a_letter_are_accepted(alias: str) -> None:
    assert check_alias(alias, "alias") == alias


@pytest.mark.parametrize("alias", ["", "Production", "2nd", "-x", "a.b", "x" * 65])
def test_other_aliases_are_refused_naming_the_field(alias: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_alias(alias, "metadata.aliases[0]")
    assert err.value.field == "metadata.aliases[0]"


@pytest.mark.parametrize("name", ["model.pt2", "manifest.json", ".hidden", "a b"])
def test_plain_file_names_are_accepted(name: str) -> None:
    assert check_file_name(name, "f") == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\\b", "nul\x00", "x" * 256])
def test_file_names_with_directories_or_dots_only_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_file_name(name, "metadata.files[2].name")
    assert err.value.field == "metadata.files[2].name"


def test_digests_are_64_lowercase_hex() -> None:
    assert check_digest("ab" * 32, "sha256") == "ab" * 32
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32, ""):
        with pytest.raises(InvalidArgumentError) as err:
            check_digest(bad, "metadata.files[0].sha256")
        assert err.value.field == "metadata.files[0].sha256"


def test_a_non_finite_metric_is_refused_with_its_key_in_the_path() -> None:
    assert check_metrics({"acc": 0.5, "loss": 1}, "metadata.metrics") == {"acc": 0.5, "loss": 1.0}
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidArgumentError) as err:
            check_metrics({"ok": 1.0, "val_loss": value}, "metadata.metrics")
        assert err.value.field == 'metadata.metrics["val_loss"]'


def test_empty_metric_names_and_tag_keys_are_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_metrics({"": 1.0}, "metadata.metrics")
    assert err.value.field == 'metadata.metrics[""]'
    with pytest.raises(InvalidArgumentError) as err:
        check_tags({"": "x"}, "tags")
    assert err.value.field == 'tags[""]'


def test_overlong_tag_values_are_refused() -> None:
    assert check_tags({"team": "vision"}, "tags") == {"team": "vision"}
    with pytest.raises(InvalidArgumentError) as err:
        check_tags({"team": "v" * 1025}, "metadata.tags")
    assert err.value.field == 'metadata.tags["team"]'
