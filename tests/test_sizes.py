"""Sizes known before building, for any size: exact Python ints in O(kernel) memory,
and builds refused with a clear error before numpy's allocator is reached."""

import math
import re
import tracemalloc

import numpy as np
import pytest

from sparse_tconv import (
    ConvOperator,
    ConvTransposeOperator,
    conv_matrix,
    conv_matrix_nnz,
    conv_transpose_matrix_nnz,
)


def _traced_peak(func):
    func()  # imports and caches out of the way
    tracemalloc.start()
    try:
        result = func()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n", [2**40, 2**62, 10**20])
def test_huge_zero_padded_sizes_are_exact_and_cost_nothing(n):
    # k = 3, padding 1, stride 1: every tap but two at the ends finds an input.
    size, peak = _traced_peak(lambda: conv_matrix_nnz((1, 1, 3), (1, n), padding=1))
    assert size.nnz == 3 * n - 2 and size.shape == (n, n)
    assert isinstance(size.nnz, int) and size.nbytes == size.nnz * 16 + (n + 1) * 8
    assert peak < 1 << 20


@pytest.mark.parametrize("mode, expected", [
    # Worked by hand for L = n, k = 3, padding 5 (see the test below for small n).
    ("replicate", lambda n: 3 * n + 6),
    ("circular", lambda n: 3 * n + 24),
])
def test_huge_sizes_in_the_other_modes(mode, expected):
    n = 2**62
    size, peak = _traced_peak(
        lambda: conv_matrix_nnz((1, 1, 3), (1, n), padding=5, padding_mode=mode))
    assert size.nnz == expected(n) and peak < 1 << 20
    small = conv_matrix((np.ones((1, 1, 3))), (1, 20), padding=5, padding_mode=mode)
    assert small.nnz == expected(20)  # the hand count holds for a built matrix


def test_huge_transposed_sizes():
    n = 2**61
    size = conv_transpose_matrix_nnz((1, 1, 4), (1, n), stride=2, padding=1)
    assert size.shape == (2 * n, n) and size.nnz == 4 * n - 2


def test_a_budget_refuses_before_allocating():
    weight = np.ones((1, 1, 3))
    _, peak = _traced_peak(lambda: pytest.raises(
        MemoryError, conv_matrix, weight, (1, 10**9), max_bytes=1000))
    assert peak < 1 << 20
    with pytest.raises(MemoryError, match=r"would need 55999999896 bytes .*max_bytes=1000"):
        conv_matrix(weight, (1, 10**9), max_bytes=1000)


@pytest.mark.parametrize("max_bytes, error, match", [
    (-1, ValueError, r"max_bytes must be a positive integer, got max_bytes=-1"),
    (0, ValueError, r"max_bytes must be a positive integer, got max_bytes=0"),
    (1.5, TypeError, r"max_bytes must be an int, got max_bytes=1\.5"),
])
def test_bad_budgets(max_bytes, error, match):
    with pytest.raises(error, match=match):
        conv_matrix(np.ones((1, 1, 3)), (1, 10), max_bytes=max_bytes)


@pytest.mark.parametrize("make", [conv_matrix, ConvOperator, ConvTransposeOperator])
@pytest.mark.parametrize("input_shape", [(1, 10**20), (1, 10**10, 10**10), (1, 2**40, 2**30)])
def test_inputs_no_array_can_hold_are_a_value_error_naming_the_shape(make, input_shape):
    # a wrong argument, not a shortage of memory: ValueError, and nothing allocated
    weight = np.ones((1, 1) + (1,) * (len(input_shape) - 1))
    n = math.prod(input_shape)
    message = re.escape(f"input_shape={input_shape} has {n:.3g} elements ({8 * n:.3g} bytes "
                        "of float64), more than any array can hold (2**63 bytes)")
    _, peak = _traced_peak(lambda: pytest.raises(ValueError, make, weight, input_shape))
    assert peak < 1 << 20
    with pytest.raises(ValueError, match=message):
        make(weight, input_shape)


def test_an_output_no_array_can_hold_is_named():
    # the input fits; a transposed convolution's output does not
    with pytest.raises(ValueError, match=r"input_shape=\(1, 10\*\*18\) gives an output"
                                         .replace(r"10\*\*18", str(10**18))):
        ConvTransposeOperator(np.ones((1, 1, 3)), (1, 10**18), stride=100)


def test_sizes_beyond_int64_are_refused_by_name():
    # the vectors fit, the matrix's entries cannot be indexed
    with pytest.raises(ValueError, match=r"more entries or rows than int64 indices can address "
                                         r"\(input_shape=\(64, 10000000000000000\), "
                                         r"weight.shape=\(64, 64, 3\)\)"):
        conv_matrix(np.ones((64, 64, 3)), (64, 10**16))
    # an operator whose product form is a matrix (CSR: depthwise) is refused before building
    with pytest.raises(ValueError, match=r"product form \(csr\) would need 3.58e\+19 bytes "
                                         r"\(nnz=1.92e\+18\), more than any address space .*"
                                         r"weight.shape=\(64, 1, 3\)"):
        ConvOperator(np.ones((64, 1, 3)), (64, 10**16), groups=64)
    # the structured form holds the weight alone: the operator is built, its matrix refused
    op = ConvOperator(np.ones((64, 64, 3)), (64, 10**16))
    assert op.product_form.name == "structured"
    assert op.product_form.nbytes <= 2 * 64 * 64 * 3 * 8
    with pytest.raises(ValueError, match=r"more entries or rows than int64 indices can address "
                                         r"\(input_shape=\(64, 10000000000000000\), "
                                         r"weight.shape=\(64, 64, 3\)\)"):
        _ = op.matrix


def test_an_allocation_failure_says_what_was_built(monkeypatch):
    # numpy's own MemoryError (simulated: a real one depends on the machine's
    # overcommit policy) comes out with the size of what was being built.
    import sparse_tconv._build as build

    def refuse(*args, **kwargs):
        raise MemoryError("Unable to allocate 8.00 TiB")

    monkeypatch.setattr(build, "layout", refuse)
    nbytes = conv_matrix_nnz((1, 1, 3), (1, 1000)).nbytes
    with pytest.raises(MemoryError, match=rf"the matrix needs {nbytes} bytes .*could not "
                                          r"allocate \(Unable to allocate 8\.00 TiB\)"):
        conv_matrix(np.ones((1, 1, 3)), (1, 1000))


def test_sizes_beyond_any_address_space_are_refused():
    # the vectors and nnz fit int64, the matrix's bytes do not: numpy would say "array is
    # too big"
    with pytest.raises(ValueError, match=r"more bytes than any address space"):
        conv_matrix(np.ones((1, 1, 3), np.float32), (1, 2**60))
