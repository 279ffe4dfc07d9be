"""Benchmarks for calcinosis-cds: in-process and over HTTP beside a floor app.

Run with `make bench` (or `python -m bench --help`). Nothing here is imported by
the service or by the test suite.
"""
