"""How sure a measured metric drop is: a seeded bootstrap 95% interval over the evaluation samples.

Each sample contributes its own value for both models (accuracy: 0/1 per sample; perplexity: summed
token loss and token count per window; cosine or top-1 agreement per sample; Spearman: per pair).
Resampling samples with replacement and recomputing the drop gives its distribution; the interval is
its 2.5th and 97.5th percentile. The same seed gives the same interval.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 1000
SEED = 0
_CHUNK_ELEMENTS = 1 << 22  # index matrix entries per step (32 MB of int64)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray], samples: int, *, resamples: int = RESAMPLES, seed: int = SEED
) -> list[float] | None:
    """[2.5th, 97.5th] percentile of `statistic(indices)` over resamples; None below 2 samples.

    `statistic` takes a [resamples, samples] index matrix and returns one value per row.
    """
    if samples < 2:
        return None
    generator = np.random.default_rng(seed)
    step = max(1, _CHUNK_ELEMENTS // samples)
    values = [
        statistic(generator.integers(0, samples, size=(min(step, resamples - start), samples)))
        for start in range(0, resamples, step)
    ]
    low, high = np.nanpercentile(np.concatenate(values), [2.5, 97.5])
    return [float(low), float(high)]


def drop_interval(
    original: np.ndarray,
    compressed: np.ndarray,
    weights: np.ndarray,
    *,
    higher_is_better: bool,
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x,
) -> list[float] | None:
    """Interval of the drop of `transform(sum(values) / sum(weights))` (positive = compressed worse).

    Accuracy: values 0/1, weights 1. Perplexity: values summed token loss, weights token counts,
    transform exp.
    """
    original, compressed, weights = (np.asarray(a, dtype=np.float64) for a in (original, compressed, weights))

    def drop(indices: np.ndarray) -> np.ndarray:
        total = weights[indices].sum(axis=1)
        before = transform(original[indices].sum(axis=1) / total)
        after = transform(compressed[indices].sum(axis=1) / total)
        return before - after if higher_is_better else after - before

    return bootstrap_interval(drop, len(weights))
