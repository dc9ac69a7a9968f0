"""Predicting new files (PNG, JPEG, 16-bit PNG, DICOM), Grad-CAM, and the `python -m kneexray` CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pydicom
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kneexray import DEFAULT_CLASSES
from kneexray.__main__ import main
from kneexray.data.dicom import read_dicom_grey
from kneexray.data.images import ImageError
from kneexray.evaluate.gradcam import GradCam, gradcam, gradcam_grid, overlay, pick_examples, save_explanation
from kneexray.evaluate.scoring import predict_proba
from kneexray.model.files import load_model, save_model
from kneexray.model.inputs import load_images
from kneexray.model.networks import build_cnn, build_head, build_resnet
from kneexray.predict import collect_inputs, load_for_model, predict_files, write_csv, write_json
from tests.support import model_metadata

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
METADATA = {
    **model_metadata(SIZE),
    "weights_source": "none (trained from scratch)",
    "input": "greyscale uint8 pixels, resized to image_size x image_size, fed as float32 in [0, 255]",
    "preprocessing": "in-model: Rescaling(1/255)",
    "epochs_run": 6,
    "train_images": 240,
}


def blob_images(n: int, seed: int, side: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Noise; every odd image (class 1) also has a bright square somewhere in the top-left quadrant."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 120, (n, side, side), dtype=np.uint8)
    y = np.arange(n) % 2
    blob = side // 4
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, side // 2 - blob + 1, 2)
        x[i, r : r + blob, c : c + blob] = rng.integers(200, 256, (blob, blob))
    return x, y


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    """A tiny CNN that has learnt 'bright square in the top-left' = osteopenia (class 1)."""
    keras.utils.set_random_seed(0)
    x, y = blob_images(240, seed=0)
    model = build_cnn(SIZE, 3, filters=[8, 16], dense_units=8, dropout=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x[..., None].astype("float32"), y, epochs=6, batch_size=16, verbose=0)
    return model


@pytest.fixture(scope="module")
def model_path(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    save_model(trained, METADATA, path)
    return path


def full_range_image(seed: int, side: int = 48) -> np.ndarray:
    """A blob image stretched to exactly 0..255, so 16-bit and DICOM min-max scaling give it back unchanged."""
    image = blob_images(2, seed, side)[0][1].astype(np.float64)
    return np.round((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = (255.5, 511),
    slope: float = 0.5,
    intercept: float = -50.0,
) -> None:
    """A DX-like DICOM of uint16 stored values (several frames when `stored` is 3-D)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def as_dicom_values(pixels: np.ndarray) -> np.ndarray:
    """Stored values that slope 0.5, intercept -50 and the window [0, 510] display as `pixels`."""
    return pixels.astype(np.uint16) * 4 + 100  # rescaled: 2 * pixels


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One image in every supported form, plus one broken file, in a folder with a subfolder."""
    folder = tmp_path_factory.mktemp("inputs")
    pixels = full_range_image(seed=3)
    Image.fromarray(pixels).save(folder / "knee.png")
    Image.fromarray(pixels).save(folder / "knee_jpeg.jpg", quality=95)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "knee16.png")  # mode I;16
    (folder / "dicom").mkdir()
    write_dicom(folder / "dicom" / "knee.dcm", as_dicom_values(pixels))
    write_dicom(folder / "dicom" / "knee_m1.dcm", as_dicom_values(pixels), photometric="MONOCHROME1")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


# --- DICOM -------------------------------------------------------------------------------------


def test_dicom_rescale_window_photometric_and_frames(tmp_path):
    pixels = full_range_image(seed=1)
    write_dicom(tmp_path / "m2.dcm", as_dicom_values(pixels))
    write_dicom(tmp_path / "m1.dcm", as_dicom_values(pixels), photometric="MONOCHROME1")
    write_dicom(tmp_path / "minmax.dcm", as_dicom_values(pixels), window=None)
    write_dicom(tmp_path / "frames.dcm", np.stack([as_dicom_values(pixels), np.zeros_like(pixels, np.uint16)]))
    m2 = read_dicom_grey(tmp_path / "m2.dcm")
    assert m2.mode == "L" and m2.size == (48, 48)
    np.testing.assert_array_equal(np.asarray(m2), pixels)  # slope, intercept and window undone exactly
    np.testing.assert_array_equal(np.asarray(read_dicom_grey(tmp_path / "m1.dcm")), 255 - pixels)
    np.testing.assert_array_equal(np.asarray(read_dicom_grey(tmp_path / "minmax.dcm")), pixels)
    np.testing.assert_array_equal(np.asarray(read_dicom_grey(tmp_path / "frames.dcm")), pixels)


def test_dicom_window_is_the_display_range(tmp_path):
    values = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    write_dicom(tmp_path / "wide.dcm", values, slope=1.0, intercept=0.0)  # window [0, 510]: values show at half
    write_dicom(tmp_path / "narrow.dcm", values, window=(128.5, 65), slope=1.0, intercept=0.0)  # window [96, 160]
    np.testing.assert_allclose(np.asarray(read_dicom_grey(tmp_path / "wide.dcm"))[0], np.arange(256) / 2, atol=0.5)
    narrow = np.asarray(read_dicom_grey(tmp_path / "narrow.dcm"))[0].astype(int)
    assert (narrow[:96] == 0).all() and (narrow[161:] == 255).all()
    np.testing.assert_allclose(narrow[96:161], (np.arange(96, 161) - 96) * 255 / 64, atol=0.5)


def test_broken_dicoms_are_image_errors(tmp_path):
    write_dicom(tmp_path / "good.dcm", as_dicom_values(full_range_image(seed=1)))
    good = (tmp_path / "good.dcm").read_bytes()
    ds = pydicom.dcmread(tmp_path / "good.dcm")
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(tmp_path / "rgb.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    (tmp_path / "truncated.dcm").write_bytes(good[:-1000])
    (tmp_path / "text.dcm").write_bytes(b"hello")
    for name, reason in [
        ("text.dcm", "not a readable DICOM"),
        ("truncated.dcm", "undecodable DICOM pixel data"),
        ("empty.dcm", "without pixel data"),
        ("rgb.dcm", "only greyscale"),
    ]:
        with pytest.raises(ImageError, match=reason):
            read_dicom_grey(tmp_path / name)


# --- predict -----------------------------------------------------------------------------------


def test_collect_inputs_walks_folders_sorted(tmp_path):
    for name in ("b/z.PNG", "b/c/y.dcm", "a.jpg", "b/.x.png", "b/notes.txt", "export"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = collect_inputs([tmp_path / "b", tmp_path / "export", tmp_path / "a.jpg", tmp_path / "b" / "z.PNG"])
    # Named files are kept whatever their suffix; hidden files and non-images in folders are not.
    assert found == [tmp_path / n for n in ("a.jpg", "b/c/y.dcm", "b/z.PNG", "export")]


def test_predict_files_every_format_and_a_broken_one(model_path, inputs):
    rows = predict_files(model_path, [inputs], batch_size=4)
    rows = {Path(r["path"]).relative_to(inputs).as_posix(): r for r in rows}
    assert set(rows) == {"broken.png", "dicom/knee.dcm", "dicom/knee_m1.dcm", "knee.png", "knee16.png", "knee_jpeg.jpg"}
    assert "error" in rows["broken.png"] and "predicted" not in rows["broken.png"]
    for name, row in rows.items():
        if name != "broken.png":
            proba = row["probabilities"]
            assert list(proba) == list(DEFAULT_CLASSES) and row["predicted"] == max(proba, key=proba.get)
            assert sum(proba.values()) == pytest.approx(1.0, abs=1e-5)

    def p(name):
        return np.array(list(rows[name]["probabilities"].values()))

    np.testing.assert_allclose(p("dicom/knee.dcm"), p("knee.png"), atol=1e-6)  # identical pixels
    np.testing.assert_allclose(p("knee16.png"), p("knee.png"), atol=1e-6)
    np.testing.assert_allclose(p("knee_jpeg.jpg"), p("knee.png"), atol=0.05)  # lossy
    assert rows["knee.png"]["predicted"] == DEFAULT_CLASSES[1]  # it has the square the model learnt


def test_monochrome1_loads_inverted(inputs):
    m2, m1 = load_for_model(inputs / "dicom" / "knee.dcm", SIZE), load_for_model(inputs / "dicom" / "knee_m1.dcm", SIZE)
    np.testing.assert_array_equal(m2, load_for_model(inputs / "knee.png", SIZE))
    np.testing.assert_allclose(m1.astype(int), 255 - m2.astype(int), atol=1)  # PIL rounds the resize


def test_predict_files_agrees_with_the_evaluate_path(model_path, trained, inputs):
    paths = [inputs / "knee.png", inputs / "knee_jpeg.jpg", inputs / "knee16.png"]
    rows = predict_files(model_path, paths, batch_size=2)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in paths)
    expected = predict_proba(trained, load_images([Path(r["path"]) for r in rows], SIZE), batch_size=32)
    got = np.array([list(r["probabilities"].values()) for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_without_metadata_is_a_clear_error(trained, inputs, tmp_path, capsys):
    plain = tmp_path / "plain.keras"
    trained.save(plain)
    with pytest.raises(ValueError, match="without kneexray metadata"):
        predict_files(plain, [inputs / "knee.png"])
    assert main(["predict", str(inputs / "knee.png"), "--model", str(plain)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "without kneexray metadata" in err and "\n" not in err


def test_writers(tmp_path):
    rows = [
        {
            "path": "a.png",
            "predicted": "normal",
            "probabilities": {"normal": 0.7, "osteopenia": 0.2, "osteoporosis": 0.1},
        },
        {"path": "b.png", "error": "empty file"},
    ]
    write_csv(rows, tmp_path / "p.csv")
    write_json(rows, tmp_path / "p.json")
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "predicted", "p_normal", "p_osteopenia", "p_osteoporosis", "error"]
    assert table[0]["p_normal"] == "0.700000" and table[0]["error"] == ""
    assert table[1] == {
        "path": "b.png",
        "predicted": "",
        "p_normal": "",
        "p_osteopenia": "",
        "p_osteoporosis": "",
        "error": "empty file",
    }
    assert json.loads((tmp_path / "p.json").read_text()) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.json"]  # no temporary files left


# --- Grad-CAM ----------------------------------------------------------------------------------


def _check_heatmap(heatmap: np.ndarray, size: int) -> None:
    assert heatmap.shape == (size, size)
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.01


def test_gradcam_on_the_cnn(trained):
    assert GradCam(trained).target_name == "relu2"  # the last conv block, rectified
    image = blob_images(2, seed=5)[0][1]
    _check_heatmap(gradcam(trained, image), SIZE)
    _check_heatmap(gradcam(trained, image, class_index=0), SIZE)


def test_gradcam_on_the_resnet(tmp_path):
    keras.utils.set_random_seed(0)
    size = 64  # conv5 is 2x2 at 64 px (1x1 at 32 px: a constant heatmap)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    head_model = build_head(2048, 3, dense_units=8, dropout=0.1)
    model = build_resnet(size, base=base, head=head_model)
    # Random weights often leave no positive evidence at all (an all-zero heatmap). This head makes
    # class 0 the sum of the pooled features instead, so every gradient is the same positive number
    # and the heatmap must be the channel sum of conv5_block3_out, upsampled.
    hidden, head = [layer for layer in head_model.layers if isinstance(layer, keras.layers.Dense)]
    hidden.set_weights([np.full((2048, 8), 1e-3, np.float32), np.zeros(8, np.float32)])
    head.set_weights([np.eye(8, 3, dtype=np.float32) * [1, 0, 0], np.zeros(3, np.float32)])
    images = np.stack([blob_images(2, seed=5, side=size)[0][1], full_range_image(seed=6, side=size)])

    explainer = GradCam(model)
    assert explainer.target_name == "conv5_block3_out"
    heatmaps = explainer(images, [0, 0])
    for heatmap in heatmaps:
        _check_heatmap(heatmap, size)
    assert not np.allclose(heatmaps[0], heatmaps[1])

    preprocess = keras.Model(model.input, model.get_layer("resnet_preprocess").output)
    features = keras.Model(base.input, base.get_layer("conv5_block3_out").output)
    cams = features(preprocess(images[..., None].astype(np.float32))).numpy().sum(axis=-1, keepdims=True)
    expected = tf.image.resize(cams, (size, size), method="bilinear").numpy()[..., 0]
    np.testing.assert_allclose(heatmaps, expected / expected.max(axis=(1, 2), keepdims=True), atol=1e-4)

    save_model(model, {**METADATA, "model": "resnet", "image_size": size}, tmp_path / "resnet.keras")
    loaded, _ = load_model(tmp_path / "resnet.keras")  # the nested base as deserialised, as the CLI meets it
    np.testing.assert_allclose(GradCam(loaded)(images, [0, 0]), heatmaps, atol=1e-5)


def test_gradcam_finds_the_square_that_carries_the_class(trained):
    x, y = blob_images(40, seed=1)
    assert (trained.predict(x[..., None].astype("float32"), verbose=0).argmax(axis=1) == y).mean() >= 0.95
    heatmaps = GradCam(trained)(x[y == 1], [1] * int(y.sum()))
    in_quadrant = heatmaps[:, : SIZE // 2, : SIZE // 2].sum(axis=(1, 2)) / heatmaps.sum(axis=(1, 2))
    assert in_quadrant.mean() > 0.5 and np.median(in_quadrant) > 0.5  # a quarter if spread evenly


def test_overlay_and_explanation_png(tmp_path):
    image = full_range_image(seed=2, side=SIZE)
    heatmap = np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE)
    blended = overlay(image, heatmap)
    assert blended.mode == "RGB" and blended.size == (SIZE, SIZE)
    assert not np.array_equal(np.asarray(blended)[..., 0], np.asarray(blended)[..., 2])  # coloured
    first = save_explanation(Path("in/knee 1.dcm"), image, heatmap, tmp_path / "a")
    second = save_explanation(Path("knee 1.png"), image, heatmap, tmp_path / "b")
    assert first.name == "knee 1_gradcam.png"
    assert first.read_bytes() == second.read_bytes()  # reproducible bytes
    assert b"tIME" not in first.read_bytes() and b"tEXt" not in first.read_bytes()
    with Image.open(first) as png:
        assert png.size == (2 * SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(png)[:, :SIZE, 0], image)  # the original on the left


def test_pick_examples_and_grid(trained):
    labels, predictions = [0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 1, 0]
    assert pick_examples(labels, predictions, per_class=1) == [0, 1, 3, 5]
    x, y = blob_images(4, seed=7)
    fig = gradcam_grid(trained, x, y, [0, 1, 1, 1], classes=DEFAULT_CLASSES, ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 4
    assert [ax.get_title().splitlines()[1] for ax in shown] == ["predicted normal"] + ["predicted osteopenia"] * 3
    assert shown[0].title.get_color() == "tab:green" and shown[2].title.get_color() == "tab:red"


# --- command line ------------------------------------------------------------------------------


def test_cli_predict_folder_to_csv_with_explanations(model_path, inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kneexray",
            "predict",
            str(inputs),
            "--model",
            str(model_path),
            "--csv",
            "out/predictions.csv",
            "--explain",
            "explain",
            "--batch-size",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(str(inputs))]
    assert len(errors) == 1 and errors[0].startswith(f"{inputs / 'broken.png'}: ")
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 6 and rows["broken.png"]["error"] and not rows["broken.png"]["predicted"]
    assert rows["knee.png"]["predicted"] == DEFAULT_CLASSES[1]
    assert sum(float(rows["knee.png"][f"p_{c}"]) for c in DEFAULT_CLASSES) == pytest.approx(1.0, abs=1e-5)
    # knee.png and dicom/knee.dcm share a stem: the second one gets a number, neither is overwritten
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == [
        "knee16_gradcam.png",
        "knee_2_gradcam.png",
        "knee_gradcam.png",
        "knee_jpeg_gradcam.png",
        "knee_m1_gradcam.png",
    ]


def test_cli_table_json_and_exit_codes(model_path, inputs, tmp_path, capsys):
    assert main(["predict", str(inputs / "knee.png"), str(inputs / "broken.png"), "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    header, line = out.strip().splitlines()
    assert header.split() == ["path", "predicted", *DEFAULT_CLASSES]
    assert line.split()[:2] == [str(inputs / "knee.png"), DEFAULT_CLASSES[1]]
    assert err.strip().startswith(f"{inputs / 'broken.png'}: ")

    json_path = tmp_path / "p.json"
    assert main(["predict", str(inputs / "broken.png"), "--model", str(model_path), "--json", str(json_path)]) == 1
    assert json.loads(json_path.read_text())[0]["error"] == "not a recognised image format"
    assert capsys.readouterr() == ("", f"{inputs / 'broken.png'}: not a recognised image format\n")
    assert main(["predict", str(tmp_path / "missing.png"), "--model", str(model_path)]) == 1
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'missing.png'}: No such file or directory"
    assert main(["predict", str(inputs), "--model", str(tmp_path / "missing.keras")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.keras'}: no such model file"
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--model", str(model_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: no images found in {tmp_path / 'empty'}"

    with pytest.raises(SystemExit) as usage:
        main(["predict", str(inputs), "--model", str(model_path), "--csv", "a.csv", "--json", "b.json"])
    assert usage.value.code == 2


def test_predict_uses_the_fit_the_model_was_trained_with(trained, tmp_path):
    """A letterboxed model's metadata makes predict letterbox too, as training did (a wide image)."""
    wide = np.zeros((SIZE, 2 * SIZE), dtype=np.uint8)
    wide[:, : SIZE // 2] = 250  # the bright square sits top-left once letterboxed
    Image.fromarray(wide).save(tmp_path / "wide.png")
    rows = {}
    for fit in ("squash", "letterbox"):
        path = tmp_path / f"{fit}.keras"
        save_model(trained, {**METADATA, "image_fit": fit}, path)
        rows[fit] = predict_files(path, [tmp_path / "wide.png"])[0]["probabilities"]
        expected = predict_proba(trained, load_images([tmp_path / "wide.png"], SIZE, fit=fit), batch_size=1)[0]
        np.testing.assert_allclose(list(rows[fit].values()), expected, atol=1e-5)
    assert rows["squash"] != rows["letterbox"]
    save_model(trained, {**METADATA, "image_fit": "crop"}, tmp_path / "bad.keras")
    with pytest.raises(ValueError, match="unknown image_fit 'crop'"):
        predict_files(tmp_path / "bad.keras", [tmp_path / "wide.png"])
