"""Benchmarks and the soak of SciStream: run by make (make soak), never shipped in the wheel."""
