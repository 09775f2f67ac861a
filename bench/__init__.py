"""SciStream's benchmarks (`make bench`, `python -m bench` from a checkout) and its soak (`make soak`,
`python -m bench.soak`): not part of the package."""
