"""The user's own images, from a folder, for ``ssvae predict --data.predict_dir my_images/``.

An image of any size, mode or format becomes what the test set's images are: uint8 grey levels of the model's
input shape (C, H, W), a light digit on a dark background as in MNIST. The data module then treats them exactly as
the test set: binarised once with a fixed seed unless ``data.binarize`` is ``none``, scaled to [0, 1] on the
device. On the way, each image is

1. read with Pillow (transparency composited over white, as on a page), converted to grey (RGB for C = 3);
2. inverted when its polarity is not MNIST's (``invert``: ``auto`` decides by the border's brightness);
3. padded to a square with its border's grey level, so the digit keeps its aspect ratio;
4. resized to H x W with antialiasing (torchvision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torchvision.transforms.v2 import functional as TF

from ssvae_pl.errors import ConfigError, ImageReadError

# What Pillow reads; other files in the folder (notes, CSVs) are not images and are left alone.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
                    ".pnm")
Invert = bool | Literal["auto"]
OnError = Literal["skip", "fail"]


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder``, recursively, by extension (any case), sorted by their path in it."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"data.predict_dir: {folder} is not a folder; pass the folder that holds your images.")
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ConfigError(f"data.predict_dir: {folder} holds no images (searched recursively for "
                          f"{', '.join(IMAGE_EXTENSIONS)}).")
    return files


def read_image(path: Path, channels: int = 1) -> torch.Tensor:
    """The pixels of an image file as uint8 (C, H, W): grey for C = 1, RGB for C = 3. Raises ``ImageReadError``
    naming the file when Pillow cannot decode it."""
    try:
        with Image.open(path) as image:
            if "A" in image.getbands() or "transparency" in image.info:  # over a white page
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert("L" if channels == 1 else "RGB")  # decodes the whole file
    except Exception as err:  # Pillow's decoders raise many kinds: OSError, SyntaxError, ValueError, ...
        raise ImageReadError(f"{path} cannot be read as an image ({type(err).__name__}: {str(err)[:120]})") from None
    return TF.pil_to_tensor(image)  # (C, H, W) uint8


def border_brightness(image: torch.Tensor) -> float:
    """Mean grey level (0-255) of the outer band of an image (C, H, W), 1/14 of its shorter side wide (2 pixels
    of 28): the background, where a digit is centred as in MNIST."""
    width = max(1, min(image.shape[-2:]) // 14)
    inner = torch.zeros(image.shape[-2:], dtype=torch.bool)
    inner[width:-width, width:-width] = True
    return image[:, ~inner].float().mean().item()


def to_model_input_shape(image: torch.Tensor, shape: Sequence[int], invert: Invert = "auto") -> torch.Tensor:
    """uint8 (C, h, w) of any size -> uint8 ``shape`` (C, H, W) in MNIST's polarity (a light digit on a dark
    background). ``invert``: ``True``, ``False``, or ``auto``: invert when the border is brighter than mid-grey
    (a dark digit on light paper)."""
    if invert == "auto":
        invert = border_brightness(image) > 127.5
    if invert:
        image = TF.invert(image)
    height, width = image.shape[-2:]
    if height != width:  # a square first, so the resize keeps the digit's aspect ratio
        background = round(border_brightness(image))
        left, top = (max(height, width) - width) // 2, (max(height, width) - height) // 2
        image = TF.pad(image, [left, top, max(height, width) - width - left, max(height, width) - height - top],
                       fill=background)
    if tuple(image.shape[-2:]) != tuple(shape[-2:]):
        image = TF.resize(image, list(shape[-2:]), antialias=True)
    return image


def load_image_folder(folder: str | Path, shape: Sequence[int], invert: Invert = "auto",
                      on_error: OnError = "fail") -> tuple[torch.Tensor, list[str]]:
    """Every image under ``folder`` as uint8 (N, C, H, W) of ``shape``, with the paths relative to ``folder``.

    An unreadable image stops everything (``on_error: fail``: ``ImageReadError`` naming it), or is left out with a
    warning naming it (``skip``); a folder with no readable image at all is an error either way.
    """
    files = find_images(folder)
    images, names = [], []
    for path in files:
        try:
            image = read_image(path, channels=shape[0])
        except ImageReadError as err:
            if on_error == "fail":
                raise ImageReadError(f"data.predict_dir: {err}; fix or remove it, or pass --data.on_error skip to "
                                     "predict the other images.") from None
            rank_zero_warn(f"skipped an unreadable image: {err}")
            continue
        images.append(to_model_input_shape(image, shape, invert))
        names.append(path.relative_to(folder).as_posix())
    if not images:
        raise ConfigError(f"data.predict_dir: none of the {len(files)} images in {folder} can be read.")
    return torch.stack(images), names
