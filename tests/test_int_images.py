"""Integer images follow one rule whether they come from a file or a stored array (``specs.data.int_pixels``):
signed types are scaled by their maximum, and a range wider than 16 bits that the values fill less than 1/16
of is refused (dividing by it gives a black image). 32-bit signed TIFFs (PIL mode "I") were divided by
2**32 - 1: half the brightness of the same image stored as .npy, a silently wrong input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from relprop.specs import SpecError, load_data, read_image
from relprop.specs.data import array_image, decode_image

Image = pytest.importorskip("PIL.Image")


def _pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    a[0, 0] = 255  # a full range: no note
    return a


def _tiff(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF")
    return buf.getvalue()


def test_a_32_bit_signed_tiff_is_scaled_by_its_maximum_as_the_same_npy_is():
    a = _pixels()
    full = a.astype(np.int32) * ((2**31 - 1) // 255)  # fills int32's range
    b = _tiff(full)
    with Image.open(io.BytesIO(b)) as im:
        assert im.mode == "I" and im.tag_v2[339] == (2,)  # PIL's 32-bit signed mode, SampleFormat signed
    got = decode_image(b, name="x.tif")
    ref = torch.from_numpy(a[None] / 255.0).float()
    assert torch.allclose(got, ref, atol=1e-6), (got - ref).abs().max()  # was about ref / 2
    assert torch.equal(got, array_image(full, "x.npy"))  # one rule for files and arrays


def test_a_32_bit_tiff_holding_8_or_16_bit_values_is_refused_like_the_npy(tmp_path):
    a = _pixels()
    for values in (a.astype(np.int32), a.astype(np.int32) * 257):  # 8-bit and 16-bit values in an int32 TIFF
        with pytest.raises(
            SpecError,
            match=r"^cannot read image x\.tif: a 32-bit signed integer image \(mode I\) with values in \[\d+, ",
        ):
            decode_image(_tiff(values), name="x.tif")
        with pytest.raises(SpecError, match=r"^cannot read image x\.npy: an int32 array with values in \[\d+, "):
            array_image(values, "x.npy")
    # in a folder: refused when the data is loaded (the probe decodes TIFFs), not mid-run
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "a.tif").write_bytes(_tiff(a.astype(np.int32)))
    with pytest.raises(
        SpecError,
        match=r"a\.tif: a 32-bit signed integer image .*fills less than 1/16 of its type's range \(0-2147483647\)",
    ):
        load_data(str(tmp_path / "d"))


def test_the_refusal_names_the_exact_maximum_of_wide_types():
    """2**63 - 1 as a float prints as ...808: the message must name the type's maximum itself."""
    for dtype, top in ((np.int64, 2**63 - 1), (np.uint64, 2**64 - 1), (np.uint32, 2**32 - 1)):
        with pytest.raises(SpecError, match=rf"type's range \(0-{top}\)"):
            array_image(_pixels().astype(dtype), "x.npy")


def test_16_bit_files_keep_their_rule_and_note():
    a = _pixels().astype(np.uint16) * 16  # 12-bit values in a 16-bit TIFF: scaled by 65535, with the note
    notes: list[str] = []
    got = decode_image(_tiff(a), notes, name="x.tif")
    assert torch.allclose(got, torch.from_numpy(a[None] / 65535.0).float())
    assert len(notes) == 1 and "of the 16-bit range" in notes[0] and "as the file declares" in notes[0]


def test_negative_pixels_are_refused_for_files_and_arrays(tmp_path):
    a = _pixels().astype(np.int32) * ((2**31 - 1) // 255)
    a[1, 1] = -5
    with pytest.raises(
        SpecError, match=r"^cannot read image x\.tif: negative pixel values \(a 32-bit signed integer image \(mode I\) "
    ):
        decode_image(_tiff(a), name="x.tif")
    with pytest.raises(
        SpecError, match=r"^cannot read image x\.npy: negative pixel values \(an int16 array with values in \["
    ):
        array_image(a.astype(np.int16), "x.npy")
    path = tmp_path / "y.tif"
    path.write_bytes(_tiff(a))
    with pytest.raises(SpecError, match="negative pixel values"):
        read_image(path)


def _int16_tiff(a: np.ndarray) -> bytes:
    """A minimal little-endian grayscale TIFF of int16 samples (BitsPerSample 16, SampleFormat 2: signed), as
    microscopy and medical software write them; Pillow opens it as mode "I" (int32) and cannot write one."""
    import struct

    h, w = a.shape
    data = a.astype("<i2").tobytes()
    tags = [(256, w), (257, h), (258, 16), (259, 1), (262, 1), (273, 0), (277, 1), (278, h), (279, len(data)), (339, 2)]
    start = 8 + 2 + 12 * len(tags) + 4  # header, then one IFD, then the strip
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, val in tags:
        long = tag in (273, 279)
        val = start if tag == 273 else val
        out += struct.pack("<HHI", tag, 4 if long else 3, 1) + struct.pack(
            "<I" if long else "<HH", *([val] if long else [val, 0])
        )
    return bytes(out + struct.pack("<I", 0)) + data


def test_a_signed_16_bit_tiff_is_scaled_by_32767_as_its_npy_is():
    a = (np.arange(64).reshape(8, 8) * 500).astype(np.int16)  # up to 31500 of 32767
    b = _int16_tiff(a)
    with Image.open(io.BytesIO(b)) as im:
        assert im.mode == "I" and im.tag_v2[258] == (16,) and im.tag_v2[339] == (2,)
    got = decode_image(b, name="s16.tif")
    assert torch.allclose(got, torch.from_numpy(a[None] / 32767.0).float())  # was divided by 2**32 - 1: black
    assert torch.equal(got, array_image(a, "s16.npy"))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_every_signed_type_is_scaled_by_its_maximum(dtype):
    """int8 was divided by 255 (as uint8) though its maximum is 127: a half-bright image, silently."""
    peak = np.iinfo(dtype).max
    a = (np.arange(64).reshape(8, 8) * (peak // 63)).astype(dtype)  # fills its range: no note, no refusal
    got = array_image(a, "x.npy")
    assert torch.allclose(got[0], torch.from_numpy(a / float(peak)).float(), atol=1e-6)
    assert float(got.max()) > 0.99


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_negative_signed_pixels_are_one_line_naming_the_type_and_the_fix(dtype):
    a = _pixels().astype(dtype)  # uint8 pixels cast to int8 wrap above 127 to negatives
    a[0, 0] = -1
    with pytest.raises(
        SpecError, match=rf"^cannot read image x\.npy: negative pixel values \(an {dtype.__name__} "
    ) as e:
        array_image(a, "x.npy")
    assert "uint8 (0-255)" in str(e.value) and "\n" not in str(e.value)
