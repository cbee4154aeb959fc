"""Safe decoding of one WebDataset sample from untrusted shards.

Only the keys the pipeline needs are ever decoded: an image (.jpg/.jpeg/.png/.webp) and an
optional integer label (.cls). Everything else in a sample (.pyd, .pth, .json, ...) is ignored
as bytes and never unpickled. Image size is checked from the header before pixels are decoded,
so a decompression bomb costs a header parse, not memory.

A label is optional data: one that is not a plain decimal integer in [0, 2**63) (non-ASCII,
signed, too long, beyond int64) makes the sample unlabelled (-1) with `label_error` saying why,
never an unusable sample: pretraining does not need labels, and one bad `.cls` must not cost
the image (evaluation, which does need labels, skips such samples itself).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"
# Only these PIL decoders may run on shard bytes: a file that claims to be a .jpg but is an EPS
# or a TIFF would otherwise reach decoders with a much larger attack surface (EPS runs
# Ghostscript).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")
_MAX_LABEL_BYTES = 32
# Labels become int64 tensors: a larger value raised "Overflow when unpacking long long" in
# torch.tensor and stopped the run, on every restart.
_MAX_LABEL = (1 << 63) - 1
_ASCII_SPACE = b" \t\r\n\x0b\x0c"


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short machine-readable counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedSample:
    image: Image.Image  # RGB
    label: int  # -1 when the sample carries no (usable) label
    label_error: str | None = None  # why a `.cls` present was not usable (label is then -1)


def decode_image(data: bytes, *, max_pixels: int, load: bool = True) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing oversized or non-image content.

    With load=False the image is only opened (header parsed, size checked) and returned in its
    own mode: a transform can then decode at reduced scale (`img.draft`) before loading.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns (and later raises) on very large images; our own bound below is the
            # one that decides, so the warning must not leak to the user per sample.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise BadSample("bad_image", f"empty image {width}x{height}")
            if width * height > max_pixels:
                raise BadSample("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            if not load:
                return img
            img.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample("image_too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated/corrupt data as OSError, some plugins as SyntaxError/ValueError.
        raise BadSample("bad_image", f"{type(exc).__name__}: {exc}") from None
    if img.mode != "RGB":
        # Grey (L), palette (P), RGBA, CMYK, 16-bit: the augmentation expects 3 channels.
        img = (
            img.convert("RGBA").convert("RGB")
            if img.mode in ("P", "LA", "PA")
            else img.convert("RGB")
        )
    return img


def decode_label(data: bytes) -> int:
    """A `.cls` field as a label in [0, 2**63); BadSample("bad_label") for anything else."""
    if len(data) > _MAX_LABEL_BYTES:
        raise BadSample("bad_label", f"label field of {len(data)} bytes")
    text = data.strip(_ASCII_SPACE)
    # bytes.isdigit is ASCII-only: int() alone would also take "+5", "1_0" and, decoded,
    # non-ASCII digits.
    if not text or not text.isdigit():
        raise BadSample("bad_label", f"not a non-negative integer: {data!r}")
    label = int(text)
    if label > _MAX_LABEL:
        raise BadSample("bad_label", f"{label} does not fit in int64")
    return label


def pick_image(fields: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in fields:
            return fields[ext]
    raise BadSample("missing_image", f"keys {sorted(fields)}")


def decode_sample(fields: dict[str, bytes], *, max_pixels: int, load: bool = True) -> DecodedSample:
    """Decode the image and label fields of one sample; raise BadSample when the image is
    unusable. A bad label does not raise: the sample comes back unlabelled, with
    `label_error` set, for the caller to count."""
    data = pick_image(fields)
    label, label_error = -1, None
    if LABEL_EXT in fields:
        try:
            label = decode_label(fields[LABEL_EXT])
        except BadSample as bad:
            label_error = bad.detail
    return DecodedSample(decode_image(data, max_pixels=max_pixels, load=load), label, label_error)
