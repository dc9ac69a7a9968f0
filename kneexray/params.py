"""Load and validate params.yaml before any work starts, into typed, frozen sections.

Each section is a frozen dataclass whose fields carry their rule. Unknown keys (likely typos),
missing keys, wrong types and out-of-range values raise ParamsError with a one-line message that
names the key and what is allowed; then the rules that span several keys are checked. Code reads
`params.train.seed`, and a function takes the section it needs, not the whole tree.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ruamel.yaml import YAML, YAMLError

from kneexray.errors import KneexrayError


class ParamsError(KneexrayError, ValueError):
    """A params.yaml value is missing, unknown or out of range."""


Check = Callable[[str, Any], Any]


def _num(lo=-math.inf, hi=math.inf, *, integer=False, lo_open=False, hi_open=False) -> Check:
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


def _choice(*allowed) -> Check:
    def check(key: str, value: Any) -> Any:
        if value not in allowed:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value

    return check


def _of_type(typ, label) -> Check:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
            raise ParamsError(f"{key}: expected {label}, got {value!r}")
        return value

    return check


def _int_list(lo: int, hi: int, min_len=1, max_len=8) -> Check:
    item = _num(lo, hi, integer=True)

    def check(key: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise ParamsError(f"{key}: expected a list of {min_len} to {max_len} integers, got {value!r}")
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))

    return check


def _range_pair(lo: float, hi: float) -> Check:
    item = _num(lo, hi)

    def check(key: str, value: Any) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise ParamsError(f"{key}: expected [low, high], got {value!r}")
        low, high = (item(f"{key}[{i}]", v) for i, v in enumerate(value))
        if low > high:
            raise ParamsError(f"{key}: low {low} is greater than high {high}")
        return low, high

    return check


_CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _class_names(key: str, value: Any) -> tuple[str, ...]:
    """Class folder names, in the order the model's outputs take."""
    if not isinstance(value, list) or not 2 <= len(value) <= 50:
        raise ParamsError(f"{key}: expected a list of 2 to 50 class names, got {value!r}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
            raise ParamsError(f"{key}[{i}]: {name!r} is not a class folder name (letters, digits, _ . -)")
    if len({name.lower() for name in value}) != len(value):
        raise ParamsError(f"{key}: class names must be distinct (ignoring case), got {value!r}")
    return tuple(value)


def _class_fractions(key: str, value: Any) -> Mapping[str, float]:
    """A share per class; that the keys are dataset.classes is checked across sections."""
    if not isinstance(value, dict) or not value:
        raise ParamsError(f"{key}: expected a mapping of class name to fraction, got {value!r}")
    for name, fraction in value.items():
        _num(0, 1, lo_open=True)(f"{key}.{name}", fraction)
    if abs(sum(value.values()) - 1) > 1e-6:
        raise ParamsError(f"{key}: fractions must sum to 1, they sum to {sum(value.values()):g}")
    return MappingProxyType(dict(value))


def _rule(check: Check, default: Any = MISSING) -> Any:
    """A field validated by `check` (which may also convert: lists become tuples); required unless
    it has a default."""
    return field(default=default, metadata={"check": check})


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _CLASS_NAME.fullmatch(value):
        raise ParamsError(f"{key}: {value!r} is not a name (letters, digits, _ . -)")
    return value


def _optional(check: Check) -> Check:
    return lambda key, value: None if value is None else check(key, value)


_STR = _of_type(str, "a string")
_BOOL = _of_type(bool, "true or false")
_POS_INT = _num(1, integer=True)
# Splits hold out whole folds of a StratifiedGroupKFold (1 / round(1 / ratio) of the images), so a
# ratio above one half has no meaning there; it also always leaves training images.
_SPLIT_RATIO = _num(0, 0.5, lo_open=True)
_LEARNING_RATE = _num(0, 1, lo_open=True)
_FRACTION = _num(0, 1)
_IMAGE_SIZE = _num(32, 1024, integer=True)
_DROPOUT = _num(0, 1, hi_open=True)


@dataclass(frozen=True)
class SourceParams:
    """One dataset of several (dataset.sources): where it comes from, and its name in reports."""

    name: str = _rule(_name)
    source: str = _rule(_choice("phantom", "url", "path"))
    url: str = _rule(_STR, "")
    path: str = _rule(_STR, "")
    sha256: str = _rule(_STR, "")
    seed: int | None = _rule(_optional(_num(0, integer=True)), None)  # phantom only: another seed, another phantom


def _sources(key: str, value: Any) -> tuple[SourceParams, ...]:
    """dataset.sources: a list of {name, source, url | path, sha256, seed}; empty: the single source."""
    if not isinstance(value, list):
        raise ParamsError(f"{key}: expected a list of sources (or []), got {value!r}")
    out = tuple(_section(f"{key}[{i}]", SourceParams, item) for i, item in enumerate(value))
    for i, spec in enumerate(out):
        if spec.source != "phantom" and not getattr(spec, spec.source):
            raise ParamsError(f"{key}[{i}].{spec.source}: required when its source is {spec.source!r}")
    names = [spec.name for spec in out]
    if len(set(names)) != len(names):
        raise ParamsError(f"{key}: source names must be distinct, got {names}")
    return out


@dataclass(frozen=True)
class DatasetParams:
    source: str = _rule(_choice("phantom", "url", "path"))
    classes: tuple[str, ...] = _rule(_class_names)
    sources: tuple[SourceParams, ...] = _rule(_sources)  # several datasets in one run; [] = the one above
    url: str = _rule(_STR)
    path: str = _rule(_STR)
    sha256: str = _rule(_STR)
    max_download_mb: int = _rule(_num(1, integer=True))
    # bounded: an infinite or 1e300 s timeout would only overflow the socket layer later
    timeout_s: float = _rule(_num(0, 3600, lo_open=True))
    retries: int = _rule(_num(0, 20, integer=True))
    deadline_s: float = _rule(_num(0, 7 * 24 * 3600, lo_open=True))  # the whole download, retries included
    min_rate_kbps: float = _rule(_num(0, 1_000_000))  # kilobits/s over each 30 s; 0: no minimum


@dataclass(frozen=True)
class PhantomParams:
    n_images: int = _rule(_num(3, 100_000, integer=True))
    class_fractions: Mapping[str, float] = _rule(_class_fractions)
    size: int = _rule(_num(32, 4096, integer=True))
    difficulty: float = _rule(_FRACTION)
    seed: int = _rule(_num(0, integer=True))


@dataclass(frozen=True)
class ExtractParams:
    max_depth: int = _rule(_num(1, 16, integer=True))
    max_total_mb: int = _rule(_num(1, integer=True))
    max_ratio: float = _rule(_num(1))
    max_pixels: int = _rule(_num(1, integer=True))
    min_side: int = _rule(_num(1, integer=True))
    near_duplicate_distance: float = _rule(_num(0, 2))
    keep_conflicts: bool = _rule(_BOOL)


@dataclass(frozen=True)
class SplitParams:
    test_ratio: float = _rule(_SPLIT_RATIO)
    val_ratio: float = _rule(_SPLIT_RATIO)
    seed: int = _rule(_num(0, integer=True))
    group_near_duplicates: bool = _rule(_BOOL)
    test_source: str = _rule(_STR)  # a source of dataset.sources held out whole as the test set; "" = none


@dataclass(frozen=True)
class ImageParams:
    batch_size: int = _rule(_num(1, 4096, integer=True))
    fit: str = _rule(_choice("squash", "letterbox"))


@dataclass(frozen=True)
class AugmentParams:
    rotation_deg: float = _rule(_num(0, 180))
    shift: float = _rule(_num(0, 0.5))
    zoom: float = _rule(_num(0, 0.9))
    horizontal_flip: bool = _rule(_BOOL)
    brightness: tuple[float, float] = _rule(_range_pair(0, 3))


@dataclass(frozen=True)
class TrainParams:
    seed: int = _rule(_num(0, integer=True))
    class_weights: str = _rule(_choice("balanced", "none"))
    folds: int = _rule(_num(1, 20, integer=True))
    select_on: str = _rule(_choice("macro_f1", "balanced_accuracy"))
    min_epochs: int = _rule(_num(1, integer=True))
    patience: int = _rule(_num(0, integer=True))
    warmup_epochs: int = _rule(_num(0, integer=True))
    label_smoothing: float = _rule(_num(0, 0.5))
    no_skill_share: float = _rule(_num(0, 1, lo_open=True))
    strategy: str = _rule(_choice("auto", "default", "mirrored", "multi_worker"))
    resume: bool = _rule(_BOOL)
    # no "off": DVC rewrites params.yaml unquoted on `exp run -S`, and YAML reads off as false
    mixed_precision: str = _rule(_choice("float32", "auto", "mixed_float16", "mixed_bfloat16"))
    jit_compile: bool = _rule(_BOOL)
    threads: int = _rule(_num(0, 256, integer=True))
    linear_probe: int = _rule(_num(0, 4096, integer=True), 0)  # thumbnail side of the probe blended in; 0 = none


@dataclass(frozen=True)
class CnnParams:
    image_size: int = _rule(_IMAGE_SIZE)
    filters: tuple[int, ...] = _rule(_int_list(4, 1024))
    dense_units: int = _rule(_num(1, 4096, integer=True))
    dropout: float = _rule(_DROPOUT)
    learning_rate: float = _rule(_LEARNING_RATE)
    epochs: int = _rule(_POS_INT)


@dataclass(frozen=True)
class ResnetParams:
    image_size: int = _rule(_IMAGE_SIZE)
    weights: str = _rule(_choice("imagenet", "file"))
    weights_required: bool = _rule(_BOOL)
    weights_path: str = _rule(_STR)
    dense_units: int = _rule(_num(1, 4096, integer=True))
    dropout: float = _rule(_DROPOUT)
    learning_rate: float = _rule(_LEARNING_RATE)
    epochs: int = _rule(_POS_INT)
    fine_tune_layers: int = _rule(_num(0, integer=True))
    fine_tune_epochs: int = _rule(_num(0, integer=True))
    fine_tune_learning_rate: float = _rule(_LEARNING_RATE)


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_resamples: int = _rule(_num(10, 100_000, integer=True))
    seed: int = _rule(_num(0, integer=True))
    calibration_bins: int = _rule(_num(2, 100, integer=True))
    external_path: str = _rule(_STR)
    thumbnail_size: int = _rule(_num(4, 128, integer=True))


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, validated: one frozen section per top-level key."""

    dataset: DatasetParams
    phantom: PhantomParams
    extract: ExtractParams
    split: SplitParams
    image: ImageParams
    augment: AugmentParams
    train: TrainParams
    cnn: CnnParams
    resnet: ResnetParams
    evaluate: EvaluateParams

    def model(self, kind: str) -> CnnParams | ResnetParams:
        """The section of model `kind` ('cnn' or 'resnet')."""
        if kind not in ("cnn", "resnet"):
            raise ValueError(f"model kind: {kind!r} is not one of cnn, resnet")
        return self.cnn if kind == "cnn" else self.resnet


SECTIONS: dict[str, type] = typing.get_type_hints(Params)


def _section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ParamsError(f"{name}: missing or not a mapping")
    rules = {f.name: f.metadata["check"] for f in fields(cls)}
    for key in values:
        if key not in rules:
            raise ParamsError(f"{name}.{key}: unknown key; allowed: {', '.join(rules)}")
    checked = {}
    for f in fields(cls):
        if f.name in values:
            checked[f.name] = f.metadata["check"](f"{name}.{f.name}", values[f.name])
        elif f.default is MISSING:
            raise ParamsError(f"{name}.{f.name}: missing")
    return cls(**checked)


def validate(raw: Any) -> Params:
    """Check a plain params mapping against every section's rules and the rules that span sections."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"{name}: unknown section; allowed: {', '.join(SECTIONS)}")
    params = Params(**{name: _section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()})

    dataset = params.dataset
    if dataset.source == "url" and not dataset.url.startswith(("http://", "https://", "file://")):
        raise ParamsError(f"dataset.url: must start with http://, https:// or file://, got {dataset.url!r}")
    if dataset.source == "path" and not dataset.path:
        raise ParamsError("dataset.path: required when dataset.source is 'path' (a ZIP or a class folder)")
    if dataset.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", dataset.sha256):
        raise ParamsError("dataset.sha256: expected 64 hexadecimal digits or an empty string")
    names = [s.name for s in dataset.sources]
    if params.split.test_source and params.split.test_source not in names:
        listed = ", ".join(names) or "none"
        raise ParamsError(f"split.test_source: {params.split.test_source!r} is not one of dataset.sources ({listed})")
    if params.split.test_source and len(names) < 2:
        raise ParamsError("split.test_source: holding one source out needs at least two in dataset.sources")
    fractions = params.phantom.class_fractions
    if list(fractions) != list(dataset.classes):
        raise ParamsError(
            f"phantom.class_fractions: expected exactly the keys of dataset.classes in its order "
            f"({', '.join(dataset.classes)}), got {', '.join(fractions)}"
        )
    if params.train.no_skill_share <= 1 / len(dataset.classes):
        raise ParamsError(
            f"train.no_skill_share: must be above 1 / {len(dataset.classes)} classes, got {params.train.no_skill_share}"
        )
    smallest = min(params.cnn.image_size, params.resnet.image_size)
    if params.train.linear_probe > smallest:
        raise ParamsError(
            f"train.linear_probe: thumbnails of {params.train.linear_probe} px can't be taken from "
            f"{smallest} px images (cnn/resnet.image_size); use at most that, or 0 for none"
        )
    resnet = params.resnet
    if resnet.weights == "file" and not resnet.weights_path:
        raise ParamsError("resnet.weights_path: required when resnet.weights is 'file' (.h5 or .weights.h5)")
    if resnet.fine_tune_layers > 0 and resnet.fine_tune_epochs > 0 and params.train.folds > 1:
        raise ParamsError("resnet.fine_tune_layers: fine-tuning needs train.folds: 1 (the fold heads share one base)")
    return params


def load(path: str | Path = "params.yaml") -> Params:
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
    return validate(as_plain(raw))


def dataset_sources(cfg: DatasetParams) -> tuple[SourceParams, ...]:
    """The sources of a run: dataset.sources, or the single one that dataset.source names."""
    if cfg.sources:
        return cfg.sources
    return (SourceParams(name=cfg.source, source=cfg.source, url=cfg.url, path=cfg.path, sha256=cfg.sha256),)


def as_plain(value: Any) -> Any:
    """Plain dicts and lists all the way down: params (or a section) for JSON, or what a YAML loader read."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {key: as_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(item) for item in value]
    return value


def _yaml_problem(err: YAMLError) -> str:
    """The parser's complaint and where, on one line (its own message spans several)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())
