"""Small folders of PNGs in the layout users train on: ``labelled/<class>/``, ``unlabelled/`` (nested), ``test/``.

Each class is a bright block at its own place and in its own colour on a dim noisy background, so a tiny model
learns it in a few steps. Corrupt files (a truncated PNG, a text file named .png) and a non-image file can be added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle")
COLOURS = ((230, 60, 60), (60, 230, 60), (60, 60, 230))


def synthetic_photo(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 image of class ``label``: a coloured block in the class's third of the image."""
    height, width = size
    image = rng.integers(10, 60, size=(height, width, 3))
    left = label * width // len(CLASSES)
    image[height // 4: 3 * height // 4, left: left + width // len(CLASSES)] = COLOURS[label]
    image += rng.integers(0, 20, size=image.shape)
    return image.clip(0, 255).astype(np.uint8)


def save(image: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image)
    (picture.convert("L") if mode == "L" else picture).save(path)


def write_image_folders(root: Path, labelled_per_class: int = 6, unlabelled: int = 30, test_per_class: int = 4,
                        size: tuple[int, int] = (40, 48), mode: str = "RGB", corrupt: bool = False,
                        seed: int = 0) -> dict[str, Path]:
    """Write ``root/labelled/<class>/*.png``, ``root/unlabelled/<batch>/*.png`` and ``root/test/<class>/*.png``
    (images of ``size`` (H, W), not square, so they are resized); with ``corrupt``, three bad files among the
    labelled and unlabelled ones. Returns the three folders."""
    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in ("labelled", "unlabelled", "test")}
    for label, name in enumerate(CLASSES):
        for i in range(labelled_per_class):
            save(synthetic_photo(label, size, rng), folders["labelled"] / name / f"{name}_{i:03d}.png", mode)
        for i in range(test_per_class):
            save(synthetic_photo(label, size, rng), folders["test"] / name / f"t{i:03d}.png", mode)
    for i in range(unlabelled):
        label = i % len(CLASSES)
        save(synthetic_photo(label, size, rng), folders["unlabelled"] / f"batch{i % 2}" / f"u{i:04d}.png", mode)
    if corrupt:
        good = (folders["labelled"] / CLASSES[0] / f"{CLASSES[0]}_000.png").read_bytes()
        (folders["labelled"] / CLASSES[1] / "truncated.png").write_bytes(good[: len(good) // 2])
        (folders["unlabelled"] / "not_a_png.png").write_text("this is text, not an image")
        (folders["unlabelled"] / "notes.txt").write_text("where these photos came from")
    return folders
