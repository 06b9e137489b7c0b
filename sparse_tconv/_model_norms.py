"""Certified norm bounds of every convolution a PyTorch model applies.

:func:`~sparse_tconv.spectral.model_norm_bounds` is written in
``spectral`` (it calls ``norm_bounds`` there, and this module must not
import ``spectral``, which re-exports its classes); this module finds the
convolutions a forward pass applies, at the input shapes they receive, and
holds the rows: :class:`LayerNormBounds` per application and
:class:`ModelNormBounds` for the model.

PyTorch is an optional dependency, imported only when a model is walked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from ._bounds import NormBounds
from ._geometry import ConvGeometry
from ._torch import _import_torch, _layer_kind, from_torch
from ._validation import normalize_shape

__all__ = ["LayerNormBounds", "ModelNormBounds"]

# The layers walked, by their names in torch.nn (subclasses included).
_CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
               "ConvTranspose3d")

# norm_bounds' warning that its interval is wider than rtol starts with this.
_WIDE = "norm_bounds: "


@dataclasses.dataclass(frozen=True)
class LayerNormBounds:
    """The certified norm interval of one convolution applied by a model.

    One row of :class:`ModelNormBounds`, made by
    :func:`~sparse_tconv.spectral.model_norm_bounds`: a layer applied twice
    in the forward pass gives two rows, each at the input it received.

    Attributes
    ----------
    name : str
        The layer's name in ``model.named_modules()`` (``''`` for the model
        itself).
    description : str
        One line, e.g. ``'Conv2d(64->64, 3x3, stride 1, padding 1, zeros) on
        64x56x56'``: the layer's class, channels, kernel, stride, dilation
        (when not 1), padding (per side when asymmetric), output padding,
        groups, padding mode, and the sample shape it received.
    geometry : ConvGeometry
        The normalised geometry of the forward convolution, as in
        ``op.convolution.geometry`` of the layer's operator (for a transposed
        layer, the convolution it transposes).
    transposed : bool
        Whether the layer is a ``ConvTranspose{N}d``.
    input_shape, output_shape : tuple of int
        One sample's shapes, ``(C, *L)``, as the forward pass gave them.
    lower, upper : float
        ``lower <= ||W||_2 <= upper`` for the layer's matrix W at that input
        (its bias left out: an affine map has its linear part's Lipschitz
        constant), computed in float64 (complex128 for a complex layer).
    seconds : float
        Wall-clock seconds of the :func:`~sparse_tconv.spectral.norm_bounds`
        call.
    build_seconds : float
        Wall-clock seconds of building the operator
        (:func:`~sparse_tconv.from_torch`).
    certified : bool
        Whether ``gap <= rtol``.  The interval holds either way; an
        uncertified row is only wider than asked.
    reason : str or None
        Why the row is not certified: ``norm_bounds``' warning (which names
        the certificate that could not close the interval); ``None`` when it
        is.
    """

    name: str
    description: str
    geometry: ConvGeometry
    transposed: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    lower: float
    upper: float
    seconds: float
    build_seconds: float
    certified: bool
    reason: str | None

    @property
    def gap(self) -> float:
        """``upper / lower - 1`` (0 for a zero layer, inf when ``lower`` alone is 0)."""
        return NormBounds(self.lower, self.upper).gap


class ModelNormBounds(Sequence):
    """The certified norm intervals of a model's convolutions, in forward order.

    Returned by :func:`~sparse_tconv.spectral.model_norm_bounds`.  A sequence
    of :class:`LayerNormBounds` (iteration, ``len``, indexing), with the
    model's figures.

    Attributes
    ----------
    input_shape : tuple of int
        The sample shape the model was run on (no batch axis).
    rtol : float
        The relative width asked of each interval.
    """

    def __init__(self, rows: Sequence[LayerNormBounds], *, input_shape: tuple[int, ...],
                 rtol: float):
        self._rows = tuple(rows)
        self.input_shape = tuple(input_shape)
        self.rtol = float(rtol)

    @overload
    def __getitem__(self, index: int) -> LayerNormBounds: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LayerNormBounds, ...]: ...

    def __getitem__(self, index):
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[LayerNormBounds]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return (f"ModelNormBounds({len(self)} convolutions on input_shape={self.input_shape}, "
                f"upper_product={self.upper_product:.6g}, {len(self.uncertified)} not "
                f"certified to rtol={self.rtol:g})")

    @property
    def upper_product(self) -> float:
        """The product of the rows' upper bounds: ``prod_i upper_i >= prod_i ||W_i||_2``.

        It is guaranteed whether or not the rows are certified to ``rtol``
        (every upper bound holds; an uncertified row only makes it looser).
        It bounds the Lipschitz constant, in the Euclidean norm of the
        flattened sample, of the composition of these convolutions (biases
        included), at the input sizes of this run, **when the network is a
        plain chain of them with 1-Lipschitz maps in between** (ReLU, and
        other maps each at most 1-Lipschitz): the composition's constant is
        at most the product of its factors'.

        It is *not* a bound on the model's Lipschitz constant when the model
        has anything else: a residual block ``x + f(x)`` has constant up to
        ``1 + Lip(f)``, not ``Lip(f)``, so for a ResNet the product is not a
        bound on the network's constant; batch normalisation in eval mode scales
        channel ``c`` by ``|gamma_c| / sqrt(var_c + eps)``, which may exceed
        1; overlapping max pooling is up to ``sqrt(windows per element)``
        Lipschitz (2 for 3x3 windows with stride 2); fully connected layers,
        attention and branches in parallel are not counted at all.  It is
        also far from tight on most networks: the product of the norms
        ignores that the layers' top singular vectors do not align.  It is
        the figure the literature reports as a per-layer product (e.g. for
        ResNet-18), with both sides here certified.
        """
        return math.prod(row.upper for row in self._rows)

    @property
    def seconds(self) -> float:
        """Total seconds in :func:`~sparse_tconv.spectral.norm_bounds`, over the rows."""
        return sum(row.seconds for row in self._rows)

    @property
    def build_seconds(self) -> float:
        """Total seconds building the operators (:func:`~sparse_tconv.from_torch`)."""
        return sum(row.build_seconds for row in self._rows)

    @property
    def uncertified(self) -> tuple[LayerNormBounds, ...]:
        """The rows whose interval is wider than ``rtol`` (empty when every one is certified)."""
        return tuple(row for row in self._rows if not row.certified)

    def table(self) -> str:
        """The rows as a text table, with the totals and the uncertified rows' reasons.

        One line per row: its index (from 1), name, description, lower and
        upper bounds, gap in percent, seconds of ``norm_bounds``, and ``*``
        when the row is not certified to ``rtol``.  Then the number of
        convolutions and the seconds, the product of the upper bounds, and
        each uncertified row with its reason.
        """
        header = ("#", "layer", "convolution", "lower", "upper", "gap %", "seconds", "")
        body = [(str(i), row.name or "(model)", row.description, f"{row.lower:.6g}",
                 f"{row.upper:.6g}", _percent(row.gap), f"{row.seconds:.2f}",
                 "" if row.certified else "*")
                for i, row in enumerate(self._rows, 1)]
        widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]
        left = {1, 2}  # the text columns; numbers are right-aligned

        def line(cells) -> str:
            return "  ".join(c.ljust(w) if j in left else c.rjust(w)
                             for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

        shape = "x".join(map(str, self.input_shape))
        lines = [line(header), *map(line, body), ""]
        lines.append(f"{len(self)} convolutions on input {shape}: {self.seconds:.2f} s in "
                     f"norm_bounds, {self.build_seconds:.2f} s building the operators "
                     f"(rtol {self.rtol:g})")
        lines.append(f"product of the upper bounds: {self.upper_product:.6g} (a bound for a "
                     "plain chain of these convolutions with 1-Lipschitz maps between them, not "
                     "for residual blocks or batch norm: see ModelNormBounds.upper_product)")
        uncertified = [(i, row) for i, row in enumerate(self._rows, 1) if not row.certified]
        if not uncertified:
            lines.append(f"every convolution certified to rtol {self.rtol:g}")
        else:
            lines.append(f"* not certified to rtol {self.rtol:g} ({len(uncertified)} of "
                         f"{len(self)}; the intervals hold all the same):")
            lines += [f"  #{i} {row.name or '(model)'}: {row.reason}" for i, row in uncertified]
        return "\n".join(lines)


def _percent(gap: float) -> str:
    """A gap in percent: three decimals, or two digits where those would show 0.000."""
    percent = 100 * gap
    return f"{percent:.3f}" if percent == 0 or percent >= 1e-3 else f"{percent:.1e}"


# ---------------------------------------------------------------------------
# The walk: which convolutions the forward pass applies, and to what
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Application:
    """One call of a convolution layer in the forward pass."""

    name: str
    module: Any
    input_shape: tuple[int, ...]  # as the layer received it, batch axis included
    output_shape: tuple[int, ...] | None  # None when the forward returned no tensor


def _check_input_shape(input_shape) -> tuple[int, ...]:
    shape = normalize_shape(input_shape, "input_shape")
    if not shape:
        raise ValueError("input_shape must be one sample's shape, e.g. (3, 224, 224) (no batch "
                         "axis), got input_shape=()")
    return shape


def _applications(torch, model, sample_shape: tuple[int, ...]) -> list[_Application]:
    """The convolutions one forward pass on zeros applies, in order.

    The model is put in eval mode for the pass, and every submodule's
    ``training`` flag restored after it; the hooks are removed whatever
    happens.
    """
    types = tuple(getattr(torch.nn, name) for name in _CONV_TYPES)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
    if not convs:
        kind = type(model)
        raise ValueError(
            "model has no convolution layers (torch.nn.Conv1d, Conv2d, Conv3d, ConvTranspose1d, "
            f"ConvTranspose2d or ConvTranspose3d): nothing to bound in a {kind.__module__}."
            f"{kind.__qualname__}")
    names = {id(m): name for name, m in convs}  # named_modules: the first name of a shared one
    found: list[_Application] = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        found.append(_Application(names[id(module)], module, tuple(x.shape), shape))

    parameter = next(model.parameters(), None)
    dtype = torch.get_default_dtype() if parameter is None else parameter.dtype
    device = "cpu" if parameter is None else parameter.device
    training = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for _, m in convs:
            handles.append(m.register_forward_hook(record, with_kwargs=True))
        model.eval()
        x = torch.zeros((1, *sample_shape), dtype=dtype, device=device)
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:
            raise ValueError(
                f"the model's forward pass failed on zeros of shape {tuple(x.shape)} "
                f"(input_shape={sample_shape}, one sample's shape without the batch axis, "
                f"which is added): {type(exc).__name__}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training:
            m.training = flag
    if not found:
        raise ValueError(
            f"the model's forward pass on input_shape={sample_shape} applied none of its "
            f"{len(convs)} convolution layers ({', '.join(repr(n) for n, _ in convs[:5])}"
            f"{', ...' if len(convs) > 5 else ''}): nothing to bound")
    return found


# ---------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------


def _sizes(values) -> str:
    """``2`` for ``(2, 2)``, ``(2, 1)`` otherwise."""
    values = tuple(values)
    return str(values[0]) if len(set(values)) == 1 else str(values)


def _padding_text(pairs) -> str:
    if all(lo == hi for lo, hi in pairs):
        return _sizes(lo for lo, _ in pairs)
    return str(tuple(tuple(p) for p in pairs))


def _description(kind: str, op) -> str:
    geometry = op.convolution.geometry
    parts = [f"{op.input_shape[0]}->{op.output_shape[0]}",
             "x".join(map(str, geometry.kernel_size)),
             f"stride {_sizes(geometry.stride)}"]
    if any(d != 1 for d in geometry.dilation):
        parts.append(f"dilation {_sizes(geometry.dilation)}")
    parts.append(f"padding {_padding_text(geometry.padding)}")
    if op.convolution.transposed and any(geometry.output_padding):
        parts.append(f"output_padding {_sizes(geometry.output_padding)}")
    if geometry.groups != 1:
        parts.append(f"groups {geometry.groups}")
    parts.append(geometry.padding_mode)
    return f"{kind}({', '.join(parts)}) on {'x'.join(map(str, op.input_shape))}"


@contextlib.contextmanager
def _naming(application: _Application):
    """A ValueError or TypeError raised inside names the layer in the model."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {application.name!r} of the model, on input shape "
                        f"{application.input_shape}: {exc}") from exc


def _bound_one(torch, application: _Application, bound: Callable[[Any], NormBounds],
               rtol: float) -> LayerNormBounds:
    module = application.module
    _, transposed = _layer_kind(torch, module)
    dtype = np.complex128 if module.weight.is_complex() else np.float64
    # A transposed layer's output size is the one its forward produced (output_size=
    # included); the whole shape is accepted, its leading entries ignored.
    options = {"output_size": application.output_shape} if (
        transposed and application.output_shape is not None) else {}
    start = time.perf_counter()
    with _naming(application):
        op, _ = from_torch(module, application.input_shape, dtype=dtype, **options)
    build_seconds = time.perf_counter() - start
    given = application.output_shape
    if given is not None and tuple(given[-len(op.output_shape):]) != op.output_shape:
        raise ValueError(
            f"layer {application.name!r} ({type(module).__name__}) gave an output of shape "
            f"{given} on an input of shape {application.input_shape}, but its settings give "
            f"{op.output_shape} per sample: its forward does not apply the convolution its "
            "settings describe (a subclass that pads or resizes in its forward?), so its "
            "operator cannot be built from them")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        with _naming(application):
            bounds = bound(op)
        seconds = time.perf_counter() - start
    reason = None
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, RuntimeWarning) and message.startswith(_WIDE):
            reason = message[len(_WIDE):]
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    certified = bounds.gap <= rtol
    if not certified and reason is None:
        reason = f"the interval is {100 * bounds.gap:.3g}% wide, more than rtol={rtol:g}"
    return LayerNormBounds(
        name=application.name, description=_description(type(module).__name__, op),
        geometry=op.convolution.geometry, transposed=transposed,
        input_shape=op.input_shape, output_shape=op.output_shape,
        lower=float(bounds.lower), upper=float(bounds.upper), seconds=seconds,
        build_seconds=build_seconds, certified=certified,
        reason=None if certified else reason)


def bound_model(model, input_shape, rtol: float,
                bound: Callable[[Any], NormBounds]) -> ModelNormBounds:
    """Validate ``model`` and ``input_shape``, walk the model, and ``bound`` each convolution.

    ``bound(op)`` returns the operator's :class:`NormBounds` and warns (a
    RuntimeWarning starting ``'norm_bounds: '``) when wider than ``rtol``.
    """
    torch = _import_torch("spectral.model_norm_bounds")
    if not isinstance(model, torch.nn.Module):
        kind = type(model)
        raise TypeError(f"model must be a torch.nn.Module, got a {kind.__module__}."
                        f"{kind.__qualname__}")
    sample_shape = _check_input_shape(input_shape)
    applications = _applications(torch, model, sample_shape)
    rows = [_bound_one(torch, a, bound, rtol) for a in applications]
    return ModelNormBounds(rows, input_shape=sample_shape, rtol=rtol)
