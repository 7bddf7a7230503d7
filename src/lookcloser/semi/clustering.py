"""K-means on embeddings, with k chosen from the data, and the clusters worth training on.

scikit-learn's KMeans does the clustering; what is chosen here:

* **k**: the candidate with the best silhouette score (cosine, on at most 2,000 images) on a
  geometric grid from `k_min` to `k_max` = images / min_cluster_size (capped at 256): the
  number of groups the embeddings themselves separate best. `semi.clusters` fixes k instead.
* **kept clusters**: those with at least `min_cluster_size` images, then, of those, the
  most compact share `keep` by the mean cosine distance of their images to the centroid.
  Small clusters are too few images to learn a class from; loose ones mix several kinds of
  image, and training on them as one class teaches nothing about the difference.

Embeddings are L2-normalized first, so Euclidean k-means clusters by angle (the geometry
the prototype scores use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_K = 256
SILHOUETTE_SAMPLE = 2000


@dataclass
class Clusters:
    """A k-means result: per image its cluster and cosine distance to the centroid; per
    cluster its size, compactness (mean distance) and whether it is kept."""

    k: int
    labels: np.ndarray  # N cluster ids
    distances: np.ndarray  # N cosine distances to the own centroid
    sizes: np.ndarray  # k
    compactness: np.ndarray  # k mean distances (lower = tighter)
    kept: np.ndarray  # k bool
    silhouettes: dict[int, float]  # candidate k -> silhouette (empty when k was fixed)

    def image_kept(self) -> np.ndarray:
        """N bool: the image lies in a kept cluster."""
        return self.kept[self.labels]

    def reasons(self, min_size: int) -> list[str]:
        """Per image why it was kept or dropped."""
        out = []
        for label in self.labels:
            if self.kept[label]:
                out.append("kept")
            elif self.sizes[label] < min_size:
                out.append("small cluster")
            else:
                out.append("loose cluster")
        return out


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def k_grid(k_min: int, k_max: int, points: int = 8) -> list[int]:
    """Up to `points` distinct integers spread geometrically from k_min to k_max."""
    if k_max <= k_min:
        return [k_min]
    values = np.geomspace(k_min, k_max, num=points)
    return sorted({int(round(v)) for v in values})


def choose_k(
    x: np.ndarray, k_min: int, k_max: int, seed: int = 0, progress: bool = False
) -> dict[int, float]:
    """Silhouette score of k-means for each candidate k (x L2-normalized)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    from lookcloser.progress import track

    scores = {}
    sample = min(len(x), SILHOUETTE_SAMPLE)
    grid = k_grid(k_min, min(k_max, len(x) - 1))
    for k in track(grid, "choose k (silhouette)", enabled=progress):
        if k < 2:
            continue
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
        if len(set(labels.tolist())) < 2:
            continue
        scores[k] = float(
            silhouette_score(x, labels, metric="cosine", sample_size=sample, random_state=seed)
        )
    return scores


def cluster(
    embeddings: np.ndarray,
    k: int | None = None,
    k_min: int = 2,
    min_size: int = 5,
    keep: float = 0.8,
    seed: int = 0,
    progress: bool = False,
) -> Clusters:
    """Cluster the embeddings (k given, or chosen by silhouette) and mark the kept clusters."""
    from sklearn.cluster import KMeans

    x = normalized(embeddings)
    n = len(x)
    if n < 3:
        raise ValueError(f"clustering needs at least 3 images, got {n}")
    silhouettes: dict[int, float] = {}
    k_min = max(2, min(k_min, n - 1))
    if k is None:
        k_max = max(k_min, min(MAX_K, n // max(1, min_size)))
        silhouettes = choose_k(x, k_min, k_max, seed, progress)
        k = max(silhouettes, key=silhouettes.get) if silhouettes else k_min
    k = min(k, n - 1)
    model = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    labels = model.labels_
    centroids = normalized(model.cluster_centers_)
    distances = 1.0 - np.sum(x * centroids[labels], axis=1)
    sizes = np.bincount(labels, minlength=k)
    compactness = np.array(
        [distances[labels == c].mean() if sizes[c] else np.inf for c in range(k)]
    )
    kept = sizes >= min_size
    candidates = np.flatnonzero(kept)
    if len(candidates):
        n_keep = math.ceil(round(keep * len(candidates), 9))
        tightest = candidates[np.argsort(compactness[candidates], kind="stable")[:n_keep]]
        kept = np.zeros(k, dtype=bool)
        kept[tightest] = True
    return Clusters(k, labels, distances, sizes, compactness, kept, silhouettes)
