"""hypothesis.strategies stand-in (see __init__.py): every strategy is an inert placeholder."""


def __getattr__(name):
    from hypothesis import _Any

    return _Any()


def composite(fn):
    from hypothesis import _Any

    return _Any()
