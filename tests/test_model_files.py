"""Model files from elsewhere: bad kneexray metadata and configs naming code are one-line errors."""

from __future__ import annotations

import json
import zipfile

import pytest

from kneexray.errors import InputError, KneexrayError
from kneexray.model.files import META_ENTRY, load_model, read_metadata, save_model
from kneexray.model.networks import build_cnn
from kneexray.predict import collect_inputs

GOOD = {
    "model": "cnn",
    "classes": ["normal", "osteopenia", "osteoporosis"],
    "image_size": 32,
    "weights_source": "none (trained from scratch)",
}


def _with_metadata(tmp_path, raw: bytes):
    path = tmp_path / "model.keras"
    save_model(build_cnn(32, 3, filters=[4], dense_units=4, dropout=0.0), GOOD, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    entries[META_ENTRY] = raw
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{}", "no list of class names"),
        (b"[]", "not a mapping"),
        (b"{not json", "not JSON"),
        (json.dumps({**GOOD, "image_size": 0}).encode(), r"image size in \[32, 1024\] \(got 0\)"),
        (json.dumps({**GOOD, "image_size": "32"}).encode(), "image size"),
    ],
)
def test_bad_metadata_is_a_one_line_error(tmp_path, raw, match):
    path = _with_metadata(tmp_path, raw)
    with pytest.raises(InputError, match=match):
        read_metadata(path)


def test_a_config_naming_builtins_exec_is_refused_in_one_line(tmp_path):
    path = tmp_path / "model.keras"
    save_model(build_cnn(32, 3, filters=[4], dense_units=4, dropout=0.0), GOOD, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    config = json.loads(entries["config.json"])
    config["config"]["layers"][1] = {
        "module": "builtins",
        "class_name": "exec",
        "config": {},
        "registered_name": "exec",
        "name": "evil",
        "inbound_nodes": [],
    }
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(InputError, match="Keras refused to load it"):
        load_model(path)


def test_a_folder_too_deep_for_a_dataset_is_one_line_in_predict(tmp_path):
    deep = tmp_path
    for _ in range(150):
        deep = deep / "d"
    deep.mkdir(parents=True)
    with pytest.raises(KneexrayError, match="levels deep"):
        collect_inputs([tmp_path])
