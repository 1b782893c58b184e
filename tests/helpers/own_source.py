"""A source of images of one's own, for the tests: ``ssvae fit --data.dataset helpers.own_source.Stripes`` by class path."""

from __future__ import annotations

import torch

from ssvae_pl.data import ImageSource


class Stripes(ImageSource):
    """``n`` training and ``n // 4`` test images, 1 x 8 x 8, of two classes: a light row or a light column."""

    def __init__(self, n: int = 200, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    @property
    def class_names(self) -> list[str]:
        return ["row", "column"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def _images(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 2
        images = torch.randint(0, 40, (n, 1, 8, 8), generator=generator, dtype=torch.uint8)
        where = torch.randint(0, 8, (n,), generator=generator)
        for i in range(n):
            if labels[i] == 0:
                images[i, 0, where[i], :] = 250
            else:
                images[i, 0, :, where[i]] = 250
        return images, labels

    def train_split(self, preprocessing, on_error):
        return *self._images(self.n, self.seed), None

    def test_split(self, preprocessing, on_error):
        return self._images(self.n // 4, self.seed + 1)

    def config(self) -> dict:
        return {"class_path": "helpers.own_source.Stripes", "init_args": {"n": self.n, "seed": self.seed}}
