"""SciStream's benchmarks (`make bench`, `python -m bench` from a checkout): not part of the package."""
