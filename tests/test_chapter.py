"""Every number of the transposed-convolution chapter (d2l, Chinese edition), recomputed.

The expected arrays below were worked out by hand from the definitions and
agree with the outputs printed in the chapter.
"""

import numpy as np

from sparse_tconv import (
    conv_matrix,
    conv_output_shape,
    conv_transpose_matrix,
    conv_transpose_output_shape,
)

X = np.array([[0.0, 1.0], [2.0, 3.0]])
K = np.array([[0.0, 1.0], [2.0, 3.0]])


def _transposed(x, kernel, **kwargs):
    M = conv_transpose_matrix(kernel[None, None], (1, *x.shape), **kwargs)
    shape = conv_transpose_output_shape((1, *x.shape), (1, 1, *kernel.shape), **kwargs)
    return (M @ x.ravel()).reshape(shape[1:])


def test_basic_transposed_convolution():
    expected = [[0.0, 0.0, 1.0], [0.0, 4.0, 6.0], [4.0, 12.0, 9.0]]
    np.testing.assert_array_equal(_transposed(X, K), expected)


def test_padding_crops_the_output():
    np.testing.assert_array_equal(_transposed(X, K, padding=1), [[4.0]])


def test_stride_two():
    expected = [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 3.0], [0.0, 2.0, 0.0, 3.0],
                [4.0, 6.0, 6.0, 9.0]]
    np.testing.assert_array_equal(_transposed(X, K, stride=2), expected)


def test_multichannel_shape_round_trip():
    rng = np.random.default_rng(0)
    x_shape = (10, 16, 16)
    kwargs = dict(padding=2, stride=3)
    W = conv_matrix(rng.random((20, 10, 5, 5)), x_shape, **kwargs)  # conv 10 -> 20
    y_shape = conv_output_shape(x_shape, (20, 10, 5, 5), **kwargs)
    assert y_shape == (20, 6, 6)
    M = conv_transpose_matrix(rng.random((20, 10, 5, 5)), y_shape, **kwargs)  # tconv 20 -> 10
    x = rng.random(x_shape)
    z = M @ (W @ x.ravel())
    assert z.size == x.size
    assert conv_transpose_output_shape(y_shape, (20, 10, 5, 5), **kwargs) == x_shape


def test_kernel_as_matrix_and_convolution_as_product():
    kernel = np.array([[1.0, 2.0], [3.0, 4.0]])
    W = conv_matrix(kernel[None, None], (1, 3, 3))
    expected_W = [
        [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0],
    ]
    np.testing.assert_array_equal(W.toarray(), expected_W)
    x = np.arange(9.0).reshape(3, 3)
    Y = (W @ x.ravel()).reshape(2, 2)
    np.testing.assert_array_equal(Y, [[27.0, 37.0], [57.0, 67.0]])
    # The transposed convolution of Y is the product with W.T.
    Z = _transposed(Y, kernel)
    np.testing.assert_array_equal(Z, (W.T @ Y.ravel()).reshape(3, 3))
    np.testing.assert_array_equal(Z, [[27.0, 91.0, 74.0], [138.0, 400.0, 282.0],
                                      [171.0, 429.0, 268.0]])


def test_exercise_one_z_is_not_x():
    # Same shape, different values: W.T W is not the identity.
    kernel = np.array([[1.0, 2.0], [3.0, 4.0]])
    W = conv_matrix(kernel[None, None], (1, 3, 3))
    x = np.arange(9.0)
    z = W.T @ (W @ x)
    assert z.shape == x.shape and not np.allclose(z, x)
    gram = (W.T @ W).toarray()
    assert not np.allclose(gram, np.eye(9))
    # W has rank 4 < 9, so no left inverse exists at all.
    assert np.linalg.matrix_rank(W.toarray()) == 4
