"""This site's part of the CIFAR-10 training set (or of the embedded fallback).

``cifar10_data.load_data()`` cuts the training set into IID shards by site index
(``split="iid"``) or gives every site all of it (``"full"``). With ``alpha > 0`` the site's
part is label-skewed instead: each class's images are shared among the sites in
proportions drawn from Dir(alpha) (``fedlift.data.dirichlet``, NIID-Bench's partition;
small alpha such as 0.1 gives each site a few dominant classes, 100 is near IID). Every
site draws the same partition from the same seed, so the parts are disjoint and together
are the whole training set, though no site sees the others'.

(``cifar10_data.py`` is the same file in cifar10-pt, so the skew lives here, as
cifar10-pt's ``pt_data.py`` does it for PyTorch.)
"""

from __future__ import annotations

from cifar10_data import Arrays, load_data

from fedlift.data import dirichlet

__all__ = ["site_data"]


def site_data(
    site_index: int,
    num_sites: int,
    split: str = "iid",
    alpha: float = 0.0,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Arrays:
    """``((x_train, y_train), (x_test, y_test))`` as ``load_data()`` gives them: this
    site's part of the training set (at most ``max_train`` images of it) and the whole
    test set (at most ``max_test``)."""
    if alpha <= 0:
        return load_data(
            shard=(site_index, num_sites),
            split=split,
            seed=seed,
            max_train=max_train,
            max_test=max_test,
        )
    (x_train, y_train), (x_test, y_test) = load_data(max_test=max_test)
    parts = dirichlet(y_train.reshape(-1), num_sites, alpha=alpha, seed=seed)
    index = parts[site_index][:max_train]
    return (x_train[index], y_train[index]), (x_test, y_test)
