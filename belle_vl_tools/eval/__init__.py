"""Benchmarks: reading their data, running a backend over it and scoring the answers (see :mod:`.mme`)."""
