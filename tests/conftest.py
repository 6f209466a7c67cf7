"""Hypothesis profiles: "ci" (the default, >= 200 examples per property) and "thorough"
(select with --hypothesis-profile=thorough). No deadline: shared CI cores are noisy."""

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")
