"""Image file reading/writing: 16-bit PNG codec, EXIF orientation, atomic writes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from d3sr_core.image_files import (
    ImageData,
    ImageFileError,
    _orient,
    decode_png16,
    encode_png16,
    read_image,
    write_image,
)


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def filtered_png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG whose rows cycle through all five filter types (reference encoder)."""
    h, w, c = values.shape
    rows = values.astype(">u2").reshape(h, -1).view(np.uint8).reshape(h, -1).astype(int)
    bpp, raw, prev = 2 * c, bytearray(), np.zeros(rows.shape[1], dtype=int)
    for y, row in enumerate(rows):
        kind = y % 5
        out = []
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, cc = prev[i], (prev[i - bpp] if i >= bpp else 0)
            pred = [0, a, b, (a + b) // 2, paeth(a, b, cc)][kind]
            out.append((x - pred) & 0xFF)
        raw += bytes([kind]) + bytes(out)
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_decoder_handles_every_filter(channels):
    rng = np.random.default_rng(channels)
    values = rng.integers(0, 65536, size=(10, 7, channels), dtype=np.uint16)
    decoded = decode_png16(filtered_png16(values))
    assert np.array_equal(np.round(decoded * 65535).astype(np.uint16), values)


def test_png16_round_trip_and_pillow_agrees_on_gray():
    rng = np.random.default_rng(0)
    pixels = rng.random((9, 11, 3)).astype(np.float32)
    assert np.abs(decode_png16(encode_png16(pixels)) - pixels).max() <= 0.5 / 65535 + 1e-7
    gray = rng.random((9, 11, 1)).astype(np.float32)
    with Image.open(__import__("io").BytesIO(encode_png16(gray))) as image:
        assert image.mode == "I;16"
        assert np.array_equal(np.asarray(image), (gray[:, :, 0] * 65535 + 0.5).astype(np.uint16))


def test_png16_errors_are_named():
    with pytest.raises(ImageFileError, match="x.png.*truncated"):
        decode_png16(encode_png16(np.zeros((4, 4, 3), np.float32))[:40], "x.png")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    pixels = (rng.random((5, 8, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(pixels).save(path, exif=exif)
    expected = np.asarray(read_image(path).pixels)
    ours = _orient(pixels.astype(np.float32) / 255.0, orientation)
    assert np.array_equal(ours, expected)


def with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an ``eXIf`` chunk (a TIFF-structured EXIF block) right after IHDR."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_colour_png_orientation_is_applied(tmp_path, orientation):
    """A 16-bit RGB PNG with a real EXIF orientation tag, read at 16 bits, must be turned
    exactly as Pillow turns the same file (which Pillow reads at 8 bits: the high bytes)."""
    rng = np.random.default_rng(orientation)
    values = rng.integers(0, 65536, size=(4, 6, 3)).astype(np.uint16)
    path = tmp_path / "c.png"
    path.write_bytes(with_exif_orientation(encode_png16(values / 65535.0), orientation))
    with Image.open(path) as image:
        assert image.getexif().get(0x0112) == orientation  # the tag is really there
        expected = np.asarray(ImageOps.exif_transpose(image))
    data = read_image(path)
    assert data.bits == 16
    ours = np.round(data.pixels * 65535).astype(np.uint16)
    assert ours.shape == expected.shape == ((6, 4, 3) if orientation >= 5 else (4, 6, 3))
    assert np.array_equal(ours >> 8, expected)
    if orientation == 1:
        assert np.array_equal(ours, values)  # and the low bytes survive


def test_write_formats_and_losses(tmp_path):
    rgba16 = ImageData(np.random.default_rng(0).random((4, 5, 4)).astype(np.float32), bits=16)
    notes = write_image(tmp_path / "a.jpg", rgba16)
    assert any("alpha" in n for n in notes) and any("8-bit" in n for n in notes)
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    assert write_image(tmp_path / "a.png", rgba16) == []
    assert decode_png16((tmp_path / "a.png").read_bytes()).shape == (4, 5, 4)
    gray_alpha = ImageData(np.zeros((3, 3, 2), np.float32))
    write_image(tmp_path / "g.webp", gray_alpha)
    assert Image.open(tmp_path / "g.webp").mode == "RGBA"
    with pytest.raises(ImageFileError, match="unsupported output format"):
        write_image(tmp_path / "x.gif", gray_alpha)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png", "g.webp"]


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageFileError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageFileError, match="nope.png"):
        read_image(tmp_path / "nope.png")
