"""Shared pytest configuration for fastkl's tests.

Hypothesis profiles (pick one with HYPOTHESIS_PROFILE=name):
- "default": 100 examples per property, no deadline (the first call of a
  kernel compiles it with numba, which would trip any deadline);
- "thorough": 1000 examples, for a long run before a release;
- "quick": 15 examples, for a fast local loop.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# tests/ is not a package: make `import naive` work however pytest is invoked.
sys.path.insert(0, os.path.dirname(__file__))

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("default", max_examples=100, **_common)
settings.register_profile("quick", max_examples=15, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(_stable_seed(request.node.nodeid))


def _stable_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())
