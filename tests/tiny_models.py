"""Tiny random-weight models for the tests and benchmarks: they now live in genkit.testing."""

from genkit.testing import *  # noqa: F401,F403
