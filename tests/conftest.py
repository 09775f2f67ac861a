"""Settings for the whole test suite."""

from hypothesis import settings

# Hypothesis fails an example that takes longer than 200 ms by default: a timed assertion, which
# a busy 2-core machine fails now and then (a parser example once took 357 ms under load). What
# the properties assert is correctness; `make bench` is where speed is measured.
settings.register_profile("scistream", deadline=None)
settings.load_profile("scistream")
