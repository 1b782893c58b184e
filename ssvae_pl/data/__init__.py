"""Files on disk -> mixed labelled/unlabelled batches: the sources of images (``sources/``, ``image_folder.py``),
how a file becomes an input (``preprocess.py``), the split (``labelled.py``) and the batches (``datamodule.py``)."""

from ssvae_pl.data.datamodule import SemiSupervisedDataModule
from ssvae_pl.data.image_folder import ImageFolder
from ssvae_pl.data.sources import CIFAR10, KMNIST, MNIST, SVHN, FashionMNIST, ImageSource

__all__ = ["CIFAR10", "KMNIST", "MNIST", "SVHN", "FashionMNIST", "ImageFolder", "ImageSource",
           "SemiSupervisedDataModule"]
