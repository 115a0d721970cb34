"""Stand-in for hypothesis where it is not installed (the borrowed GPU's image has no registry): the op
test files import it at module level, so without it none of their GPU tests would even be collected.
Property tests (@given) are skipped with a reason; everything else runs. gpu_check puts this directory
on PYTHONPATH only when `import hypothesis` fails."""
import functools
import inspect

import pytest

from hypothesis import strategies  # noqa: F401


class _Any:
    """Any attribute, call, operator or decorator use gives another _Any: module-level strategy code runs."""

    def __getattr__(self, name):
        return _Any()

    def __call__(self, *args, **kwargs):
        return _Any()

    def __or__(self, other):
        return _Any()


HealthCheck = _Any()
assume = note = event = _Any()


def given(*args, **kwargs):
    def wrap(fn):
        @functools.wraps(fn)
        def skipped(*a, **k):
            pytest.skip("hypothesis is not installed here (gpu_check's stand-in)")
        # pytest must see the parameters hypothesis does not fill (parametrize, fixtures), not the others.
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in kwargs]
        skipped.__signature__ = inspect.Signature(params[:len(params) - len(args)] if args else params)
        return skipped
    return wrap


class settings:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, fn):
        return fn

    @staticmethod
    def register_profile(*args, **kwargs):
        pass

    @staticmethod
    def load_profile(*args, **kwargs):
        pass


def example(*args, **kwargs):
    return lambda fn: fn
