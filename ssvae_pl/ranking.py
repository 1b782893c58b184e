"""Which images to label next: scores from a classifier's q(y|x) (and a generative model's bounds), and the order of
the picks (``ssvae suggest``). Plain functions of tensors; a higher score means "label it sooner"
(docs/why-suggest-ranking.md: why not baal's or modAL's).

    entropy  H(q(y|x)) = -sum_y q(y|x) log q(y|x)
    margin   1 - (q(y1|x) - q(y2|x)), y1 and y2 the two most probable classes
    bound    H(p(y|x)) of the generative model's own posterior, p(y|x) = softmax_y L(x, y) (L with its log p(y))
    spread   margin, picked in turn from each predicted class, so a batch is not one confusion repeated
    random   a seeded random order: the baseline
"""

from __future__ import annotations

import torch

from ssvae_pl.elbo import categorical_entropy

STRATEGIES = ("entropy", "margin", "bound", "spread", "random")
CLASSIFIER_STRATEGIES = frozenset({"entropy", "margin", "spread", "random"})  # from q(y|x) alone
NEEDS_BOUNDS = frozenset({"bound"})  # the strategies that need L(x, y) for every class


def margin(probs: torch.Tensor) -> torch.Tensor:
    """1 minus the gap between the two most probable classes (N, K) -> (N,): 1 for a tie, 0 for certainty."""
    top = probs.topk(2, dim=-1).values
    return 1.0 - (top[:, 0] - top[:, 1])


def scores(strategy: str, probs: torch.Tensor, class_bounds: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The score of each image (N,) under ``strategy``: from q(y|x)'s probabilities (N, K) and, for ``bound``, the
    bound L(x, y) of every class (N, K)."""
    if strategy == "entropy":
        return categorical_entropy(probs)
    if strategy in ("margin", "spread"):
        return margin(probs)
    if strategy == "bound":
        if class_bounds is None:
            raise ValueError("the bound strategy needs L(x, y) of every class")
        return categorical_entropy(class_bounds.float().softmax(dim=-1))
    if strategy == "random":
        return torch.rand(len(probs), generator=generator)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def pick(strategy: str, score: torch.Tensor, predicted: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` images to label, in rank order: the highest scores, or for ``spread`` the highest
    of each predicted class in turn (the classes ordered by their best score; a class with none left is skipped)."""
    order = torch.argsort(score, descending=True, stable=True)
    if strategy != "spread":
        return order[:count]
    by_class = [order[predicted[order] == k] for k in predicted[order].unique(sorted=False).tolist()]
    by_class.sort(key=lambda members: -float(score[members[0]]))
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        layer = [int(members[depth]) for members in by_class if depth < len(members)]
        if not layer:
            break
        picked += layer[:count - len(picked)]
        depth += 1
    return torch.tensor(picked, dtype=torch.long)
