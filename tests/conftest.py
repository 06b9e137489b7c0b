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


@pytest.fixture(autouse=True)
def race_by_products(monkeypatch):
    """The safeguard of tikhonov's M='auto' times its race; in the tests its clock counts
    products instead, one tick per application of the normal operator or of a structured
    preconditioner, so that its choice is the same on every run and machine (a
    preconditioned iteration then costs twice a plain one, as on the small problems)."""
    from sparse_tconv import _preconditioners, solvers
    from sparse_tconv._methods import safeguard

    ticks = [0]

    def counted(matvec):
        def counting(self, x):
            ticks[0] += 1
            return matvec(self, x)
        return counting

    for cls in (solvers._NormalOperator, _preconditioners.SpectralPreconditioner):
        monkeypatch.setattr(cls, "_matvec", counted(cls._matvec))
    monkeypatch.setattr(safeguard, "_clock", lambda: ticks[0])
