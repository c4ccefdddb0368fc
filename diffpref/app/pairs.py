"""Which pair to show a person next: the one that teaches the most about their taste.

The model of a person is Bradley-Terry over image features (CLIP image embeddings, or the
world's detected attributes): they prefer image a over b with probability

    p(a > b) = sigmoid(w . (phi(a) - phi(b)))

with a Gaussian prior ``w ~ N(0, prior_std^2 I)``. ``fit_posterior`` finds the MAP weights by
Newton's method on their ratings so far (a tie is the soft label 0.5; a skip says nothing) and
keeps the Laplace approximation ``N(w_map, H^-1)`` around it.

``select_pair`` in "active" mode draws weight vectors from that posterior (Thompson-style) and
scores every candidate pair by BALD (Houlsby et al. 2011), the mutual information between the
person's answer and ``w``:

    I = H(mean_s p_s) - mean_s H(p_s),   p_s = sigmoid(w_s . (phi(a) - phi(b)))

It is high where the sampled people *disagree* about the pair (the prediction is 50% on average
but confident for each sample). Two near-identical images are 50% for every sample too, yet
teach nothing, and score ~0 -- which is why "closest to 50%" alone is not the criterion.
"random" picks a uniformly random candidate pair, the baseline to compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from diffpref.app.config import DEFAULT_PRIOR_STD, PAIR_MODES

DEFAULT_SAMPLES = 64


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def _entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


@dataclass
class PreferencePosterior:
    """Laplace posterior over a person's weights: mean ``w_map`` and the Cholesky factor of the precision."""

    mean: np.ndarray  # (d,)
    precision_chol: np.ndarray  # (d, d) lower triangular, H = L L^T
    num_ratings: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` weight vectors ``(n, d)`` from N(mean, H^-1): mean + L^-T eps."""
        eps = rng.standard_normal((self.dim, n))
        return self.mean[None, :] + np.linalg.solve(self.precision_chol.T, eps).T

    def predict(self, diffs: np.ndarray) -> np.ndarray:
        """Posterior-mean-weight probability that the first image of each pair is preferred."""
        return _sigmoid(np.asarray(diffs, dtype=np.float64) @ self.mean)


def prior(dim: int, prior_std: float = DEFAULT_PRIOR_STD) -> PreferencePosterior:
    return PreferencePosterior(np.zeros(dim), np.eye(dim) / prior_std, 0)


def fit_posterior(diffs: np.ndarray, labels: np.ndarray, prior_std: float = DEFAULT_PRIOR_STD,
                  max_iters: int = 50, tol: float = 1e-8) -> PreferencePosterior:
    """Laplace posterior of Bayesian logistic regression on ``diffs`` = phi(first) - phi(second), (n, d).

    ``labels`` are P(first preferred): 1, 0, or 0.5 for a tie. Newton's method is exact enough
    here: the log-posterior is strictly concave (Gaussian prior), and d is at most a CLIP width.
    """
    x = np.asarray(diffs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected diffs (n, d) and labels (n,), got {x.shape} and {y.shape}")
    if not np.all((y >= 0) & (y <= 1)):
        raise ValueError(f"labels must lie in [0, 1] (1 first preferred, 0 second, 0.5 tie), got {y}")
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")
    dim, prior_precision = x.shape[1], 1.0 / prior_std**2
    if x.shape[0] == 0:
        return prior(dim, prior_std)
    w = np.zeros(dim)
    eye = np.eye(dim)
    for _ in range(max_iters):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + prior_precision * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + prior_precision * eye
        step = np.linalg.solve(hessian, grad)
        w -= step
        if float(step @ step) < tol:
            break
    p = _sigmoid(x @ w)
    hessian = (x * (p * (1 - p))[:, None]).T @ x + prior_precision * eye
    return PreferencePosterior(w, np.linalg.cholesky(hessian), int(x.shape[0]))


def all_pairs(num_candidates: int) -> list[tuple[int, int]]:
    return list(combinations(range(num_candidates), 2))


def bald_scores(diffs: np.ndarray, weight_samples: np.ndarray) -> np.ndarray:
    """Mutual information (bits) between the answer to each pair and the weights, from samples (S, d)."""
    p = _sigmoid(np.asarray(diffs, dtype=np.float64) @ weight_samples.T)  # (pairs, samples)
    return _entropy(p.mean(axis=1)) - _entropy(p).mean(axis=1)


@dataclass
class PairChoice:
    first: int
    second: int
    score: float  # BALD information in bits (active) or 0 (random)
    predicted: float  # posterior-mean probability that ``first`` is preferred


def select_pair(features: np.ndarray, posterior: PreferencePosterior | None, rng: np.random.Generator,
                mode: str = "active", pairs: list[tuple[int, int]] | None = None,
                num_samples: int = DEFAULT_SAMPLES) -> PairChoice:
    """Pick one pair of candidate images ``features`` (M, d) to show; see the module docstring."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode {mode!r}; valid modes are {', '.join(PAIR_MODES)}")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of at least 2 candidate images, (M >= 2, d); got {features.shape}")
    pairs = all_pairs(features.shape[0]) if pairs is None else pairs
    posterior = posterior if posterior is not None else prior(features.shape[1])
    if posterior.dim != features.shape[1]:
        raise ValueError(f"posterior has dimension {posterior.dim} but features have {features.shape[1]}")
    diffs = np.stack([features[i] - features[j] for i, j in pairs])
    if mode == "random":
        k = int(rng.integers(len(pairs)))
        return PairChoice(*pairs[k], 0.0, float(posterior.predict(diffs[k:k + 1])[0]))
    scores = bald_scores(diffs, posterior.sample(rng, num_samples))
    # Random tie-breaking among (numerically) equal scores, so equal candidates do not favour index 0.
    k = int(np.argmax(scores + rng.uniform(0, 1e-9, size=scores.shape)))
    return PairChoice(*pairs[k], float(scores[k]), float(posterior.predict(diffs[k:k + 1])[0]))
