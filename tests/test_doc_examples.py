"""The examples of the README, the docs pages and the docstrings print nothing that
depends on the processor.

An iterative method's iteration count depends on the rounding of every dot
product, hence on the BLAS kernels of the processor it runs on: plain CG on the
solvers page's defocus blur took 218 iterations on one machine and 222 on
another, and the README's test command failed there.  An example may compare
such a count with another or with a range (``plain.iterations > 150``), never
print it.  This module reads every example (without running it) and fails on
one whose code reads an iteration count and whose expected output holds a
number of two digits or more.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import sparse_tconv

ROOT = Path(__file__).resolve().parent.parent

# Code that reads the length of a convergence history or an iteration count.
_COUNT = re.compile(
    r"\.iterations\b|\bitn\w*|\bn_?iter\w*|\.nit\b"
    r"|len\(\s*(steps|residuals|history|plain|multigrid|res\w*|errors?)\s*\)"
)
# A number of two digits or more in the expected output (not inside a name).
_NUMBER = re.compile(r"(?<![\w.])\d{2,}(?![\w])")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _page_examples(path: Path):
    parser = doctest.DocTestParser()
    test = parser.get_doctest(path.read_text(), {}, path.name, str(path), 0)
    return [(f"{path.name}:{e.lineno + 1}", e) for e in test.examples]


def _docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    names = [m.name for m in pkgutil.walk_packages(sparse_tconv.__path__, "sparse_tconv.")]
    for name in ["sparse_tconv", *names]:
        module = importlib.import_module(name)
        for test in finder.find(module):
            for example in test.examples:
                line = (test.lineno or 0) + example.lineno + 1
                yield f"{test.name}:{line}", example


def _all_examples():
    for path in _pages():
        yield from _page_examples(path)
    yield from _docstring_examples()


def printed_counts(examples) -> list[str]:
    """The examples that print an iteration count: ``where: source -> output``."""
    found = []
    for where, example in examples:
        if _COUNT.search(example.source) and _NUMBER.search(example.want):
            found.append(f"{where}: {example.source.strip()} -> {example.want.strip()}")
    return found


def test_no_example_prints_an_iteration_count():
    examples = list(_all_examples())
    assert len(examples) > 300  # the pages and docstrings were read
    assert printed_counts(examples) == []


@pytest.mark.parametrize("source, want, found", [
    ("info.preconditioner, info.iterations, plain.iterations\n", "('dct2', 28, 218)\n", True),
    ("len(plain), len(multigrid) * 3 < len(plain)\n", "(218, True)\n", True),
    ("about(itn_qr)\n", "350\n", True),
    ("info.method, info.iterations\n", "('cg', 1)\n", False),  # one digit: an exact solve
    ("bool(plain.iterations > 150)\n", "True\n", False),
    ("W.shape, W.nnz\n", "((720, 2560), 135200)\n", False),  # exact integers, no count
])
def test_the_check_finds_printed_counts(source, want, found):
    example = doctest.Example(source, want)
    assert bool(printed_counts([("page.md:1", example)])) is found
