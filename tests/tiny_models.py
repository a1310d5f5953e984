"""Tiny random-weight models for the tests and benchmarks: they now live in genkit.testing."""

from genkit.testing import *  # noqa: F401,F403


def per_name(make):
    """`make(name)` called once per name: a module fixture's cache of tiny models per family."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make(name)
        return cache[name]

    return get
