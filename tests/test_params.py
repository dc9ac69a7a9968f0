"""params.yaml validation: the committed file passes, and every kind of mistake names its key."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from kneexray import params as kparams
from kneexray.params import ParamsError, load, validate

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


def mutated(**changes) -> dict:
    """A deep copy of the committed params with `section__key=value` changes applied."""
    params = copy.deepcopy(COMMITTED)
    for dotted, value in changes.items():
        section, key = dotted.split("__", 1)
        params[section][key] = value
    return params


def test_committed_params_validate() -> None:
    checked = load(ROOT / "params.yaml")
    assert isinstance(checked, kparams.Params) and set(kparams.SECTIONS) == set(COMMITTED)
    for section, cls in kparams.SECTIONS.items():
        assert {f.name for f in dataclasses.fields(cls)} == set(COMMITTED[section]), section
    # spot-check that values come through unchanged
    assert checked.split.test_ratio == 0.2
    assert checked.resnet.image_size == 224
    assert checked.cnn.filters == (32, 64, 128, 256)
    assert checked.augment.brightness == (1.0, 1.0)
    assert checked.dataset.classes == ("normal", "osteopenia", "osteoporosis")


def test_validate_does_not_mutate_its_input() -> None:
    params = copy.deepcopy(COMMITTED)
    validate(params)
    assert params == COMMITTED


def test_unknown_section_is_named() -> None:
    params = copy.deepcopy(COMMITTED)
    params["trainning"] = {"seed": 1}
    with pytest.raises(ParamsError, match=r"^trainning: unknown section") as err:
        validate(params)
    assert "cnn" in str(err.value)  # lists what is allowed


def test_missing_section_is_named() -> None:
    params = copy.deepcopy(COMMITTED)
    del params["evaluate"]
    with pytest.raises(ParamsError, match=r"^evaluate: missing"):
        validate(params)


def test_typo_in_a_key_is_named_with_the_allowed_keys() -> None:
    params = copy.deepcopy(COMMITTED)
    params["cnn"]["learnig_rate"] = params["cnn"].pop("learning_rate")
    with pytest.raises(ParamsError, match=r"^cnn\.learnig_rate: unknown key") as err:
        validate(params)
    assert "learning_rate" in str(err.value)


def test_missing_key_is_named() -> None:
    params = copy.deepcopy(COMMITTED)
    del params["split"]["seed"]
    with pytest.raises(ParamsError, match=r"^split\.seed: missing"):
        validate(params)


@pytest.mark.parametrize(
    "key, value",
    [
        ("cnn__epochs", "30"),  # a string where an integer belongs
        ("cnn__epochs", True),  # bool is an int subclass in Python: must still be refused
        ("cnn__epochs", 3.0),  # a float is not an integer
        ("image__batch_size", None),
        ("cnn__learning_rate", "1e-3"),  # YAML reads 1e-3 without a dot as a string
    ],
)
def test_wrong_type_is_named(key: str, value) -> None:
    section, name = key.split("__")
    with pytest.raises(ParamsError, match=rf"^{section}\.{name}: expected"):
        validate(mutated(**{key: value}))


def test_bool_key_refuses_an_integer() -> None:
    with pytest.raises(ParamsError, match=r"^augment\.horizontal_flip: expected true or false"):
        validate(mutated(augment__horizontal_flip=1))


@pytest.mark.parametrize("key", ["test_ratio", "val_ratio"])
@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, -0.1, 1.5, 0.6, float("nan")])
def test_split_ratio_outside_allowed_range(key: str, value) -> None:
    with pytest.raises(ParamsError, match=rf"^split\.{key}:"):
        validate(mutated(**{f"split__{key}": value}))


def test_split_ratios_inside_unit_interval_pass() -> None:
    checked = validate(mutated(split__test_ratio=0.5, split__val_ratio=0.5))
    assert checked.split.test_ratio == 0.5


def test_split_ratio_above_one_half_names_the_range() -> None:
    with pytest.raises(ParamsError, match=r"^split\.test_ratio: 0\.7 is outside the allowed range \(0, 0\.5\]"):
        validate(mutated(split__test_ratio=0.7))


@pytest.mark.parametrize("size", [31, 16, 0, -224])
def test_image_size_below_32(size: int) -> None:
    with pytest.raises(ParamsError, match=r"^cnn\.image_size: .*outside the allowed range \[32, 1024\]"):
        validate(mutated(cnn__image_size=size))


def test_image_size_32_is_the_smallest_allowed() -> None:
    assert validate(mutated(resnet__image_size=32)).resnet.image_size == 32


def test_fine_tuning_with_several_folds_is_refused() -> None:
    with pytest.raises(ParamsError, match=r"^resnet\.fine_tune_layers: .*train\.folds: 1"):
        validate(mutated(resnet__fine_tune_layers=8, resnet__fine_tune_epochs=2))
    assert validate(mutated(resnet__fine_tune_layers=8, resnet__fine_tune_epochs=2, train__folds=1))


def test_unknown_dataset_source_lists_allowed_values() -> None:
    with pytest.raises(ParamsError, match=r"^dataset\.source: 'zip' is not one of") as err:
        validate(mutated(dataset__source="zip"))
    for allowed in ("'phantom'", "'url'", "'path'"):
        assert allowed in str(err.value)


@pytest.mark.parametrize(
    "fractions, pattern",
    [
        ({"normal": 0.2, "osteopenia": 0.6, "osteoporosis": 0.3}, r"sum to 1, they sum to 1\.1"),
        ({"normal": 0.1, "osteopenia": 0.5, "osteoporosis": 0.2}, r"sum to 1, they sum to 0\.8"),
        ({"normal": 0.5, "osteopenia": 0.5}, r"exactly the keys"),
        ({"normal": 0.0, "osteopenia": 0.5, "osteoporosis": 0.5}, r"phantom\.class_fractions\.normal"),
    ],
)
def test_class_fractions(fractions: dict, pattern: str) -> None:
    with pytest.raises(ParamsError, match=r"^phantom\.class_fractions") as err:
        validate(mutated(phantom__class_fractions=fractions))
    assert re.search(pattern, str(err.value)), str(err.value)


def test_params_are_typed_and_frozen() -> None:
    params = load(ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        params.phantom.class_fractions["normal"] = 0.5  # type: ignore[index]
    assert params.model("cnn") is params.cnn and params.model("resnet") is params.resnet
    assert kparams.as_plain(params) == COMMITTED  # nothing lost or renamed on the way


@pytest.mark.parametrize(
    "classes, pattern",
    [
        (["normal"], r"^dataset\.classes: expected a list of 2 to 50 class names"),
        (["a", "A"], r"^dataset\.classes: class names must be distinct"),
        (["ok", "no/slash"], r"^dataset\.classes\[1\]: 'no/slash' is not a class folder name"),
        ("normal", r"^dataset\.classes: expected a list"),
    ],
)
def test_bad_class_names(classes, pattern: str) -> None:
    with pytest.raises(ParamsError, match=pattern):
        validate(mutated(dataset__classes=classes))


def test_any_class_set_with_matching_phantom_fractions() -> None:
    grades = [f"kl{g}" for g in range(5)]
    params = validate(mutated(dataset__classes=grades, phantom__class_fractions=dict.fromkeys(grades, 0.2)))
    assert params.dataset.classes == tuple(grades)
    with pytest.raises(ParamsError, match=r"^phantom\.class_fractions: expected exactly the keys of dataset\.classes"):
        validate(mutated(dataset__classes=grades))
    with pytest.raises(ParamsError, match=r"^train\.no_skill_share: must be above 1 / 2 classes"):
        validate(
            mutated(
                dataset__classes=["a", "b"], phantom__class_fractions={"a": 0.5, "b": 0.5}, train__no_skill_share=0.4
            )
        )


def test_class_fractions_summing_to_one_within_rounding_pass() -> None:
    fractions = {"normal": 0.1, "osteopenia": 0.2, "osteoporosis": 0.7}  # 0.1 + 0.2 != 0.3 in floats
    assert validate(mutated(phantom__class_fractions=fractions)).phantom.class_fractions == fractions


def test_source_path_requires_a_path() -> None:
    with pytest.raises(ParamsError, match=r"^dataset\.path: required when dataset\.source is 'path'"):
        validate(mutated(dataset__source="path", dataset__path=""))
    checked = validate(mutated(dataset__source="path", dataset__path="/data/knee.zip"))
    assert checked.dataset.path == "/data/knee.zip"


def test_source_url_requires_a_url_scheme() -> None:
    with pytest.raises(ParamsError, match=r"^dataset\.url: must start with"):
        validate(mutated(dataset__source="url", dataset__url="example.com/knee.zip"))


@pytest.mark.parametrize("sha", ["abc123", "g" * 64, "0" * 63, "0" * 65])
def test_bad_sha256(sha: str) -> None:
    with pytest.raises(ParamsError, match=r"^dataset\.sha256: expected 64 hexadecimal digits"):
        validate(mutated(dataset__sha256=sha))


@pytest.mark.parametrize("sha", ["", "0123456789abcdef" * 4, "0123456789ABCDEF" * 4])
def test_good_sha256(sha: str) -> None:
    assert validate(mutated(dataset__sha256=sha)).dataset.sha256 == sha


def test_resnet_file_weights_require_a_path() -> None:
    with pytest.raises(ParamsError, match=r"^resnet\.weights_path: required"):
        validate(mutated(resnet__weights="file", resnet__weights_path=""))


def test_list_items_are_named_by_position() -> None:
    with pytest.raises(ParamsError, match=r"^cnn\.filters\[1\]:"):
        validate(mutated(cnn__filters=[32, "64"]))
    with pytest.raises(ParamsError, match=r"^augment\.brightness: low 1\.2 is greater than high 0\.8"):
        validate(mutated(augment__brightness=[1.2, 0.8]))


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  test_ratio: [0.2\n  seed: 42\n")
    with pytest.raises(ParamsError, match=r"not valid YAML") as err:
        load(path)
    assert str(path) in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match=r"expected a mapping of sections, got list"):
        load(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match=r"file not found") as err:
        load(path)
    assert "nope.yaml" in str(err.value)


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(mutated(cnn__epochs=3), sort_keys=False))
    assert load(path).cnn.epochs == 3


# --- read as DVC writes: YAML 1.2 -------------------------------------------------------------------


def params_text(section: str, key: str, raw: str) -> str:
    """The committed params as YAML text, with `section.key` spelt exactly `raw` (as `dvc exp run -S` writes it)."""
    text = yaml.safe_dump(mutated(**{f"{section}__{key}": "__VALUE__"}), sort_keys=False)
    assert text.count("__VALUE__") == 1
    return text.replace("__VALUE__", raw)


@pytest.mark.parametrize(
    ("section", "key", "raw", "expected"),
    [
        ("cnn", "learning_rate", "1e-05", 1e-5),  # what DVC writes for -S cnn.learning_rate=1e-5
        ("cnn", "learning_rate", "1e-5", 1e-5),
        ("cnn", "dropout", ".5", 0.5),
        ("dataset", "deadline_s", "1.5e3", 1500.0),
        ("train", "resume", "true", True),
        ("split", "group_near_duplicates", "false", False),
        ("evaluate", "external_path", '"1e3"', "1e3"),  # quoted: stays text
        ("dataset", "path", "'007'", "007"),
        ("cnn", "filters", "[16, 32]", (16, 32)),
        ("cnn", "filters", "\n  - 16\n  - 32", (16, 32)),
    ],
)
def test_values_are_read_as_dvc_writes_them(tmp_path: Path, section: str, key: str, raw: str, expected) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(params_text(section, key, raw))
    value = getattr(getattr(load(path), section), key)
    assert value == expected and type(value) is type(expected)


def test_yaml_1_1_spellings_are_text(tmp_path: Path) -> None:
    """`off` is false to YAML 1.1 but text to YAML 1.2 (and to DVC), so it fails as text would."""
    path = tmp_path / "params.yaml"
    path.write_text(params_text("train", "mixed_precision", "off"))
    with pytest.raises(ParamsError, match=r"^train\.mixed_precision: 'off' is not one of"):
        load(path)


@pytest.mark.parametrize("text", ["split:\n  test_ratio: [0.2\n  seed: 42\n", "split: 1\nsplit: 2\n"])
def test_invalid_yaml_is_one_line_with_the_place(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=r"not valid YAML \(.* at line \d+, column \d+\)$") as err:
        load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# --- dataset: download bounds ----------------------------------------------------------------------


def test_download_bounds_default_in_the_committed_file() -> None:
    dataset = load(ROOT / "params.yaml").dataset
    assert dataset.deadline_s == 3600 and dataset.min_rate_kbps == 1 and dataset.timeout_s == 30


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("timeout_s", ".inf"),
        ("timeout_s", "1e300"),
        ("timeout_s", ".nan"),
        ("timeout_s", "3601"),
        ("timeout_s", "0"),
        ("deadline_s", ".inf"),
        ("deadline_s", "0"),
        ("min_rate_kbps", "-1"),
        ("min_rate_kbps", ".inf"),
    ],
)
def test_unbounded_download_times_are_one_line_errors(tmp_path: Path, key: str, raw: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(params_text("dataset", key, raw))
    with pytest.raises(ParamsError, match=rf"^dataset\.{key}: ") as err:
        load(path)
    assert "\n" not in str(err.value)


def test_no_minimum_rate_is_allowed() -> None:
    assert validate(mutated(dataset__min_rate_kbps=0)).dataset.min_rate_kbps == 0
