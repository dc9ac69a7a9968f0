"""Load and validate params.yaml before any work starts.

Every key is checked against a schema: unknown keys (likely typos), wrong types and out-of-range
values raise ParamsError with a one-line message that names the key and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from kneexray import CLASSES
from kneexray.errors import KneexrayError


class ParamsError(KneexrayError, ValueError):
    """A params.yaml value is missing, unknown or out of range."""


def _num(lo=-math.inf, hi=math.inf, *, integer=False, lo_open=False, hi_open=False):
    kind = "an integer" if integer else "a number"
    lo_b, hi_b = ("(" if lo_open else "["), (")" if hi_open else "]")

    def check(key: str, value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise ParamsError(f"{key}: expected {kind} in {lo_b}{lo}, {hi}{hi_b}, got {value!r}")
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if below or above or (isinstance(value, float) and math.isnan(value)):
            raise ParamsError(f"{key}: {value!r} is outside the allowed range {lo_b}{lo}, {hi}{hi_b}")
        return value

    return check


def _choice(*allowed):
    def check(key: str, value: Any) -> Any:
        if value not in allowed:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value

    return check


def _of_type(typ, label):
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
            raise ParamsError(f"{key}: expected {label}, got {value!r}")
        return value

    return check


def _int_list(lo: int, hi: int, min_len=1, max_len=8):
    item = _num(lo, hi, integer=True)

    def check(key: str, value: Any) -> Any:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise ParamsError(f"{key}: expected a list of {min_len} to {max_len} integers, got {value!r}")
        return [item(f"{key}[{i}]", v) for i, v in enumerate(value)]

    return check


def _range_pair(lo: float, hi: float):
    item = _num(lo, hi)

    def check(key: str, value: Any) -> Any:
        if not isinstance(value, list) or len(value) != 2:
            raise ParamsError(f"{key}: expected [low, high], got {value!r}")
        low, high = (item(f"{key}[{i}]", v) for i, v in enumerate(value))
        if low > high:
            raise ParamsError(f"{key}: low {low} is greater than high {high}")
        return [low, high]

    return check


def _class_fractions(key: str, value: Any) -> Any:
    if not isinstance(value, dict) or set(value) != set(CLASSES):
        raise ParamsError(f"{key}: expected a mapping with exactly the keys {', '.join(CLASSES)}, got {value!r}")
    for cls in CLASSES:
        _num(0, 1, lo_open=True)(f"{key}.{cls}", value[cls])
    if abs(sum(value.values()) - 1) > 1e-6:
        raise ParamsError(f"{key}: fractions must sum to 1, they sum to {sum(value.values()):g}")
    return value


_STR = _of_type(str, "a string")
_BOOL = _of_type(bool, "true or false")
_POS_INT = _num(1, integer=True)
# Splits hold out whole folds of a StratifiedGroupKFold (1 / round(1 / ratio) of the images), so a
# ratio above one half has no meaning there; it also always leaves training images.
_SPLIT_RATIO = _num(0, 0.5, lo_open=True)
_LEARNING_RATE = _num(0, 1, lo_open=True)
_FRACTION = _num(0, 1)

SCHEMA: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "dataset": {
        "source": _choice("phantom", "url", "path"),
        "url": _STR,
        "path": _STR,
        "sha256": _STR,
        "max_download_mb": _num(1, integer=True),
        # bounded: an infinite or 1e300 s timeout would only overflow the socket layer later
        "timeout_s": _num(0, 3600, lo_open=True),
        "retries": _num(0, 20, integer=True),
        "deadline_s": _num(0, 7 * 24 * 3600, lo_open=True),  # the whole download, retries included
        "min_rate_kbps": _num(0, 1_000_000),  # kilobits/s over each 30 s; 0: no minimum
    },
    "phantom": {
        "n_images": _num(3, 100_000, integer=True),
        "class_fractions": _class_fractions,
        "size": _num(32, 2048, integer=True),
        "difficulty": _FRACTION,
        "seed": _num(0, integer=True),
    },
    "extract": {
        "max_depth": _num(1, 16, integer=True),
        "max_total_mb": _num(1, integer=True),
        "max_ratio": _num(1),
        "max_pixels": _num(1, integer=True),
        "min_side": _num(1, integer=True),
        "near_duplicate_distance": _num(0, 2),
        "keep_conflicts": _BOOL,
    },
    "split": {
        "test_ratio": _SPLIT_RATIO,
        "val_ratio": _SPLIT_RATIO,
        "seed": _num(0, integer=True),
        "group_near_duplicates": _BOOL,
    },
    "image": {
        "batch_size": _num(1, 4096, integer=True),
        "fit": _choice("squash", "letterbox"),
    },
    "augment": {
        "rotation_deg": _num(0, 180),
        "shift": _num(0, 0.5),
        "zoom": _num(0, 0.9),
        "horizontal_flip": _BOOL,
        "brightness": _range_pair(0, 3),
    },
    "train": {
        "seed": _num(0, integer=True),
        "class_weights": _choice("balanced", "none"),
        "folds": _num(1, 20, integer=True),
        "select_on": _choice("macro_f1", "balanced_accuracy"),
        "min_epochs": _num(1, integer=True),
        "patience": _num(0, integer=True),
        "warmup_epochs": _num(0, integer=True),
        "label_smoothing": _num(0, 0.5),
        "no_skill_share": _num(0.34, 1),
        "strategy": _choice("auto", "default", "mirrored", "multi_worker"),
        "resume": _BOOL,
        # no "off": DVC rewrites params.yaml unquoted on `exp run -S`, and YAML reads off as false
        "mixed_precision": _choice("float32", "auto", "mixed_float16", "mixed_bfloat16"),
        "jit_compile": _BOOL,
        "threads": _num(0, 256, integer=True),
    },
    "cnn": {
        "image_size": _num(32, 1024, integer=True),
        "filters": _int_list(4, 1024),
        "dense_units": _num(1, 4096, integer=True),
        "dropout": _num(0, 1, hi_open=True),
        "learning_rate": _LEARNING_RATE,
        "epochs": _POS_INT,
    },
    "resnet": {
        "image_size": _num(32, 1024, integer=True),
        "weights": _choice("imagenet", "file"),
        "weights_required": _BOOL,
        "weights_path": _STR,
        "dense_units": _num(1, 4096, integer=True),
        "dropout": _num(0, 1, hi_open=True),
        "learning_rate": _LEARNING_RATE,
        "epochs": _POS_INT,
        "fine_tune_layers": _num(0, integer=True),
        "fine_tune_epochs": _num(0, integer=True),
        "fine_tune_learning_rate": _LEARNING_RATE,
    },
    "evaluate": {
        "bootstrap_resamples": _num(10, 100_000, integer=True),
        "seed": _num(0, integer=True),
        "calibration_bins": _num(2, 100, integer=True),
        "external_path": _STR,
        "thumbnail_size": _num(4, 128, integer=True),
    },
}


def validate(params: Any) -> dict[str, dict[str, Any]]:
    """Check the whole params mapping against SCHEMA and the rules that span several keys."""
    if not isinstance(params, dict):
        raise ParamsError(f"params: expected a mapping of sections, got {type(params).__name__}")
    for section in params:
        if section not in SCHEMA:
            raise ParamsError(f"{section}: unknown section; allowed: {', '.join(SCHEMA)}")
    checked: dict[str, dict[str, Any]] = {}
    for section, fields in SCHEMA.items():
        values = params.get(section)
        if not isinstance(values, dict):
            raise ParamsError(f"{section}: missing or not a mapping")
        for key in values:
            if key not in fields:
                raise ParamsError(f"{section}.{key}: unknown key; allowed: {', '.join(fields)}")
        for key, check in fields.items():
            if key not in values:
                raise ParamsError(f"{section}.{key}: missing")
            checked.setdefault(section, {})[key] = check(f"{section}.{key}", values[key])

    dataset = checked["dataset"]
    if dataset["source"] == "url" and not dataset["url"].startswith(("http://", "https://", "file://")):
        raise ParamsError(f"dataset.url: must start with http://, https:// or file://, got {dataset['url']!r}")
    if dataset["source"] == "path" and not dataset["path"]:
        raise ParamsError("dataset.path: required when dataset.source is 'path' (a ZIP or a class folder)")
    if dataset["sha256"] and not (
        len(dataset["sha256"]) == 64 and all(c in "0123456789abcdefABCDEF" for c in dataset["sha256"])
    ):
        raise ParamsError("dataset.sha256: expected 64 hexadecimal digits or an empty string")
    resnet = checked["resnet"]
    if resnet["weights"] == "file" and not resnet["weights_path"]:
        raise ParamsError("resnet.weights_path: required when resnet.weights is 'file' (.h5 or .weights.h5)")
    if resnet["fine_tune_layers"] > 0 and resnet["fine_tune_epochs"] > 0 and checked["train"]["folds"] > 1:
        raise ParamsError("resnet.fine_tune_layers: fine-tuning needs train.folds: 1 (the fold heads share one base)")
    return checked


def load(path: str | Path = "params.yaml") -> dict[str, dict[str, Any]]:
    """Read and validate params.yaml; errors name the key and the allowed values.

    Read as YAML 1.2, the way DVC reads and writes it: `dvc exp run -S cnn.learning_rate=1e-5`
    stores `1e-05`, a number in YAML 1.2 but a string to YAML 1.1 (PyYAML).
    """
    try:
        raw = YAML(typ="safe", pure=True).load(Path(path).read_text())
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    return validate(_plain(raw))


def _yaml_problem(err: YAMLError) -> str:
    """The parser's complaint and where, on one line (its own message spans several)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def _plain(value: Any) -> Any:
    """Plain dicts and lists all the way down, whatever container types the YAML loader used."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
