"""Write an image-folder dataset (the layout `ssvae_pl.data.ImageFolder` reads) from a dataset this machine has
offline, to try the image-folder path end to end and to compare it with the same images through torchvision:

    <out>/labelled/<class name>/<index>.png   --labelled-per-class images of each class (a seeded draw)
    <out>/unlabelled/<index // 1000>/<index>.png   --unlabelled images (no labels), from the rest of the training set
    <out>/test/<class name>/<index>.png       --test images of the official test set

Class folders are named after the dataset's classes ("/" becomes "_": Fashion-MNIST's "T-shirt_top").
--colour writes RGB images of --size pixels: each image tinted with a random colour on a random dark background
(so colour carries no class information), for the convolutional colour configs. --corrupt N adds N unreadable
files (a truncated PNG, text named .png) to show `data.on_error`. A dataset whose files are not under --data-dir
and cannot be fetched (Fashion-MNIST offline needs Debian's dataset-fashion-mnist) stops with one error line that
says what to install or where to put the files.

    python scripts/make_image_folder.py --dataset fashion_mnist --out data/folders/fashion
    F=data/folders/fashion
    ssvae fit -c configs/mnist/m2.yaml -c configs/image_folder/data.yaml --data.dataset.labelled_dir $F/labelled \
        --data.dataset.unlabelled_dir $F/unlabelled --data.dataset.test_dir $F/test \
        --data.dataset.channels 1 --data.dataset.image_size 28 --data.resize pad
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssvae_pl.data.sources import NAMED, DataSourceError, named  # noqa: E402
from ssvae_pl.errors import ConfigError  # noqa: E402

PROG = "make_image_folder"
GREY = ("fashion_mnist", "kmnist", "mnist")  # the datasets this script converts


def as_picture(image: np.ndarray, colour: bool, size: int, rng: np.random.Generator) -> Image.Image:
    """A (H, W) uint8 grey image as a PIL image: as it is, or tinted RGB of ``size`` pixels."""
    grey = Image.fromarray(image)
    if not colour:
        return grey
    grey = grey.resize((size, size), Image.BILINEAR)
    alpha = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    foreground = rng.uniform(120, 255, size=3)
    background = rng.uniform(0, 90, size=3)
    rgb = alpha * foreground + (1 - alpha) * background + rng.normal(0, 6, size=alpha.shape[:2] + (3,))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def load_dataset(name: str, data_dir: str) -> tuple[list[str], tuple, tuple]:
    """The class names and the (images, labels) of the training and test sets of dataset ``name``; a dataset whose
    files cannot be found or fetched stops the script with one ``make_image_folder: error:`` line, exit 2."""
    try:
        dataset = named(name, data_dir)
        dataset.prepare()
        return dataset.class_names, dataset.load(train=True), dataset.load(train=False)
    except (DataSourceError, ConfigError) as err:
        others = ", ".join(f"--dataset {other}" for other in GREY if other != name)
        print(f"{PROG}: error: {' '.join(str(err).split())} Or pick another dataset ({others}).", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(NAMED))
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labelled-per-class", type=int, default=10)
    parser.add_argument("--unlabelled", type=int, default=20000)
    parser.add_argument("--test", type=int, default=2000, help="test images (the first of the official test set)")
    parser.add_argument("--colour", action="store_true")
    parser.add_argument("--size", type=int, default=32, help="image size with --colour")
    parser.add_argument("--corrupt", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty; pick a new folder (nothing is overwritten).")
    if args.dataset not in GREY:
        parser.error(f"this script converts the grey datasets ({', '.join(GREY)}), not {args.dataset}")
    class_names, (train_x, train_y), (test_x, test_y) = load_dataset(args.dataset, args.data_dir)
    names = [name.replace("/", "_") for name in class_names]
    rng = np.random.default_rng(args.seed)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    labelled = torch.cat([order[train_y[order] == c][: args.labelled_per_class] for c in range(len(names))])
    rest = order[~torch.isin(order, labelled)][: args.unlabelled]
    written = 0
    for i in labelled.tolist():
        path = args.out / "labelled" / names[train_y[i]] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        as_picture(train_x[i, 0].numpy(), args.colour, args.size, rng).save(path)
        written += 1
    for i in rest.tolist():
        path = args.out / "unlabelled" / f"{i // 1000:02d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        as_picture(train_x[i, 0].numpy(), args.colour, args.size, rng).save(path)
        written += 1
    for i in range(min(args.test, len(test_y))):
        path = args.out / "test" / names[test_y[i]] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        as_picture(test_x[i, 0].numpy(), args.colour, args.size, rng).save(path)
        written += 1
    some_png = next((args.out / "unlabelled").rglob("*.png")).read_bytes()
    for k in range(args.corrupt):
        bad = args.out / "unlabelled" / "corrupt" / f"bad{k:02d}.png"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(some_png[: len(some_png) // 3] if k % 2 == 0 else b"not an image")
    print(f"{written} images written to {args.out} ({len(labelled)} labelled, {len(rest)} unlabelled, "
          f"{min(args.test, len(test_y))} test; {args.corrupt} corrupt files); classes: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
