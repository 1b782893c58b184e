"""The user's own images, from folders: to train on (``ImageFolder``, a ``data.dataset`` given by class path) and
to predict (``ssvae predict --data.predict_dir my_images/``). Each image, of any size, mode or format, becomes uint8
(C, H, W) of the model's input shape by ``Preprocessing`` (``preprocess.py``); the data module scales it to [0, 1]
on the device (and, for training, binarises it if ``data.binarize`` asks).

Training folders (``image_folder_pool``): ``labelled_dir`` holds one sub-folder per class (torchvision's
``ImageFolder`` layout; the classes are the sorted sub-folder names), ``unlabelled_dir`` any tree of images. Small
folders are decoded once into one uint8 tensor (``in_memory``), large ones batch by batch in the DataLoader's workers
(``FolderImages``). Unreadable or non-image files are listed and either stop the run before anything trains
(``on_error: fail``) or are left out with one warning that lists them (``skip``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ssvae_pl.data.labelled import UNLABELLED
from ssvae_pl.data.preprocess import Preprocessing
from ssvae_pl.data.sources.base import ImageSource, OnError
from ssvae_pl.errors import ConfigError, ImageReadError

# What Pillow reads; other files in the folder (notes, CSVs) are not images and are left alone.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
                    ".pnm")
IN_MEMORY_LIMIT_BYTES = 4 * 2**30  # in_memory: auto holds a training pool of up to 4 GiB of uint8 pixels in memory


def _files_under(root: Path, field: str | None = None) -> tuple[list[Path], list[str]]:
    """Every file under ``root``, recursively (linked folders too, each once), hidden ones (``.DS_Store``,
    ``.ipynb_checkpoints/...``) left out, sorted by their path in it; and a line for each folder that cannot be
    listed (for ``_report_unreadable``).
    With ``field``, ``root`` itself unlistable is a ``ConfigError`` naming it."""
    unlisted: list[OSError] = []
    files = []
    seen: set[tuple[int, int]] = set()  # linked folders are followed, each folder once (a link loop ends)
    for folder, subfolders, names in os.walk(root, onerror=unlisted.append, followlinks=True):
        try:
            identity = os.stat(folder)
        except OSError:
            continue
        if (identity.st_dev, identity.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((identity.st_dev, identity.st_ino))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        # files, and broken links (then reported as unreadable); not FIFOs or devices, whose reading would block
        files += [path for path in (Path(folder, name) for name in names if not name.startswith("."))
                  if path.is_file() or (path.is_symlink() and not path.exists())]
    lines = [f"{err.filename} cannot be listed ({type(err).__name__}: {err.strerror or err})" for err in unlisted]
    if field is not None and unlisted and Path(os.fsdecode(unlisted[0].filename)) == root:
        raise ConfigError(f"{field}: {lines[0]}; give this user permission to read it (chmod u+rx {root}), or pass "
                          "another folder.")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix()), lines


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(folder: str | Path, field: str = "data.predict_dir") -> tuple[list[Path], list[str]]:
    """Image files under ``folder``, recursively, by extension (any case), sorted by their path in it (other
    files, notes or CSVs, are left alone); and the sub-folders that cannot be listed, as ``_files_under`` gives
    them."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{field}: {folder} is not a folder; pass the folder that holds your images.")
    found, unlisted = _files_under(root, field)
    files = [p for p in found if is_image_file(p)]
    if not files and not unlisted:
        raise ConfigError(f"{field}: {folder} holds no images (searched recursively for "
                          f"{', '.join(IMAGE_EXTENSIONS)}).")
    return files, unlisted


# ---- training folders ------------------------------------------------------------------------------------------


@dataclass
class FolderImages:
    """Images left on disk: the files, decoded (``load``) when a batch is drawn, in the DataLoader's workers when
    it has some. Indexing by a tensor or list of indices gives the subset, still on disk. The data module uses it
    wherever it would use a uint8 (N, C, H, W) tensor."""

    files: list[Path]
    preprocessing: Preprocessing
    device: torch.device = field(default=torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> FolderImages:
        return FolderImages([self.files[i] for i in torch.as_tensor(index).flatten().tolist()], self.preprocessing)

    def to(self, device) -> FolderImages:
        """Files stay on disk (and batches in host memory until Lightning moves them)."""
        return self

    def load(self) -> torch.Tensor:
        """The images as uint8 (N, C, H, W); an unreadable file raises ``ImageReadError`` naming it."""
        return torch.stack([self.preprocessing(path) for path in self.files])


def _try(preprocessing: Preprocessing, path: Path) -> torch.Tensor | str:
    try:
        return preprocessing(path)
    except ImageReadError as err:
        return str(err)


def _check_header(path: Path) -> str | None:
    """A cheap check for images left on disk: Pillow identifies the file and verifies its structure."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        return f"{path} cannot be read as an image ({type(err).__name__}: {str(err)[:120]})"
    return None


def _report_unreadable(problems: list[str], field: str, on_error: OnError, use: str = "train on",
                       unlisted: Sequence[str] = ()) -> None:
    """One error (``fail``) or one warning (``skip``) listing every file that is left out, and why, and every folder
    that cannot be listed (``unlisted``, whose images are left out)."""
    if not problems and not unlisted:
        return
    everything = [*unlisted, *problems]
    shown = "; ".join(everything[:20]) + (f"; and {len(everything) - 20} more" if len(everything) > 20 else "")
    counted = " and ".join(([f"{len(unlisted)} folder(s)"] if unlisted else [])
                           + ([f"{len(problems)} file(s)"] if problems else []))
    if on_error == "fail":
        permission = " (give this user permission to read a folder: chmod u+rx <folder>)" if unlisted else ""
        raise ImageReadError(f"{field}: {counted} cannot be used: {shown}. Fix or remove them{permission}, or pass "
                             f"--data.on_error skip to {use} the others.")
    rank_zero_warn(f"{field}: skipped {counted} that cannot be used: {shown}")


def read_training_images(files: list[Path], preprocessing: Preprocessing, field: str, on_error: OnError,
                         decode: bool = True, use: str = "train on", unlisted: Sequence[str] = ()
                         ) -> tuple[torch.Tensor | FolderImages, list[Path]]:
    """The usable ones of ``files`` and their images: decoded into one uint8 tensor (``decode``, in threads:
    Pillow's decoders release the GIL), or left on disk as ``FolderImages`` after a header check of each. Files
    that are not images by their extension, or cannot be read, are reported by ``_report_unreadable`` with the
    folders that could not be listed (``unlisted``)."""
    problems = [f"{path} is not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})"
                for path in files if not is_image_file(path)]
    candidates = [path for path in files if is_image_file(path)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        if decode:
            results = list(pool.map(lambda path: _try(preprocessing, path), candidates))
        else:
            results = list(pool.map(_check_header, candidates))
    kept = [path for path, result in zip(candidates, results) if not isinstance(result, str)]
    problems += [result for result in results if isinstance(result, str)]
    _report_unreadable(problems, field, on_error, use, unlisted)
    if not decode:
        return FolderImages(kept, preprocessing), kept
    images = [result for result in results if not isinstance(result, str)]
    return (torch.stack(images) if images else torch.empty(0, *preprocessing.shape, dtype=torch.uint8)), kept


def load_image_folder(folder: str | Path, preprocessing: Preprocessing,
                      on_error: OnError = "fail") -> tuple[torch.Tensor, list[str]]:
    """Every image under ``folder`` (``data.predict_dir``) as uint8 (N, C, H, W), made by ``preprocessing`` as the
    training images are, with the paths relative to ``folder``. Unreadable images are reported as the training
    folders' are (one error listing them all, or one warning with ``on_error: skip``); a folder with no readable
    image at all is an error either way."""
    files, unlisted = find_images(folder)
    images, kept = read_training_images(files, preprocessing, "data.predict_dir", on_error, use="predict",
                                        unlisted=unlisted)
    if not kept:
        unreadable = f" (and {len(unlisted)} folder(s) in it cannot be listed)" if unlisted else ""
        raise ConfigError(f"data.predict_dir: none of the {len(files)} images in {folder} can be read{unreadable}.")
    return images, [path.relative_to(Path(folder)).as_posix() for path in kept]


def class_folders(labelled_dir: str | Path, field: str = "data.dataset.labelled_dir") -> list[str]:
    """The class names: the sorted sub-folders of ``labelled_dir``, as torchvision's ``ImageFolder`` finds them,
    hidden ones (``.ipynb_checkpoints``) left out."""
    root = Path(labelled_dir)
    if not root.is_dir():
        raise ConfigError(f"{field}: {labelled_dir} is not a folder; pass the folder that holds one sub-folder of "
                          "images per class.")
    try:
        with os.scandir(root) as entries:
            classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    except OSError as err:
        raise ConfigError(f"{field}: {labelled_dir} cannot be listed ({type(err).__name__}: {err.strerror or err}); "
                          f"give this user permission to read it (chmod u+rx {labelled_dir}).") from None
    if not classes:
        raise ConfigError(f"{field}: {labelled_dir} holds no class sub-folders; put each class's labelled images "
                          "in a sub-folder named after the class (cat/, dog/, ...).")
    if len(classes) < 2:
        raise ConfigError(f"{field}: {labelled_dir} holds one class ({classes[0]!r}); a classifier needs at least "
                          "two class sub-folders.")
    return classes


def _labelled_files(folder: Path, class_names: Sequence[str], field: str
                    ) -> tuple[list[Path], list[int], list[str]]:
    """The files of each class folder, their labels, and the folders that cannot be listed."""
    files, labels, unlisted = [], [], []
    for index, name in enumerate(class_names):
        if not (folder / name).is_dir():  # a class absent from test_dir
            continue
        found, cannot = _files_under(folder / name)
        files += found
        labels += [index] * len(found)
        unlisted += cannot
    return files, labels, unlisted


def _check_every_class(labels: list[int], class_names: Sequence[str], folder: Path, field: str) -> None:
    counts = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(class_names))
    empty = [class_names[c] for c in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise ConfigError(f"{field}: the class folder(s) {', '.join(str(folder / n) for n in empty)} hold no usable "
                          "image; every class needs labelled images (add some, or remove the folder).")


def image_folder_pool(labelled_dir: str | Path, unlabelled_dir: str | Path | None, preprocessing: Preprocessing,
                      on_error: OnError, in_memory: bool | Literal["auto"] = "auto"
                      ) -> tuple[torch.Tensor | FolderImages, torch.Tensor, list[str], list[str]]:
    """The training pool of an image folder dataset: its labelled images (class by class) then its unlabelled
    ones, as a uint8 tensor or ``FolderImages``; the labels (``UNLABELLED`` for the unlabelled ones); the class
    names; and each image's path (``labelled/<class>/...`` or ``unlabelled/...``, relative to its folder)."""
    class_names = class_folders(labelled_dir)
    labelled_root = Path(labelled_dir)
    files, labels, unlisted = _labelled_files(labelled_root, class_names, "data.dataset.labelled_dir")
    unlabelled_files = []
    if unlabelled_dir is not None:
        unlabelled_root = Path(unlabelled_dir)
        if not unlabelled_root.is_dir():
            raise ConfigError(f"data.dataset.unlabelled_dir: {unlabelled_dir} is not a folder; pass the folder that "
                              "holds your unlabelled images, or leave it out (null) to train on the labelled ones "
                              "alone.")
        unlabelled_files, cannot = _files_under(unlabelled_root, "data.dataset.unlabelled_dir")
        unlisted += cannot
        if not cannot and not any(is_image_file(path) for path in unlabelled_files):
            raise ConfigError(f"data.dataset.unlabelled_dir: {unlabelled_dir} holds no images (searched recursively "
                              f"for {', '.join(IMAGE_EXTENSIONS)}); put your unlabelled images there, or leave it "
                              "out (null) to train on the labelled ones alone.")
    all_files = files + unlabelled_files
    if in_memory == "auto":
        in_memory = len(all_files) * preprocessing.shape[0] * preprocessing.shape[1] * preprocessing.shape[2] \
            <= IN_MEMORY_LIMIT_BYTES
    decode = bool(in_memory)
    images, kept = read_training_images(all_files, preprocessing,
                                        "data.dataset.labelled_dir / data.dataset.unlabelled_dir", on_error, decode,
                                        unlisted=unlisted)
    label_of = dict(zip(files, labels))
    kept_labels = [label_of.get(path, UNLABELLED) for path in kept]
    _check_every_class([y for y in kept_labels if y != UNLABELLED], class_names, labelled_root,
                       "data.dataset.labelled_dir")
    names = [f"labelled/{p.relative_to(labelled_root).as_posix()}" if p in label_of
             else f"unlabelled/{p.relative_to(unlabelled_dir).as_posix()}" for p in kept]
    return images, torch.tensor(kept_labels, dtype=torch.int64), class_names, names


def labelled_folder(folder: str | Path, class_names: Sequence[str], preprocessing: Preprocessing, on_error: OnError,
                    field: str = "data.dataset.test_dir") -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of labelled images (one sub-folder per class) in memory, labelled by ``class_names`` (the
    training classes): a sub-folder that is not one of them is an error. A class may be absent."""
    classes = class_folders(folder, field)
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise ConfigError(f"{field}: the class folder(s) {unknown} of {folder} are not classes of "
                          f"data.dataset.labelled_dir ({', '.join(class_names)}); rename or remove them.")
    files, labels, unlisted = _labelled_files(Path(folder), class_names, field)
    images, kept = read_training_images(files, preprocessing, field, on_error, decode=True, unlisted=unlisted)
    if not kept:
        raise ConfigError(f"{field}: {folder} holds no usable image.")
    label_of = dict(zip(files, labels))
    return images, torch.tensor([label_of[p] for p in kept], dtype=torch.int64)


class ImageFolder(ImageSource):
    """Your own images (``--data.dataset ImageFolder``): ``labelled_dir`` holds one sub-folder of images per class
    (torchvision's ImageFolder layout; the classes are the sorted sub-folder names, kept in the model's checkpoint),
    ``unlabelled_dir`` any tree of images without labels (``null``: none), ``test_dir`` labelled test images laid out
    as ``labelled_dir`` (``ssvae test``; ``null``: none). Every image is brought to ``channels`` x ``image_size``
    ((H, W), or one number for a square) by the data module's preprocessing (``data.resize``; as it is, not
    inverted, unless ``data.invert`` says otherwise). ``in_memory``: decode the training images once into memory
    (``true``), or keep them on disk and decode each batch in the DataLoader's workers (``false``; pair it with
    ``data.num_workers``); ``auto``: in memory up to 4 GiB of pixels. Labelled, validation and test images are
    always held in memory."""

    def __init__(self, labelled_dir: str, unlabelled_dir: str | None = None, test_dir: str | None = None,
                 image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                 in_memory: bool | Literal["auto"] = "auto") -> None:
        if labelled_dir is None:
            raise ConfigError("data.dataset.labelled_dir is required for an ImageFolder: a folder with one sub-folder "
                              "of labelled images per class (cat/, dog/, ...).")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is None or len(image_size) != 2 or min(image_size) <= 0:
            raise ConfigError(f"data.dataset.image_size must be set for an ImageFolder, as one positive number or "
                              f"[height, width] (e.g. 32 or [32, 32]); got {image_size!r}.")
        if channels not in (1, 3):
            raise ConfigError(f"data.dataset.channels must be 1 (grey) or 3 (RGB) for an ImageFolder; got "
                              f"{channels!r}.")
        if in_memory not in (True, False, "auto"):
            raise ConfigError(f"data.dataset.in_memory must be true, false or auto, got {in_memory!r}.")
        self.labelled_dir, self.unlabelled_dir, self.test_dir = labelled_dir, unlabelled_dir, test_dir
        self.image_size, self.channels, self.in_memory = tuple(image_size), channels, in_memory
        self._class_names = class_folders(labelled_dir)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    def train_split(self, preprocessing: Preprocessing, on_error: OnError
                    ) -> tuple[torch.Tensor | FolderImages, torch.Tensor, list[str]]:
        images, labels, _, files = image_folder_pool(self.labelled_dir, self.unlabelled_dir, preprocessing, on_error,
                                                     self.in_memory)
        return images, labels, files

    def test_split(self, preprocessing: Preprocessing, on_error: OnError) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.test_dir is None:
            return None
        return labelled_folder(self.test_dir, self._class_names, preprocessing, on_error)

    def config(self) -> dict:
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {"labelled_dir": self.labelled_dir, "unlabelled_dir": self.unlabelled_dir,
                              "test_dir": self.test_dir, "image_size": list(self.image_size),
                              "channels": self.channels, "in_memory": self.in_memory}}
