"""Child-side helpers of tests/test_closures.py (standard library only: cheap to import).

The callables each test sends are made here by factories, so that they are what pickle
cannot send by reference: lambdas, closures, functions and classes defined in functions.
Each ``make_*`` returns a function of the rank, and what it returns for rank ``i`` is
``expected(name, i)``.
"""

import functools
import os
import sys

SCALE = 3  # a module global a closure reads (it goes by value, with the function)


def make_lambda():
    return lambda i: ("lambda", i * SCALE)


def make_closure():
    offset = 100  # local state, captured

    def closure(i):
        return ("closure", i + offset)

    return closure


def make_nested():
    outer = 10

    def middle():
        inner = 5

        def innermost(i):
            return ("nested", i * outer + inner)

        return innermost

    return middle()


def make_recursive():
    def factorial(n):
        return 1 if n <= 1 else n * factorial(n - 1)

    return lambda i: ("recursive", factorial(i + 3))


def make_local_class():
    class Local:
        base = 7

        def __init__(self, i):
            self.i = i

        @property
        def value(self):
            return self.base + self.i

        @classmethod
        def made(cls, i):
            return cls(i)

    return lambda i: ("local class", Local.made(i).value)


def make_partial():
    def scaled(factor, i):
        return ("partial", factor * i)

    return functools.partial(scaled, 4)


def make_callable_instance():
    class Multiplier:
        def __init__(self, k):
            self.k = k

        def __call__(self, i):
            return ("instance of a local class", self.k * i)

    return Multiplier(6)


CASES = {
    "lambda": make_lambda,
    "closure": make_closure,
    "nested": make_nested,
    "recursive": make_recursive,
    "local class": make_local_class,
    "partial of a closure": make_partial,
    "instance of a local class": make_callable_instance,
}


def expected(name, i):
    fact = 1
    for k in range(2, i + 4):
        fact *= k
    return {
        "lambda": ("lambda", i * SCALE),
        "closure": ("closure", i + 100),
        "nested": ("nested", i * 10 + 5),
        "recursive": ("recursive", fact),
        "local class": ("local class", 7 + i),
        "partial of a closure": ("partial", 4 * i),
        "instance of a local class": ("instance of a local class", 6 * i),
    }[name]


def put_result(i, fn, queue):
    """``fn`` arrives inside the arguments: sent by value at depth."""
    queue.put((i, fn(i)))


def call(i, fn):
    return fn(i)


def original(i):
    return ("original", i)


kept = original  # the module's name "original" is rebound below: a lookup finds another object


def original(i):  # noqa: F811 - on purpose
    return ("replacement", i)


def modules_loaded(i):
    """Whether this child has cloudpickle, and whether it was loaded by unpickling."""
    return "cloudpickle" in sys.modules


def getpid_lambda():
    return lambda i: os.getpid()
