"""Invertible channel mixing: the same invertible ``C x C`` matrix applied at every position.

A coupling changes only one half of its channels per step; between couplings, flows mix
the channels so that every channel is eventually transformed.

- :class:`Permutation` (RealNVP, FrEIA): a fixed random shuffle. Free, exact, ``log|det| = 0``.
- :class:`InvertibleConv1x1` (Glow): a learned invertible matrix, a 1x1 convolution on
  images. With ``lu=True`` (the default) it is parametrised by its LU factors,
  ``W = P L (U + diag(sign(s) * exp(log|s|)))``, so that ``log|det W| = sum(log|s|)`` costs
  ``O(C)`` instead of the ``O(C^3)`` of a determinant, and the inverse needs only two
  triangular solves on ``C x C`` matrices. ``lu=False`` keeps a full weight matrix
  (``torch.linalg.slogdet`` and ``torch.linalg.inv`` on every call, fine for small ``C``).

Both act on the channel dimension ``dim`` of an input with the batch first: ``(B, C)``,
``(B, C, L)``, ``(B, C, H, W)``, ``(B, C, D, H, W)`` with ``dim=1``, or channels last, such
as a transformer's ``(B, T, C)``, with ``dim=-1``. The log-det is per sample: ``log|det W|``
times the number of positions (``H * W`` for an image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertible_core._layer import (
    InvertibleLayer,
    channel_dim,
    check_channel_dim,
    check_positive_int,
    per_sample,
    positions,
    zero_logdet,
)

__all__ = ["InvertibleConv1x1", "Permutation"]


class Permutation(InvertibleLayer):
    """A fixed random permutation of the channels along ``dim``; ``log|det J| = 0``.

    The permutation is drawn once, at construction, from a private generator seeded with
    ``seed`` (the global random state is untouched), and kept as a persistent buffer
    (``perm``, with its inverse ``inverse_perm``), so a loaded ``state_dict`` restores exactly
    the permutation that was trained. Layers built with the same seed share their
    permutation: give the ``i``-th layer of a flow ``seed=i`` for different ones.
    Side inputs (``*args``, ``**kwargs``) are accepted and ignored.
    """

    perm: Tensor
    inverse_perm: Tensor

    #: only moves values around: a state on a fixed-point grid stays on it
    preserves_grid = True

    def __init__(self, channels: int, seed: int = 0, dim: int = 1) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels", "Permutation")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Permutation: seed must be an int, got {type(seed).__name__}")
        self.dim = check_channel_dim(dim, "Permutation")
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _forward(self, x: Tensor) -> Tensor:
        d = channel_dim(x, self.dim, self.channels, type(self).__name__)
        return x.index_select(d, self.perm)

    def _inverse(self, y: Tensor) -> Tensor:
        d = channel_dim(y, self.dim, self.channels, type(self).__name__)
        return y.index_select(d, self.inverse_perm)

    def _logdet(self, x: Tensor) -> Tensor:
        return zero_logdet(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}"


class InvertibleConv1x1(InvertibleLayer):
    """Glow's invertible 1x1 convolution: ``y = W x`` over the channels at every position.

    ``W`` starts as a random rotation (the Q of a QR decomposition of a Gaussian matrix,
    drawn from the global random state, or from a private generator when ``seed`` is
    given), so the layer starts volume-preserving and well conditioned.

    With ``lu=True``, the parameters are the LU factors of ``W = P L (U + diag(sign(s) *
    exp(log_s)))``: ``lower`` (its strictly lower triangle is ``L`` below the unit diagonal),
    ``upper`` (its strictly upper triangle is ``U``) and ``log_s``; the permutation ``P`` and
    the signs ``sign_s`` are fixed buffers. The entries of ``lower`` and ``upper`` outside
    their triangles are never read and get zero gradient. ``log|det W| = sum(log_s)``.
    With ``lu=False`` the parameter is the full ``weight`` matrix.

    The log-det per sample is ``positions * log|det W|``, where ``positions`` is the number
    of positions per sample (``H * W`` for ``(B, C, H, W)``). The inverse applies ``W^-1``
    (from two triangular solves of the factors, or ``torch.linalg.inv``), exact up to float
    rounding while ``W`` is well conditioned. Inputs in lower precision than the parameters
    are mixed in their own dtype. Side inputs (``*args``, ``**kwargs``) are ignored.
    """

    permutation: Tensor
    sign_s: Tensor

    def __init__(
        self, channels: int, lu: bool = True, dim: int = 1, seed: int | None = None
    ) -> None:
        super().__init__()
        self.channels = check_positive_int(channels, "channels", "InvertibleConv1x1")
        if not isinstance(lu, bool):
            raise TypeError(f"InvertibleConv1x1: lu must be a bool, got {type(lu).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(
                f"InvertibleConv1x1: seed must be an int or None, got {type(seed).__name__}"
            )
        self.lu = lu
        self.dim = check_channel_dim(dim, "InvertibleConv1x1")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # float64 for the factorisations; the parameters take the default dtype
        gaussian = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
        rotation = torch.linalg.qr(gaussian).Q
        dtype = torch.get_default_dtype()
        if lu:
            p, l, u = torch.linalg.lu(rotation)
            s = torch.diagonal(u)
            self.register_buffer("permutation", p.to(dtype))
            self.register_buffer("sign_s", torch.sign(s).to(dtype))
            self.lower = nn.Parameter(torch.tril(l, -1).to(dtype))
            self.upper = nn.Parameter(torch.triu(u, 1).to(dtype))
            self.log_s = nn.Parameter(torch.log(torch.abs(s)).to(dtype))
        else:
            self.weight = nn.Parameter(rotation.to(dtype))

    def matrix(self) -> Tensor:
        """``W`` (``C x C``), differentiable in the parameters."""
        if not self.lu:
            return self.weight
        return self.permutation @ self._unit_lower() @ self._upper()

    def inverse_matrix(self) -> Tensor:
        """``W^-1`` (``C x C``), differentiable in the parameters."""
        if not self.lu:
            return torch.linalg.inv(self.weight)
        # W^-1 = U^-1 L^-1 P^T: two triangular solves, no general inverse
        l_inv_pt = torch.linalg.solve_triangular(
            self._unit_lower(), self.permutation.T, upper=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(self._upper(), l_inv_pt, upper=True)

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (a scalar), differentiable in the parameters."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight).logabsdet

    def _unit_lower(self) -> Tensor:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        return self.lower.tril(-1) + eye

    def _upper(self) -> Tensor:
        return self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp())

    def _forward(self, x: Tensor) -> Tensor:
        d = channel_dim(x, self.dim, self.channels, type(self).__name__)
        return _mix(self.matrix().to(x.dtype), x, d)

    def _inverse(self, y: Tensor) -> Tensor:
        d = channel_dim(y, self.dim, self.channels, type(self).__name__)
        return _mix(self.inverse_matrix().to(y.dtype), y, d)

    def _logdet(self, x: Tensor) -> Tensor:
        d = channel_dim(x, self.dim, self.channels, type(self).__name__)
        return per_sample(positions(x, d) * self.log_abs_det(), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lu={self.lu}, dim={self.dim}"


#: a 1x1 convolution per number of positional dims: what an image's mixing is
_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _mix(matrix: Tensor, x: Tensor, d: int) -> Tensor:
    """``matrix`` (``C x C``) applied to the channel vector at each position of dim ``d``.

    The result is a tensor of its own, never a view of one (a reshape's or a movedim's):
    FSDP2 hooks a unit's outputs for its backward and warns about a view, which an in-place
    op downstream could detach from the hook."""
    if d == x.dim() - 1:  # channels last: one matmul, contiguous output
        return F.linear(x, matrix)
    spatial = x.dim() - 2
    if d == 1 and spatial in _CONVOLUTIONS:  # (B, C, L), (B, C, H, W), (B, C, D, H, W)
        return _CONVOLUTIONS[spatial](x, matrix.reshape(*matrix.shape, *([1] * spatial)))
    moved = x.movedim(d, 1)
    batch, channels = moved.shape[:2]
    mixed = torch.matmul(matrix, moved.reshape(batch, channels, positions(moved, 1)))
    return mixed.reshape(moved.shape).movedim(1, d).contiguous()
