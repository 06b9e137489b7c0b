import os

import pytest
from hypothesis import HealthCheck, settings

import sparse_tconv

# "ci" keeps the property tests to a few seconds; "dev" explores further:
#   HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py
settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def restore_threads():
    """Undo any set_num_threads done by a test."""
    yield
    sparse_tconv.set_num_threads(None)
