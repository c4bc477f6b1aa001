"""Reading and writing image files for the CLI (and the trainer): bit depth, gray, alpha, EXIF.

Images are handled as float32 ``[H, W, C]`` arrays in ``[0, 1]`` with C = 1 (gray),
2 (gray + alpha), 3 (RGB) or 4 (RGBA), plus the bit depth they came with (8 or 16).

* Everything Pillow reads is accepted (png, jpg, webp, tif, bmp, ...); EXIF orientation is
  applied (``ImageOps.exif_transpose``), palette/CMYK/YCbCr images become RGB(A).
* 16-bit: gray PNG/TIFF through Pillow; colour (and gray + alpha) 16-bit PNG with a small
  built-in decoder, since Pillow reduces those to 8 bits. 16-bit colour TIFF is read at 16
  bits only when OpenCV (``cv2``) is installed, else Pillow's 8 bits (with a warning).
* Writing: 16-bit output where the format allows it (PNG, and TIFF for gray), else 8 bits;
  formats without alpha (JPEG) drop it. Files are written to a temporary name in the
  target folder and renamed, so an interrupted write never leaves a half-written image.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
# Output format name -> (Pillow format, 16-bit capable, alpha capable, gray capable)
_FORMATS = {
    ".png": ("PNG", True, True, True),
    ".tif": ("TIFF", True, True, True),
    ".tiff": ("TIFF", True, True, True),
    ".jpg": ("JPEG", False, False, True),
    ".jpeg": ("JPEG", False, False, True),
    ".webp": ("WEBP", False, True, False),
    ".bmp": ("BMP", False, False, True),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageFileError(ValueError):
    """An image file cannot be read or written; the message names the file."""


@dataclass
class ImageData:
    """Pixels as float32 ``[H, W, C]`` in [0, 1] plus what is needed to write them back alike."""

    pixels: np.ndarray
    bits: int = 8
    icc_profile: bytes | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def has_alpha(self) -> bool:
        return self.channels in (2, 4)


# --------------------------------------------------------------------------- reading


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (``None`` when it is a regular file).

    Uses ``stat`` only, never ``open``: opening a FIFO blocks until a writer appears and a
    device such as ``/dev/zero`` never ends, so they are refused before any read.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot access it ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder" if stat.S_ISDIR(mode)
        else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a special file"
    )  # fmt: skip
    return f"not a regular file (it is {kind})"


def read_image(path: str | Path) -> ImageData:
    """Read an image file (see module docstring). Raises :class:`ImageFileError`.

    Folders, FIFOs, devices and sockets are refused as "not a regular file" without being
    opened (opening a FIFO would block forever).
    """
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise ImageFileError(f"{path}: {problem}")
    try:
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            icc = image.info.get("icc_profile")
            wide = _read_wide(path, image)
            if wide is not None:
                return ImageData(_orient(wide, orientation), 16, icc)
            # exif_transpose returns a new image without the file's format and TIFF tags
            notes = _narrowed_notes(path, image)
            image = ImageOps.exif_transpose(image)
            data = _from_pil(image, path, icc)
            data.warnings[:0] = notes
            return data
    except FileNotFoundError:
        raise ImageFileError(f"{path}: no such file") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        zlib.error,
        struct.error,
    ) as err:
        if isinstance(err, ImageFileError):
            raise
        raise ImageFileError(f"{path}: cannot read image ({err})") from None


def _from_pil(image: Image.Image, path: Path, icc: bytes | None) -> ImageData:
    mode = image.mode
    notes: list[str] = []
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float32) / 65535.0
        return ImageData(np.clip(array, 0, 1)[:, :, None], 16, icc)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return ImageData(np.clip(array, 0, 1)[:, :, None], 16, icc)
    if mode == "1":
        image = image.convert("L")
    elif mode in ("La", "PA"):
        image = image.convert("LA" if mode == "La" else "RGBA")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return ImageData(array, 8, icc, notes)


def _narrowed_notes(path: Path, image: Image.Image) -> list[str]:
    """The note promised when a 16-bit colour file is read at 8 bits (no decoder for it)."""
    if image.format == "TIFF" and _tiff_bits(image) > 8 and not image.mode.startswith(("I", "F")):
        return [
            f"{path.name}: 16-bit colour TIFF read as 8-bit (install opencv-python to keep 16 bits)"
        ]
    return []


def _tiff_bits(image: Image.Image) -> int:
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        return max(bits) if bits else 8
    return int(bits or 8)


def _read_wide(path: Path, image: Image.Image) -> np.ndarray | None:
    """16-bit colour / gray+alpha pixels Pillow would truncate to 8 bits, else ``None``."""
    if image.format == "PNG" and image.mode in ("RGB", "RGBA", "LA"):
        with path.open("rb") as f:
            head = f.read(33)
        if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16:
            return decode_png16(path.read_bytes(), path)
    if image.format == "TIFF" and image.mode in ("RGB", "RGBA") and _tiff_bits(image) > 8:
        try:
            import cv2
        except ImportError:
            return None
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        if data is None or data.dtype != np.uint16 or data.ndim != 3:
            return None
        data = data[:, :, [2, 1, 0, 3][: data.shape[2]]]  # BGR(A) -> RGB(A)
        return data.astype(np.float32) / 65535.0
    return None


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to ``[H, W, C]``, as ``ImageOps.exif_transpose`` does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(array)) if op else array


def decode_png16(data: bytes, path: str | Path = "<png>") -> np.ndarray:
    """Decode a non-interlaced 16-bit PNG (gray, gray+alpha, RGB, RGBA) to float32 ``[H, W, C]``."""
    if data[:8] != _PNG_SIGNATURE:
        raise ImageFileError(f"{path}: not a PNG file")
    pos, idat, header, ended = 8, [], None, False
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ImageFileError(f"{path}: truncated PNG ({kind.decode('latin-1')} chunk)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if header is None or not idat:
        problem = "PNG has no IHDR or no image data" if ended else "truncated PNG"
        raise ImageFileError(f"{path}: {problem}")
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 4: 2, 2: 3, 6: 4}.get(colour)
    if depth != 16 or channels is None:
        raise ImageFileError(
            f"{path}: expected a 16-bit gray/RGB(A) PNG (depth {depth}, colour type {colour})"
        )
    if interlace:
        raise ImageFileError(
            f"{path}: interlaced 16-bit PNGs are not supported; save it non-interlaced"
        )
    bpp = 2 * channels
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    if len(raw) < height * (stride + 1):
        raise ImageFileError(f"{path}: truncated PNG image data")
    rows = _unfilter(raw, height, stride, bpp, path)
    pixels = rows.view(">u2").reshape(height, width, channels)
    return pixels.astype(np.float32) / 65535.0


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, path) -> np.ndarray:
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        row = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if kind == 0:
            cur = row.copy()
        elif kind == 1:  # Sub: running sum per byte position within a pixel (mod 256)
            cur = np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = row + prev
        elif kind in (3, 4):
            cur = np.frombuffer(
                _unfilter_row(row.tobytes(), prev.tobytes(), bpp, kind), dtype=np.uint8
            )
        else:
            raise ImageFileError(f"{path}: bad PNG filter type {kind} in row {y}")
        out[y] = cur
        prev = out[y]
    return out


def _unfilter_row(row: bytes, prev: bytes, bpp: int, kind: int) -> bytearray:
    """PNG Average (3) / Paeth (4) reconstruction: sequential along the row, so plain Python."""
    cur = bytearray(row)
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + pred) & 0xFF
    return cur


# --------------------------------------------------------------------------- writing


def encode_png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) of float ``[H, W, C]`` pixels in [0, 1]."""
    height, width, channels = pixels.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    values = (np.clip(pixels, 0, 1) * 65535.0 + 0.5).astype(">u2").reshape(height, width * channels)
    raw = np.zeros((height, 1 + width * channels * 2), dtype=np.uint8)
    raw[:, 1:] = values.view(np.uint8).reshape(height, -1)  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def output_capabilities(suffix: str) -> tuple[bool, bool]:
    """``(16-bit capable, alpha capable)`` of an output suffix such as ``.png``."""
    _, wide, alpha, _ = _FORMATS[suffix.lower()]
    return wide, alpha


def write_image(path: str | Path, image: ImageData, *, quality: int = 95) -> list[str]:
    """Write ``image`` atomically in the format given by ``path``'s suffix.

    Returns notes about what the format could not keep (16 bits, alpha).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ImageFileError(
            f"{path}: unsupported output format {suffix!r}; use one of {sorted(_FORMATS)}"
        )
    pil_format, wide_ok, alpha_ok, gray_ok = _FORMATS[suffix]
    pixels, notes = image.pixels, []
    if pixels.shape[2] in (2, 4) and not alpha_ok:
        pixels = pixels[:, :, :-1]
        notes.append(f"{path.name}: {pil_format} has no alpha channel; alpha dropped")
    if pixels.shape[2] in (1, 2) and not gray_ok:
        pixels = np.concatenate([np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1:]], axis=2)
    wide = image.bits > 8 and wide_ok
    if image.bits > 8 and not wide:
        notes.append(
            f"{path.name}: {pil_format} holds 8 bits per channel; 16-bit input written as 8-bit"
        )
    if wide and suffix in (".tif", ".tiff") and pixels.shape[2] != 1:
        wide = _cv2_available()
        if not wide:
            notes.append(f"{path.name}: 16-bit colour TIFF needs opencv-python; written as 8-bit")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if wide and pil_format == "PNG":
            tmp.write_bytes(encode_png16(pixels))
        elif wide and pixels.shape[2] == 1:
            values = (np.clip(pixels[:, :, 0], 0, 1) * 65535.0 + 0.5).astype(np.uint16)
            Image.fromarray(values).save(tmp, format=pil_format)
        elif wide:
            import cv2

            values = (np.clip(pixels, 0, 1) * 65535.0 + 0.5).astype(np.uint16)
            order = [2, 1, 0, 3][: values.shape[2]]
            if not cv2.imwrite(str(tmp) + ".tif", values[:, :, order]):
                raise ImageFileError(f"{path}: OpenCV could not write the TIFF")
            os.replace(str(tmp) + ".tif", tmp)
        else:
            values = (np.clip(pixels, 0, 1) * 255.0 + 0.5).astype(np.uint8)
            pil = Image.fromarray(values[:, :, 0] if values.shape[2] == 1 else values)
            options: dict = {}
            if image.icc_profile and pil_format in ("PNG", "JPEG", "WEBP", "TIFF"):
                options["icc_profile"] = image.icc_profile
            if pil_format in ("JPEG", "WEBP"):
                options["quality"] = quality
            pil.save(tmp, format=pil_format, **options)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, Path(str(tmp) + ".tif")):
            leftover.unlink(missing_ok=True)
        raise
    return notes


def _cv2_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True
