"""Fixture builders: random tiny and real-shape Qwen models built offline, for the quickstart, the tests and the
benchmarks. Nothing in the trainer imports them; the production loaders live in :mod:`vold_pl.models`."""
