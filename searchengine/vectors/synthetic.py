"""Synthetic ITC vectors shaped like a photo library's, for measuring the vector index
(benchmarks/ann.py) and testing it at sizes no real model could embed in CI.

Images are drawn from topics: a topic centre, an image centre near it, and the image's Q unit
vectors near the image centre. Queries are near held-out image centres. The spreads are
relative noise norms: `topic_spread` 0.8 puts an image centre at cosine ~0.78 to its topic,
`vector_spread` 0.6 puts each of an image's vectors at cosine ~0.86 to its centre, and
`query_spread` 0.7 a query at ~0.82 to its image: a query's exact top 10 are then its topic's
images in an order the vectors decide (neither the same ten for every query of a topic nor
random). benchmarks/ann.py prints the score gaps that show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32, copy=False)


def _unit_in_place(x: np.ndarray) -> np.ndarray:
    """`unit` of a float32 array, written over it (the same values; a library's vectors are
    hundreds of MB, and every copy of them was a second of a 50k-image test)."""
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    x = _unit_in_place(rng.standard_normal(shape, dtype=np.float32))
    x *= scale
    return x


@dataclass
class Library:
    topics: np.ndarray  # [n_topics, D]
    dim: int
    num_vectors: int
    topic_spread: float = 0.8
    vector_spread: float = 0.6
    query_spread: float = 0.7
    seed: int = 0

    @classmethod
    def make(cls, dim: int = 256, num_vectors: int = 32, n_topics: int = 1000, seed: int = 0, **spreads) -> "Library":
        rng = np.random.default_rng(seed)
        return cls(unit(rng.standard_normal((n_topics, dim), dtype=np.float32)), dim, num_vectors, seed=seed, **spreads)

    def centres(self, start: int, n: int) -> np.ndarray:
        """Image centres of images start..start+n (the same for the same range, any chunking)."""
        out = np.empty((n, self.dim), np.float32)
        for i in range(n):
            rng = np.random.default_rng((self.seed, 1, start + i))
            topic = self.topics[rng.integers(len(self.topics))]
            out[i] = unit(topic + _noise(rng, (self.dim,), self.topic_spread))
        return out

    def images(self, start: int, n: int) -> np.ndarray:
        """[n, Q, D] unit vectors of images start..start+n."""
        centres = self.centres(start, n)
        rng = np.random.default_rng((self.seed, 2, start, n))
        noise = _noise(rng, (n, self.num_vectors, self.dim), self.vector_spread)
        noise += centres[:, None, :]
        return _unit_in_place(noise)

    def queries(self, n: int, held_out_from: int = 10**9) -> np.ndarray:
        """[n, D] queries near the centres of images not in the library."""
        centres = self.centres(held_out_from, n)
        rng = np.random.default_rng((self.seed, 3, n))
        return unit(centres + _noise(rng, centres.shape, self.query_spread))
