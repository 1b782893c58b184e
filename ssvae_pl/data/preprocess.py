"""An image file of any size, mode or format to a model input: one ``Preprocessing`` for training folders, ``ssvae
predict`` and the exports (``ssvae export`` writes its ``spec()``, which the README's ONNX Runtime snippet follows).
1. Read with Pillow; 16-bit grey scaled to 8 (round(v / 257); floats in [0, 1] times 255); transparency composited
   over white; converted to grey (``L``, C = 1) or ``RGB``.
2. Inverted if ``invert`` is true, or ``auto`` and the border band (1/14 of the shorter side, at least one pixel)
   averages above 127.5 (MNIST's digits are light on black).
3. Fitted to H x W, bilinear, antialiased: ``pad`` resizes to fit and pads with the band's mean colour, rounded
   (``ImageOps.pad``); ``crop`` takes the centre (``ImageOps.fit``); ``stretch`` resizes; ``content`` crops to the
   content (``content_square``), then pads as ``pad`` does, with the whole image's border colour.
4. uint8 (C, H, W); the model's input is that / 255 in float32 (the data module does it on the device)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from ssvae_pl.errors import ImageReadError

Invert = bool | Literal["auto"]
Resize = Literal["pad", "crop", "stretch", "content"]
MODES = {1: "L", 3: "RGB"}
HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # grey modes of more than 8 bits
CONTENT_THRESHOLD = 51  # 20% of 255: a pixel further than this from the border colour (on any channel) is content
CONTENT_MARGIN = 0.2  # MNIST: a 20 x 20 digit centred in 28 x 28, 4 = 0.2 * 20 pixels on each side
CONTENT_SPEC = ("a = the image as float (H, W, C); c = (abs(a - border(image)) > 51).any(axis=2); no True in c: as "
                "pad. Else y0, y1 = first and last row of c holding a True, x0, x1 = first and last column; h, w = "
                "y1 + 1 - y0, x1 + 1 - x0; s = max(h, w) + 2 * round(0.2 * max(h, w)); the s x s square whose top "
                "left corner is (x0 - (s - w) // 2, y0 - (s - h) // 2), cut from the image, its parts outside the "
                "image filled with fill = round(border(image)); then ImageOps.pad(square, size, Image.BILINEAR, "
                "color=fill) as for pad.")


def to_8_bits(image: Image.Image) -> Image.Image:
    """A grey image of more than 8 bits as ``L``: 16-bit (``I;16*``, and ``I`` whose maximum exceeds 255) as
    round(v / 257); ``I`` up to 255 as it is; float ``F`` as v * 255 when its maximum is at most 1, else clipped to
    0..255. A transparent value (``transparency``) becomes white. Other modes are returned as they are."""
    if image.mode not in HIGH_BIT_DEPTH:
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values)
        scaled = values * 255 if values.max() <= 1 else values
    else:
        sixteen_bit = image.mode.startswith("I;16") or values.max() > 255
        scaled = values.clip(0, 65535) / 257 if sixteen_bit else values
    grey = np.rint(scaled.clip(0, 255)).astype(np.uint8)
    if isinstance(image.info.get("transparency"), (int, float)):
        grey[values == image.info["transparency"]] = 255  # over a white page
    return Image.fromarray(grey)  # 2-D uint8: mode L


def read_image(path: Path, mode: str = "L") -> Image.Image:
    """Step 1: the file as a Pillow image of ``mode``; ``ImageReadError`` naming the file when Pillow cannot."""
    try:
        with Image.open(path) as image:
            image = to_8_bits(image)  # Pillow's convert would clip 16-bit and float grey to 0..255
            if "A" in image.getbands() or "transparency" in image.info:  # over a white page
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return image.convert(mode)  # decodes the whole file
    except Exception as err:  # Pillow's decoders raise many kinds: OSError, SyntaxError, ValueError, ...
        raise ImageReadError(f"{path} cannot be read as an image ({type(err).__name__}: {str(err)[:120]})") from None


def border_colour(image: Image.Image) -> np.ndarray:
    """Mean of each channel over the outer band of ``image``, 1/14 of its shorter side wide (at least 1 pixel):
    the background, where a digit is centred as in MNIST. (C,) float64 in [0, 255]."""
    pixels = np.asarray(image, dtype=np.float64).reshape(image.height, image.width, -1)
    band = max(1, min(image.height, image.width) // 14)
    inner = pixels[band:-band, band:-band]
    outer_count = pixels.shape[0] * pixels.shape[1] - inner.shape[0] * inner.shape[1]
    return (pixels.sum(axis=(0, 1)) - inner.sum(axis=(0, 1))) / max(1, outer_count)


def content_square(image: Image.Image, border: np.ndarray) -> Image.Image | None:
    """The square around the content of ``image`` (pixels further than ``CONTENT_THRESHOLD`` from ``border``, its
    border colour, on some channel): the content's bounding box, squared about its centre on the longer side, with
    a margin of 20% of that side on every side (MNIST's 20 in 28), parts outside the image filled with the border
    colour; ``None`` for a blank image. ``CONTENT_SPEC`` says it step by step."""
    pixels = np.asarray(image, dtype=np.float64).reshape(image.height, image.width, -1)
    content = (np.abs(pixels - border) > CONTENT_THRESHOLD).any(axis=2)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if rows.size == 0:
        return None
    top, left, height, width = int(rows[0]), int(cols[0]), int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0])
    side = max(height, width) + 2 * round(CONTENT_MARGIN * max(height, width))
    top, left = top - (side - height) // 2, left - (side - width) // 2
    fill = tuple(round(v) for v in border)
    square = Image.new(image.mode, (side, side), fill[0] if len(fill) == 1 else fill)
    square.paste(image.crop((max(left, 0), max(top, 0), min(left + side, image.width), min(top + side, image.height))),
                 (max(-left, 0), max(-top, 0)))
    return square


@dataclass(frozen=True)
class Preprocessing:
    """Steps 1-4 for the model input ``shape`` (C, H, W): ``prepare`` a Pillow image, or call it on a file."""

    shape: tuple[int, int, int]
    invert: Invert = False
    resize: Resize = "pad"

    def prepare(self, image: Image.Image) -> Image.Image:
        """Steps 2 and 3 on an image of the right mode."""
        if self.invert is True or (self.invert == "auto" and border_colour(image).mean() > 127.5):
            image = ImageOps.invert(image)
        size = (self.shape[2], self.shape[1])  # Pillow's (W, H)
        if image.size == size and self.resize != "content":
            return image
        if self.resize in ("pad", "content"):
            border = border_colour(image)
            fill = tuple(round(v) for v in border)
            square = content_square(image, border) if self.resize == "content" else None
            image = image if square is None else square  # pad, or content of a blank image: the whole image
            return ImageOps.pad(image, size, Image.BILINEAR, color=fill[0] if len(fill) == 1 else fill)
        if self.resize == "crop":
            return ImageOps.fit(image, size, Image.BILINEAR)
        return image.resize(size, Image.BILINEAR)

    def __call__(self, path: Path) -> torch.Tensor:
        """The file as uint8 (C, H, W)."""
        return pil_to_tensor(self.prepare(read_image(path, MODES[self.shape[0]])))

    def spec(self) -> dict[str, Any]:
        """The steps as JSON, for the exports: what a program without this package does to a file."""
        spec = {"mode": MODES[self.shape[0]], "invert": self.invert, "resize": self.resize,
                "size": [self.shape[2], self.shape[1]], "scale": "pixel / 255", "layout": "(B, C, H, W) float32",
                "border_band": "min(width, height) // 14, at least 1", "resample": "bilinear (Pillow)"}
        if self.resize == "content":
            spec["resize_content"] = CONTENT_SPEC
        return spec


def preprocessing_of(input_shape: Sequence[int], data_hparams: Mapping[str, Any]) -> Preprocessing:
    """The ``Preprocessing`` of a data module's settings (``data.invert``, ``data.resize``), also as a checkpoint
    records them for ``ssvae export``. ``invert: auto`` judges each image by its border for a named dataset (digits,
    in MNIST's polarity); a source given by class path (the user's own folders) is taken as it is."""
    invert = data_hparams.get("invert", "auto")
    if invert == "auto" and not isinstance(data_hparams.get("dataset", "mnist"), str):
        invert = False
    return Preprocessing(tuple(input_shape), invert, data_hparams.get("resize", "pad"))
