"""A dataset exported from a PACS: DICOM files (with or without a suffix) go through extract like
any image, are stored as the 8-bit greyscale they display as, and predict reads them the same way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from kneexray.data.curation import curate
from kneexray.data.images import load_grey_array
from kneexray.predict import load_for_model
from tests.test_predict import full_range_image, write_dicom


def test_dicoms_are_curated_stored_as_png_and_read_like_predict_reads_them(tmp_path):
    classes = {c: tmp_path / "in" / c for c in ("normal", "osteopenia", "osteoporosis")}
    for i, folder in enumerate(classes.values()):
        folder.mkdir(parents=True)
        pixels = full_range_image(seed=10 + i, side=96)
        write_dicom(folder / "scan.dcm", pixels.astype(np.uint16) * 4)
        write_dicom(folder / "EXPORT0001", np.flipud(pixels).astype(np.uint16) * 4)  # no suffix: found by content
        Image.fromarray(full_range_image(seed=20 + i, side=96)).save(folder / "plain.png")
    curated = curate(
        {"dataset": classes},
        tmp_path / "out",
        max_pixels=10**7,
        min_side=32,
        near_duplicate_distance=0.006,
        keep_conflicts=False,
    )
    index = curated.index
    assert curated.audit["unreadable"] == 0 and len(index) == 9
    dicoms = index[index["mode"] == "DICOM"]
    assert len(dicoms) == 6 and all(p.endswith(".png") for p in dicoms["path"])
    for _, row in dicoms.iterrows():
        stored = tmp_path / "out" / row["path"]
        original = classes[row["label"]] / row["source"].split("/", 1)[1]
        # training reads the stored PNG; predict reads the DICOM itself: the same array
        np.testing.assert_array_equal(load_grey_array(stored, 64), load_for_model(original, 64))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_dicoms_read_like_uncompressed_ones(tmp_path, syntax):
    import pydicom

    from kneexray.data.dicom import read_dicom_grey

    plain = tmp_path / "plain.dcm"
    write_dicom(plain, full_range_image(seed=3, side=64).astype(np.uint16) * 4)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)  # JPEG 2000 through pylibjpeg-openjpeg, as a PACS would export it
    packed = tmp_path / "packed.dcm"
    ds.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(np.asarray(read_dicom_grey(packed)), np.asarray(read_dicom_grey(plain)))
    np.testing.assert_array_equal(load_for_model(packed, 32), load_for_model(plain, 32))
