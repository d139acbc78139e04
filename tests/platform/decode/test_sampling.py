"""`Sampling` and the cascade's threshold refuse values that would decode garbage."""

from __future__ import annotations

import pytest

from fulcrum.platform.decode.sampling import Sampling
from fulcrum.platform.decode.speculative import Cascade, Draft


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_temperature_must_be_finite_and_non_negative(temperature):
  """Before: nan decoded empty text and inf uniform noise, both with exit 0."""
  with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
    Sampling(temperature=temperature)
  assert Sampling(temperature=0.7).temperature == 0.7


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), float("-inf")])
def test_cascade_alpha_must_be_finite(alpha):
  """Before: alpha = nan made every deferral test false: the drafter alone, silently."""
  with pytest.raises(ValueError, match="cascade alpha .* must be a finite number"):
    Cascade(Draft(None, None), rule="chow", alpha=alpha)
  assert Cascade(Draft(None, None), rule="chow", alpha=-1.0).alpha == -1.0  # Always defer.
