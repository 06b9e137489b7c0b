"""PyTorch interoperability: convolution layers in, sparse CSR tensors out and back.

PyTorch is an optional dependency (``pip install sparse-tconv[torch]``).  It
is imported inside the functions of this module, never at import time, so
``import sparse_tconv`` does not import torch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp

from ._operator import ConvOperator, ConvTransposeOperator, _ConvOperatorBase
from ._validation import check_bool, check_int, is_int, is_sparse, normalize_shape

__all__ = ["from_torch", "to_torch", "from_torch_sparse"]


def _import_torch(function: str):
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            f"sparse_tconv.{function} needs PyTorch, an optional dependency; install it with "
            "`pip install sparse-tconv[torch]`"
        ) from exc
    return torch


# ---------------------------------------------------------------------------
# from_torch
# ---------------------------------------------------------------------------


def _layer_kind(torch, module) -> tuple[int, bool]:
    """``(number of spatial dimensions, transposed)`` of a supported layer."""
    nn = torch.nn
    kinds = (
        (nn.ConvTranspose1d, 1, True),
        (nn.ConvTranspose2d, 2, True),
        (nn.ConvTranspose3d, 3, True),
        (nn.Conv1d, 1, False),
        (nn.Conv2d, 2, False),
        (nn.Conv3d, 3, False),
    )
    for cls, ndim, transposed in kinds:  # noqa: B007 (the loop's values are the result)
        if isinstance(module, cls):
            break
    else:
        kind = type(module)
        raise TypeError(
            "module must be a torch.nn.Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d "
            f"or ConvTranspose3d layer, got a module of type {kind.__module__}.{kind.__qualname__}"
        )
    for name in ("weight", "bias"):
        if torch.nn.parameter.is_lazy(getattr(module, name, None)):
            raise TypeError(
                f"module is a {type(module).__name__} whose parameters are not initialised yet "
                f"(module.{name} is an UninitializedParameter); run one forward pass on an input "
                "first, as PyTorch requires for lazy modules"
            )
    return ndim, transposed


def _describe(module) -> str:
    """A one-line description of a layer for error messages."""
    return (
        f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
        f"kernel_size={tuple(module.kernel_size)})"
    )


def _split_input_shape(input_shape, module, ndim: int) -> tuple[tuple[int, ...], bool]:
    """One sample's shape ``(C_in, *L)`` and whether a batch axis was given."""
    layer = _describe(module)
    if isinstance(input_shape, (str, bytes)) or is_int(input_shape):
        raise TypeError(f"input_shape must be a sequence of ints, got input_shape={input_shape!r}")
    try:
        items = tuple(input_shape)
    except TypeError:
        raise TypeError(
            f"input_shape must be a sequence of ints, got input_shape={input_shape!r}"
        ) from None
    if len(items) not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"input_shape does not fit {layer}: a {ndim}-d layer takes (C_in, *L) with {ndim} "
            f"spatial sizes or (batch, C_in, *L), i.e. {ndim + 1} or {ndim + 2} entries, got "
            f"input_shape={items} ({len(items)} entries)"
        )
    batched = len(items) == ndim + 2
    if batched:
        batch = check_int(items[0], "input_shape[0] (the batch size)")
        if batch < 0:
            raise ValueError(f"the batch size must be non-negative, got input_shape={items}")
    shape = normalize_shape(items[1:] if batched else items, "input_shape")
    if shape[0] != module.in_channels:
        axis = 1 if batched else 0
        raise ValueError(
            f"input_shape does not fit {layer}: the layer takes {module.in_channels} input "
            f"channels, got input_shape[{axis}]={shape[0]} (input_shape={items})"
        )
    return shape, batched


def _output_padding(layer, sample_shape, batched, output_size, window):
    """``output_padding`` for a requested ``output_size``, as ``ConvTranspose.forward``.

    This is PyTorch's ``_ConvTransposeNd._output_padding``: with
    ``m = (O - 1) * stride - 2 * padding + dilation * (k - 1) + 1`` per spatial
    dimension, a size ``n`` is reachable when ``m <= n <= m + stride - 1``,
    and its output padding is ``n - m``.  ``window`` holds the per-dimension
    ``(stride, padding, dilation, kernel_size)``.
    """
    ndim = len(sample_shape) - 1
    if isinstance(output_size, (str, bytes)) or is_int(output_size):
        raise TypeError(
            f"output_size must be a sequence of ints, got output_size={output_size!r}"
        )
    try:
        sizes = tuple(output_size)
    except TypeError:
        raise TypeError(
            f"output_size must be a sequence of ints, got output_size={output_size!r}"
        ) from None
    if not all(is_int(v) for v in sizes):
        raise TypeError(f"output_size must contain only ints, got output_size={output_size!r}")
    full = ndim + (2 if batched else 1)
    if len(sizes) == full:  # as PyTorch: the leading (batch, channel) entries are ignored
        sizes = sizes[-ndim:]
    elif len(sizes) != ndim:
        raise ValueError(
            f"output_size must have {ndim} entries (the spatial sizes) or {full} (the whole "
            f"{'batched' if batched else 'unbatched'} output shape) for {layer}, got "
            f"output_size={tuple(output_size)} ({len(tuple(output_size))} entries)"
        )
    sizes = tuple(int(v) for v in sizes)
    stride, padding, dilation, kernel = window
    min_sizes = tuple(
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(sample_shape[1:], stride, padding, dilation, kernel)
    )
    max_sizes = tuple(m + s - 1 for m, s in zip(min_sizes, stride))
    if any(not lo <= n <= hi for n, lo, hi in zip(sizes, min_sizes, max_sizes)):
        raise ValueError(
            f"output_size={tuple(output_size)} is unreachable for {layer} with "
            f"stride={stride}, padding={padding}, dilation={dilation} on an input of spatial "
            f"size {sample_shape[1:]}: the spatial sizes must lie between {min_sizes} and "
            f"{max_sizes} (inclusive), got {sizes}"
        )
    return tuple(n - m for n, m in zip(sizes, min_sizes))


def _to_numpy(torch, tensor) -> np.ndarray:
    """Detached CPU values (bfloat16, which numpy lacks, widened exactly to float32)."""
    tensor = tensor.detach()
    if tensor.is_meta:
        raise ValueError(
            "the layer's parameters are on the 'meta' device and hold no values; "
            "materialise them (e.g. module.to_empty(device='cpu') and an initialisation) first"
        )
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy(force=True)


def _per_dimension(module, layer, name: str, ndim: int) -> tuple[int, ...]:
    """``module.<name>`` (stride, padding, ...) as ATen's convolution reads it.

    ``at::convolution`` expands a single value, an int or a one-element list,
    to every spatial dimension and rejects any other length, so
    ``Conv2d(2, 3, 3, stride=(2,))`` runs with stride ``(2, 2)``.
    """
    value = getattr(module, name)
    if is_int(value):
        return (int(value),) * ndim
    values = tuple(value)
    if len(values) == 1:
        return values * ndim
    if len(values) != ndim:
        raise ValueError(
            f"{layer} has {name}={value!r}, but PyTorch's convolution takes a single value or "
            f"one per spatial dimension ({ndim}) (its forward would raise)"
        )
    return values


def _check_kernel(module, layer, ndim: int, weight: np.ndarray):
    """A one-element ``kernel_size`` is not expanded: the weight keeps one spatial axis."""
    if weight.ndim != ndim + 2:
        raise ValueError(
            f"{layer} has kernel_size={module.kernel_size!r}, which PyTorch does not expand: "
            f"its weight of shape {weight.shape} has {weight.ndim - 2} kernel axes instead of "
            f"{ndim} (its forward would raise); give one kernel size per spatial dimension or "
            "an int"
        )


def _check_output_size_window(module, layer, ndim: int):
    """With ``output_size``, ``_output_padding`` indexes its settings ``[0]`` to ``[ndim - 1]``.

    It does so in Python, before the convolution would expand one-element
    lists, so a short ``stride``, ``padding`` or ``dilation`` raises an
    ``IndexError`` there.
    """
    for name in ("stride", "padding", "dilation", "kernel_size"):
        value = getattr(module, name)
        if is_int(value) or len(value) < ndim:
            raise ValueError(
                f"{layer} has {name}={value!r}: with output_size, PyTorch's "
                f"{type(module).__name__}.forward reads {name}[d] for each of its {ndim} "
                "spatial dimensions (its forward would raise an IndexError); give one value "
                "per spatial dimension"
            )


def _padded_dims(count: int, dims: int) -> bool:
    """Whether F.pad's non-constant modes pad the last ``count`` of ``dims`` dimensions.

    Its support table for 'reflect', 'replicate' and 'circular': the last 1
    dimension of a 2-d or 3-d tensor, the last 2 of a 3-d or 4-d one, the
    last 3 of a 4-d or 5-d one.
    """
    return 1 <= count <= 3 and count + 1 <= dims <= count + 2


def _conv_padding(module, layer, ndim: int, batched: bool):
    """The padding the layer's forward applies, as ``nn.ConvNd._conv_forward`` does.

    With ``padding_mode='zeros'`` the layer passes ``module.padding`` (ints or
    'same'/'valid') to ``F.conv{N}d``, which expands a one-element list.
    Otherwise it pads with ``F.pad(x, module._reversed_padding_repeated_twice,
    mode=padding_mode)`` (last dimension first, ``(before, after)`` each) and
    convolves unpadded.  That list is built from ``module.padding`` as it was
    given, so a one-element padding pads the last dimension only, when F.pad
    supports that for the input's number of dimensions.
    """
    if module.padding_mode == "zeros":
        if isinstance(module.padding, str):
            return module.padding
        return _per_dimension(module, layer, "padding", ndim)
    flat = tuple(int(v) for v in module._reversed_padding_repeated_twice)
    dims = ndim + (2 if batched else 1)
    count, odd = divmod(len(flat), 2)
    call = (
        f"{layer} with padding={module.padding!r} and padding_mode={module.padding_mode!r} "
        f"pads its input with F.pad(x, {list(flat)}, mode={module.padding_mode!r}) (its "
        "_reversed_padding_repeated_twice: the padding as given, last dimension first, each "
        "entry twice; a one-element padding is not expanded)"
    )
    if odd or not _padded_dims(count, dims):
        raise ValueError(
            f"{call}, a list F.pad's {module.padding_mode!r} mode rejects for the {dims}-d "
            f"{'batched' if batched else 'unbatched'} input (its forward would raise); give "
            "padding one entry per spatial dimension"
        )
    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(count)]  # last dimension first
    if count > ndim and pairs[ndim] != (0, 0):  # the channel axis of a batched input
        raise ValueError(
            f"{call}, which pads the channel axis by {pairs[ndim]}: the convolution then gets "
            f"{module.in_channels + sum(pairs[ndim])} channels instead of {module.in_channels} "
            "(its forward would raise); give padding one entry per spatial dimension"
        )
    spatial = pairs[:ndim] + [(0, 0)] * (ndim - count)  # dims F.pad does not reach: unpadded
    return tuple(reversed(spatial))


def from_torch(module, input_shape, *, output_size=None, dtype=None, threads=None,
               max_bytes=None, keep_transpose=True):
    """The operator and bias of a PyTorch convolution layer.

    Parameters
    ----------
    module : torch.nn.Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d or ConvTranspose3d
        The layer (subclasses included, e.g. a layer with a parametrization).
        Every setting is carried over: stride, padding (ints or
        'same'/'valid'), dilation, groups, padding_mode and, for transposed
        layers, output_padding; a one-element tuple is read as the layer's
        forward reads it (see Notes).
    input_shape : sequence of int
        The layer's input, ``(C_in, *L)`` or with a batch axis
        ``(B, C_in, *L)``; the batch axis is dropped (the operator acts on one
        sample).
    output_size : sequence of int, optional
        Transposed layers only: the output size you would pass to
        ``module(x, output_size=...)``.  ``output_padding`` is then chosen as
        PyTorch chooses it (see Notes) instead of ``module.output_padding``.
        Either the ``N`` spatial sizes or the whole output shape (``N + 1``
        entries without a batch axis, ``N + 2`` with one), whose leading
        entries are ignored, as PyTorch ignores them.
    dtype : dtype, optional
        Value dtype of the operator and the bias.  Default: the layer's own
        (float32 stays float32, float64 float64, complex stays complex);
        float16 and bfloat16 layers give float32, as a float16 weight does in
        :class:`ConvOperator`.
    threads, max_bytes : int, optional
        As for :class:`ConvOperator`: ``max_bytes`` refuses, before anything
        is allocated, an operator whose product form would need more bytes.
    keep_transpose : bool, optional
        As for :class:`ConvOperator`: ``False`` stores one product form for
        both directions (half the memory once both have run).  Default True.

    Returns
    -------
    operator : ConvOperator or ConvTransposeOperator
        A :class:`ConvOperator` for ``Conv{N}d`` and a
        :class:`ConvTransposeOperator` for ``ConvTranspose{N}d``, built from a
        copy of ``module.weight`` (detached, on the CPU): later changes to the
        layer do not reach it.  ``operator.input_shape`` and
        ``operator.output_shape`` are one sample's shapes.
    bias : numpy.ndarray or None
        ``module.bias`` repeated over the output positions: a new vector of
        length ``C_out * prod(O)`` (``operator.shape[0]``), channel-major like
        ``operator.output_shape``, in the operator's dtype; ``None`` when the
        layer has no bias.  The layer is exactly ``W @ x.ravel() + bias`` (see
        Notes).

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    TypeError
        If ``module`` is not one of the six layer types above (e.g.
        ``nn.Linear`` or a custom module), if it is a lazy layer
        (``nn.LazyConv2d``, ...) whose parameters are not initialised yet, or
        if ``input_shape``/``output_size`` are not sequences of ints.
    ValueError
        If ``input_shape`` does not fit the layer (number of dimensions or of
        channels), if ``output_size`` is given for a non-transposed layer, has
        the wrong number of entries or is unreachable, if a transposed layer
        has settings its own forward rejects (a padding mode other than
        'zeros', string padding), if a setting has a length the layer's
        forward rejects (see Notes; the message names the setting), and for
        the invalid geometries listed in :func:`conv_matrix` (e.g. reflect
        padding as large as the input).
    MemoryError
        If ``max_bytes`` is exceeded.

    See Also
    --------
    to_torch : the operator's matrix as a ``torch.sparse_csr_tensor``.

    Notes
    -----
    With ``op, b = from_torch(layer, x.shape)``, one sample and a batch are::

        layer(x).ravel()  ==  op @ x.ravel() + b                   # x: (C_in, *L)
        layer(X).reshape(B, -1)  ==  (op @ X.reshape(B, -1).T).T + b   # X: (B, C_in, *L)

    up to rounding (the summation order differs); without a bias leave out
    ``+ b``.  ``op.conv(x) + b.reshape(op.output_shape)`` keeps the shapes.

    The padding is the one the layer's forward applies.  With
    ``padding_mode='zeros'`` that is ``module.padding``, strings included;
    'same' pads ``dilation * (k - 1)`` in total per dimension, the extra
    element of an odd total after the input (PyTorch's split, which
    :func:`conv_matrix` follows).  With 'reflect', 'replicate' or 'circular'
    PyTorch pads with ``F.pad(x, module._reversed_padding_repeated_twice,
    mode=padding_mode)`` and convolves without padding; the operator takes
    its ``(before, after)`` pairs from that attribute, so it matches the
    layer's forward even for an asymmetric 'same'.  PyTorch's transposed
    layers support only zero padding and integer padding.

    A setting with one entry where the layer has ``N`` spatial dimensions
    (``Conv2d(2, 3, 3, stride=(2,))`` is a valid layer) is read as the
    layer's forward reads it, which differs between settings:

    - ``stride``, ``dilation``, ``output_padding`` and, with
      ``padding_mode='zeros'``, ``padding`` go to ATen's convolution, which
      repeats a single value over the ``N`` dimensions and rejects any
      other length.
    - With 'reflect', 'replicate' or 'circular',
      ``_reversed_padding_repeated_twice`` is built from ``padding`` as
      given and ``F.pad`` pads the last dimensions first: ``padding=(p,)``
      pads the last dimension only.  ``F.pad`` supports that for a
      ``Conv2d`` on an unbatched input, but not on a batched one nor for a
      ``Conv3d``, so the operator depends on whether ``input_shape`` has a
      batch axis.  Likewise ``padding='same'`` with ``dilation=(d,)`` pads
      only the first spatial dimension (the constructor zips ``dilation``
      with ``kernel_size``) while the convolution dilates all of them, and a
      padding with ``N + 1`` entries reaches the channel axis of a batched
      ``Conv1d``/``Conv2d`` input, which only a leading 0 leaves intact.
    - With ``output_size``, ``_output_padding`` reads ``stride[d]``,
      ``padding[d]`` and ``dilation[d]`` for every dimension before anything
      is expanded (a one-element one raises an ``IndexError`` there), and
      ``module.output_padding`` is not read at all.
    - A one-element ``kernel_size`` is not expanded: the weight keeps one
      kernel axis and the forward always raises.

    Where the layer's forward would raise, ``from_torch`` raises a
    ``ValueError`` that names the layer and the setting.

    For ``output_size``, PyTorch's ``_ConvTransposeNd._output_padding``
    computes per spatial dimension the smallest output size
    ``m = (O - 1) * stride - 2 * padding + dilation * (k - 1) + 1`` and
    accepts the sizes ``m <= n <= m + stride - 1``, with
    ``output_padding = n - m``; the layer's own ``output_padding`` is then
    ignored.  The same rule applies here.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sparse_tconv import from_torch
    >>> _ = torch.manual_seed(0)
    >>> layer = torch.nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect",
    ...                         dtype=torch.float64)
    >>> op, b = from_torch(layer, (3, 16, 16))
    >>> op.output_shape, b.shape
    ((8, 16, 16), (2048,))
    >>> x = torch.randn(3, 16, 16, dtype=torch.float64)
    >>> np.allclose(op @ x.numpy().ravel() + b, layer(x).detach().numpy().ravel())
    True

    A one-element padding in 'reflect' mode pads the last dimension only, and
    only an unbatched input can take it:

    >>> layer = torch.nn.Conv2d(2, 3, 3, stride=(2,), padding=(1,), padding_mode="reflect")
    >>> op, b = from_torch(layer, (2, 8, 8))
    >>> op.stride, op.padding, op.output_shape
    ((2, 2), ((0, 0), (1, 1)), (3, 3, 4))
    >>> tuple(layer(torch.randn(2, 8, 8)).shape)
    (3, 3, 4)
    >>> from_torch(layer, (1, 2, 8, 8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: Conv2d(2, 3, kernel_size=(3, 3)) with padding=(1,) ... (its forward would raise)...

    A transposed layer with a requested output size (a float32 layer gives a
    float32 operator):

    >>> up = torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1)
    >>> y = torch.randn(1, 8, 16, 16)
    >>> op, b = from_torch(up, y.shape, output_size=(32, 32))
    >>> op.output_shape, op.output_padding, op.dtype
    ((4, 32, 32), (1, 1), dtype('float32'))
    >>> expected = up(y, output_size=(32, 32)).detach().numpy().ravel()
    >>> np.allclose(op @ y.numpy().ravel() + b, expected, atol=1e-5)
    True

    The operator norm of a layer is not the norm that
    ``torch.nn.utils.parametrizations.spectral_norm`` estimates, the largest
    singular value of the kernel reshaped to ``K`` of shape
    ``(C_out, C_in * prod(k))``.  With zero padding, each output position
    applies ``K`` to one patch, and for each tap the positions read distinct
    inputs, so ``||W x||^2 <= ||K||^2 * prod(k) * ||x||^2``; and a unit patch
    placed where the whole window is inside the input gives
    ``||W|| >= ||K||``.  Hence ``||K|| <= ||W|| <= sqrt(prod(k)) * ||K||``,
    and the power-iteration estimate is at most ``||K||``:

    >>> from torch.nn.utils.parametrizations import spectral_norm
    >>> _ = torch.manual_seed(0)
    >>> layer = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False, dtype=torch.float64)
    >>> op, _ = from_torch(layer, (3, 8, 8))
    >>> exact = np.linalg.norm(op.matrix.toarray(), 2)  # dense SVD: small layers only
    >>> kernel = np.linalg.norm(op.weight.reshape(8, -1), 2)
    >>> layer = spectral_norm(layer).eval()
    >>> original = layer.parametrizations.weight.original
    >>> with torch.no_grad():  # sigma = ||original|| / ||original / sigma||
    ...     estimate = float(original.norm() / layer.weight.norm())
    >>> print(f"{exact:.4f} {kernel:.4f} {estimate:.4f}")
    1.4728 0.8079 0.8079
    >>> bool(estimate <= kernel <= exact <= 3 * kernel)  # 3 = sqrt(3 * 3)
    True
    """
    torch = _import_torch("from_torch")
    ndim, transposed = _layer_kind(torch, module)
    layer = _describe(module)
    sample_shape, batched = _split_input_shape(input_shape, module, ndim)
    weight = _to_numpy(torch, module.weight)
    op = _build_operator(module, layer, transposed, ndim, weight, sample_shape, batched,
                         output_size, dict(dtype=dtype, threads=threads, max_bytes=max_bytes,
                              keep_transpose=keep_transpose))
    if module.bias is None:
        return op, None
    bias = _to_numpy(torch, module.bias)
    if np.iscomplexobj(bias) and op.dtype.kind != "c":
        raise TypeError(
            f"cannot use dtype={op.dtype} for {layer}: its bias is complex "
            f"(bias.dtype={bias.dtype}) and the imaginary part would be discarded"
        )
    positions = math.prod(op.output_shape[1:])
    return op, np.repeat(bias.astype(op.dtype, copy=False), positions)


def _build_operator(module, layer, transposed, ndim, weight, sample_shape, batched, output_size,
                    options):
    """The operator with the layer's settings (validated as its forward would)."""
    _check_kernel(module, layer, ndim, weight)
    if transposed:
        cls = ConvTransposeOperator
        settings = _transpose_settings(module, layer, ndim, sample_shape, batched, output_size)
    else:
        if output_size is not None:
            raise ValueError(
                f"output_size is for transposed convolutions only; {layer} is a "
                f"{type(module).__name__}, got output_size={output_size!r}"
            )
        cls = ConvOperator
        settings = dict(
            stride=_per_dimension(module, layer, "stride", ndim),
            dilation=_per_dimension(module, layer, "dilation", ndim),
            padding=_conv_padding(module, layer, ndim, batched),
            padding_mode=module.padding_mode,
        )
    try:
        return cls(weight, sample_shape, groups=module.groups, **options, **settings)
    except ValueError as exc:  # the geometry does not fit: say which layer
        raise ValueError(f"{layer} on input shape {sample_shape}: {exc}") from None


def _transpose_settings(module, layer, ndim, sample_shape, batched, output_size):
    """stride, padding, dilation and output_padding of a transposed layer's forward."""
    if module.padding_mode != "zeros":
        raise ValueError(
            f"{layer} has padding_mode={module.padding_mode!r}, but PyTorch's transposed "
            "convolutions support only padding_mode='zeros' (its forward would raise)"
        )
    padding = module.padding  # 'same' is stored as the tuple ('s', 'a', 'm', 'e')
    entries = (padding,) if is_int(padding) else tuple(padding)
    if isinstance(padding, str) or not all(is_int(p) for p in entries):
        raise ValueError(
            f"{layer} has padding={module.padding!r}, but PyTorch's transposed convolutions "
            "take integer padding only (its forward would raise)"
        )
    if output_size is not None:  # before the expansion, as the forward does
        _check_output_size_window(module, layer, ndim)
    stride, padding, dilation = (_per_dimension(module, layer, name, ndim)
                                 for name in ("stride", "padding", "dilation"))
    if output_size is None:
        output_padding = _per_dimension(module, layer, "output_padding", ndim)
    else:  # module.output_padding is ignored, whatever its length
        window = (stride, padding, dilation, tuple(module.kernel_size)[:ndim])
        output_padding = _output_padding(layer, sample_shape, batched, output_size, window)
    return dict(stride=stride, padding=padding, dilation=dilation, output_padding=output_padding)


# ---------------------------------------------------------------------------
# to_torch
# ---------------------------------------------------------------------------


def _index_dtype(torch, index_dtype):
    if index_dtype is None:
        return None
    if index_dtype is torch.int32 or index_dtype is torch.int64:
        return np.dtype(np.int32 if index_dtype is torch.int32 else np.int64)
    try:
        dt = np.dtype(index_dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(
            f"index_dtype must be None, int32 or int64 (numpy or torch), "
            f"got index_dtype={index_dtype!r}"
        )
    return dt


def _shareable(array: np.ndarray, dtype=None, *, copy: bool = False,
               read_only: bool = False) -> np.ndarray:
    """``array`` itself when torch can share it (and no copy is asked for), else a copy it can.

    A read-only array is shared only with ``read_only=True`` (an operator's
    matrix, read-only because the operator shares it): torch has no
    read-only tensors, see :func:`to_torch`.
    """
    dtype = array.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    if (
        not copy
        and array.dtype == dtype
        and array.dtype.isnative
        and array.flags.c_contiguous
        and (array.flags.writeable or read_only)
    ):
        return array
    return np.array(array, dtype=dtype, order="C", copy=True)


def _tensor(torch, array: np.ndarray):
    """``torch.from_numpy`` of an array that may be read-only (see :func:`_shareable`)."""
    with warnings.catch_warnings():
        # "The given NumPy array is not writable, and PyTorch does not support
        # non-writable tensors": the sharing is documented in to_torch.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


# numpy dtypes for the values of a tensor (torch's own dtypes are taken as they are)
_VALUE_DTYPES = ("float16", "float32", "float64", "complex64", "complex128")


def _value_dtype(torch, dtype):
    """The torch dtype asked for by ``dtype=`` (None: keep the matrix's)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"dtype must be a floating or complex dtype, got dtype={dtype}")
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _VALUE_DTYPES:
        raise TypeError(
            f"dtype must be a torch floating or complex dtype or one of {_VALUE_DTYPES}, "
            f"got dtype={dtype!r}"
        )
    return getattr(torch, name)


def _device(torch, device):
    """``torch.device(device)``, or None; an unknown name is a ValueError naming it."""
    if device is None:
        return None
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
            f"got device={device!r} ({str(exc).splitlines()[0].rstrip(' -:')})"
        ) from None
    if where.type == "meta":
        raise ValueError("device='meta' holds no values; a matrix needs a real device")
    return where


def _convert(torch, tensors, values, dtype, device):
    """``(crow, col, values)`` in the asked dtype and on the asked device."""
    if dtype is not None and dtype != values.dtype:
        if values.dtype.is_complex and not dtype.is_complex:
            raise TypeError(
                f"cannot use dtype={dtype} for a complex matrix (dtype {values.dtype}): "
                "the imaginary part would be discarded"
            )
        values = values.to(dtype)
    tensors = (*tensors, values)
    if device is None or device == values.device:
        return tensors
    try:
        return tuple(t.to(device) for t in tensors)
    except (RuntimeError, AssertionError) as exc:  # torch asserts a CUDA build
        raise ValueError(f"cannot place the tensor on device={device!s}: {exc}") from None


def to_torch(matrix, *, dtype=None, device=None, index_dtype=None, copy=False):
    """A scipy sparse matrix or a convolution operator as a ``torch.sparse_csr_tensor``.

    Parameters
    ----------
    matrix : scipy sparse matrix or array, ConvOperator or ConvTransposeOperator
        Any scipy sparse format (converted to CSR), or an operator, for which
        its :attr:`~ConvOperator.matrix` is used: the matrix that ``op @ x``
        applies (W for a :class:`ConvOperator`, the transposed convolution's
        matrix for a :class:`ConvTransposeOperator`).
    index_dtype : {None, int32, int64}, optional
        Dtype of the tensor's ``crow_indices`` and ``col_indices`` (numpy or
        torch dtypes).  Default ``None``: that of the matrix (the library
        builds int32 indices whenever they fit).
    dtype : torch or numpy dtype, optional
        Dtype of the tensor's values, a floating or complex one (e.g.
        ``torch.float32``, ``np.float32``, ``torch.bfloat16``).  Default
        ``None``: that of the matrix.  A complex matrix cannot be made real.
    device : torch.device or str, optional
        Where the tensor lives, e.g. ``'cpu'`` or ``'cuda:0'``.  Default
        ``None``: the CPU.
    copy : bool, optional
        ``True``: the tensor gets arrays of its own.  Default ``False``:
        it shares them whenever it can (see Notes).

    Returns
    -------
    torch.Tensor
        A tensor with layout ``torch.sparse_csr``, the matrix's shape and
        stored entries (explicit zeros included), in the matrix's dtype
        unless ``dtype`` is given, so ``to_torch(op) @ x == op @ x`` for a
        torch vector or matrix ``x`` of the same dtype.  See
        :func:`from_torch_sparse` for the way back.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    TypeError
        If ``matrix`` is neither a scipy sparse matrix/array nor a
        :class:`ConvOperator`/:class:`ConvTransposeOperator` (a dense array,
        another ``LinearOperator``), or if its dtype has no torch equivalent.
        Also for a ``dtype`` that is not a floating or complex dtype, or a
        real ``dtype`` for a complex matrix.
    ValueError
        For a sparse array that is not 2-d, an invalid ``index_dtype``, or
        int32 for a matrix too large for it; a ``device`` torch does not know
        or cannot use here (e.g. ``'cuda'`` without a CUDA build).

    Notes
    -----
    Unless ``copy=True``, copies are made only where needed.  A tensor on the
    CPU in the matrix's dtype **shares memory** with ``data``, ``indices`` and
    ``indptr`` of a CSR
    matrix in canonical format (sorted column indices, no duplicates), which
    is what every matrix of this library is: nothing is copied, and writing
    to the values of one writes to the other.  An operator's matrix is
    read-only (see :class:`ConvOperator`), but torch has no read-only
    tensors: the tensor shares it all the same, and writing into it would
    change the operator's products too (what torch calls undefined
    behaviour); pass ``copy=True`` for a tensor you may write into.
    Otherwise a copy is made:

    - of everything, for another sparse format (converted with ``tocsr()``)
      or a CSR matrix that is not canonical (canonicalised on a copy, since
      torch requires sorted, distinct column indices per row; duplicates are
      summed; the argument is not modified);
    - of the index arrays, when ``index_dtype`` differs from theirs (or when
      ``indptr`` and ``indices`` differ in dtype: both become the wider);
    - of any array that is non-contiguous or not in native byte order
      (torch cannot share it), or read-only in a scipy matrix you pass;
    - of the values, in another ``dtype``; of everything, onto another
      ``device``.

    A scipy matrix is checked against torch's CSR invariants (indices in
    range, sorted and distinct per row), which costs about one product; an
    operator's matrix is valid by construction and is not checked.

    The index dtype is kept rather than widened to torch's default int64:
    torch accepts int32 CSR indices, and its MKL-backed CPU products use
    them directly (several times faster than with int64 indices).

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sparse_tconv import ConvOperator, to_torch
    >>> rng = np.random.default_rng(0)
    >>> op = ConvOperator(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), (2, 8, 8),
    ...                   padding=1)
    >>> t = to_torch(op)
    >>> t.layout, t.dtype, tuple(t.shape), t.crow_indices().dtype
    (torch.sparse_csr, torch.float32, (256, 128), torch.int32)
    >>> x = rng.standard_normal(128).astype(np.float32)
    >>> np.allclose((t @ torch.from_numpy(x)).numpy(), op @ x, atol=1e-5)
    True
    >>> t.values().data_ptr() == op.matrix.data.ctypes.data  # shared, not copied
    True
    >>> to_torch(op, index_dtype=torch.int64).col_indices().dtype
    torch.int64
    >>> to_torch(op, copy=True).values().data_ptr() == op.matrix.data.ctypes.data
    False
    >>> to_torch(op, dtype=torch.float64, device="cpu").dtype
    torch.float64
    """
    torch = _import_torch("to_torch")
    value_dtype, where = _value_dtype(torch, dtype), _device(torch, device)
    if isinstance(matrix, _ConvOperatorBase):
        csr = matrix.matrix
        check = False  # valid by construction
    elif is_sparse(matrix):
        if len(matrix.shape) != 2:
            raise ValueError(
                f"matrix must be 2-dimensional, got a sparse array of shape {matrix.shape}"
            )
        check = True
        csr = matrix if matrix.format == "csr" else matrix.tocsr()
    else:
        kind = type(matrix)
        raise TypeError(
            "matrix must be a scipy sparse matrix or array, a ConvOperator or a "
            f"ConvTransposeOperator, got an object of type {kind.__module__}.{kind.__qualname__}"
        )
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    idx = _index_dtype(torch, index_dtype)
    if idx is None:
        idx = np.promote_types(csr.indptr.dtype, csr.indices.dtype)
    if idx == np.dtype(np.int32) and max(csr.nnz, *csr.shape) > np.iinfo(np.int32).max:
        raise ValueError(
            f"index_dtype=int32 cannot index this matrix (shape={csr.shape}, nnz={csr.nnz})"
        )
    copy = check_bool(copy, "copy")
    share = dict(copy=copy, read_only=not check)  # an operator's own read-only matrix
    crow = _tensor(torch, _shareable(csr.indptr, idx, **share))
    col = _tensor(torch, _shareable(csr.indices, idx, **share))
    try:
        values = _tensor(torch, _shareable(csr.data, **share))
    except TypeError:
        raise TypeError(
            f"the matrix's dtype {csr.data.dtype} has no torch equivalent; convert it first, "
            "e.g. matrix.astype(np.float64)"
        ) from None
    crow, col, values = _convert(torch, (crow, col), values, value_dtype, where)
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state", warned once per process.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=csr.shape,
                                       check_invariants=check)


# ---------------------------------------------------------------------------
# from_torch_sparse
# ---------------------------------------------------------------------------

# torch value dtypes numpy lacks, widened exactly
_WIDENED = {"bfloat16": "float32", "float16": "float32", "complex32": "complex64"}


def _sparse_layout(torch, tensor):
    """The layout of a 2-d CSR or COO tensor; the errors name what was given."""
    if not isinstance(tensor, torch.Tensor):
        kind = type(tensor)
        raise TypeError(
            "tensor must be a torch sparse tensor (layout torch.sparse_csr or torch.sparse_coo), "
            f"got an object of type {kind.__module__}.{kind.__qualname__}"
        )
    layout = tensor.layout
    if layout == torch.strided:
        raise TypeError(
            "tensor must be a sparse tensor (layout torch.sparse_csr or torch.sparse_coo), got "
            f"a dense tensor (layout torch.strided, shape {tuple(tensor.shape)}); "
            "scipy.sparse.csr_array(tensor.numpy()) converts a dense one"
        )
    if layout not in (torch.sparse_csr, torch.sparse_coo):
        raise TypeError(
            f"tensor must have layout torch.sparse_csr or torch.sparse_coo, got layout {layout}; "
            "convert it first with tensor.to_sparse_csr()"
        )
    if tensor.dim() != 2 or tensor.dense_dim() != 0:
        raise ValueError(
            f"tensor must be a 2-d sparse matrix, got shape {tuple(tensor.shape)} with "
            f"{tensor.sparse_dim()} sparse and {tensor.dense_dim()} dense dimensions "
            f"(layout {layout})"
        )
    if tensor.is_meta:
        raise ValueError("tensor is on the 'meta' device and holds no values")
    return layout


def _values(torch, tensor) -> np.ndarray:
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _WIDENED:
        tensor = tensor.to(getattr(torch, _WIDENED[name]))
    try:
        return tensor.numpy()
    except TypeError:
        raise TypeError(f"the tensor's dtype {tensor.dtype} has no numpy equivalent") from None


def from_torch_sparse(tensor, *, copy=False):
    """A torch sparse CSR or COO matrix as a :class:`scipy.sparse.csr_array`.

    The way back from :func:`to_torch`.

    Parameters
    ----------
    tensor : torch.Tensor
        A 2-d tensor with layout ``torch.sparse_csr`` (int32 or int64
        indices) or ``torch.sparse_coo`` (coalesced first, which sums
        duplicates), on any device (copied to the CPU).  Not modified; its
        gradient, if any, is not followed.
    copy : bool, optional
        ``True``: the result gets arrays of its own.  Default ``False``: on
        the CPU it shares the tensor's arrays where it can (see Notes).

    Returns
    -------
    scipy.sparse.csr_array
        The same shape and stored entries (explicit zeros included).  Values
        keep their dtype, except the ones numpy lacks, widened exactly:
        bfloat16 and float16 to float32, complex32 to complex64.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    TypeError
        If ``tensor`` is not a torch tensor, is dense (``torch.strided``) or
        has another sparse layout (CSC, BSR, BSC), or its dtype has no numpy
        equivalent.
    ValueError
        If it is not 2-d (a batch, or values with dense dimensions) or is on
        the ``'meta'`` device.

    Notes
    -----
    Unless ``copy=True``, a CSR tensor on the CPU shares its values and index
    arrays with the result (writing to one writes to the other), except where
    scipy converts the indices to another dtype (it may narrow int64 indices
    that fit in int32).  A COO tensor's row indices become row pointers, so
    only its values and column indices can be shared.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sparse_tconv import conv_matrix, from_torch_sparse, to_torch
    >>> W = conv_matrix(np.arange(6.0).reshape(1, 2, 3), (2, 5), padding=1)
    >>> back = from_torch_sparse(to_torch(W))
    >>> type(back).__name__, back.shape, back.dtype, (back != W).nnz
    ('csr_array', (5, 10), dtype('float64'), 0)
    >>> (from_torch_sparse(to_torch(W).to_sparse_coo()) != W).nnz
    0
    """
    torch = _import_torch("from_torch_sparse")
    layout = _sparse_layout(torch, tensor)
    copy = check_bool(copy, "copy")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    shape = tuple(int(n) for n in t.shape)
    if layout == torch.sparse_csr:
        indptr, indices = t.crow_indices().numpy(), t.col_indices().numpy()
        return sp.csr_array((_values(torch, t.values()), indices, indptr), shape=shape, copy=copy)
    t = t.coalesce()  # sorted by (row, column), no duplicates
    rows, indices = t.indices().numpy()
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    matrix = sp.csr_array((_values(torch, t.values()), indices, indptr), shape=shape, copy=copy)
    matrix.has_canonical_format = True  # coalesced: sorted, distinct per row
    return matrix
