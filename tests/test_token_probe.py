"""The linear probe of benchmarks/token_probe.py: it finds separable classes and nothing in noise."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("token_probe")


def test_probe_separates_planted_classes_and_not_noise(bench):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 8))  # classes 0 (outside air), 2 (fat), 3 (soft tissue)

    def sample(n):
        y = rng.choice([0, 2, 3], n)
        return centres[np.searchsorted([0, 2, 3], y)] + rng.normal(0, 0.5, (n, 8)), y

    (xa, ya), (xb, yb) = sample(300), sample(200)
    result = bench.probe(xa, ya, xb, yb)
    assert result["accuracy"] == 1.0 and result["regions"] == 200
    assert set(result["per_class"]) == {"outside air", "fat", "soft tissue"}
    assert all(v["accuracy"] == 1.0 for v in result["per_class"].values())
    # labels unrelated to the features: about chance (1/3) on new data, far from the planted case
    noise = bench.probe(rng.normal(size=(300, 8)), ya, rng.normal(size=(200, 8)), yb)
    assert noise["accuracy"] < 0.6
