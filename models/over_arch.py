"""Over arches: the shared head that maps the set-averaged features ``[B, in]`` to one logit ``[B]``.

The paper's code keeps the total depth of SE: the first MLP layer moves into each set's branch (the projection)
and the rest is shared, here ``Linear(400, 400) -> BatchNorm -> ReLU -> Dropout -> Linear(400, 1)``. xDeepFM adds
its CIN's linear read-out; FinalMLP ends with its bilinear fusion instead.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from multiembed.models.layers import Linear, UniformMaskDropout


class MLPOverArch(nn.Module):
    """``(Linear -> BatchNorm -> ReLU -> Dropout)`` per hidden layer, then ``Linear(., 1)``.

    The dropout is :class:`~multiembed.models.layers.UniformMaskDropout` (``nn.Dropout``'s maths; on the CPU fast
    path its mask is drawn on every thread, :mod:`multiembed.models.cpu_fastpath`).

    Args:
        in_features: width of the averaged set features.
        layer_sizes: hidden widths ((400,) in the paper); empty for a plain linear read-out.
        dropout: dropout after each hidden layer.
        device: where the parameters live.

    Example::

        >>> over = MLPOverArch(400, [400], dropout=0.2)
        >>> over(torch.randn(32, 400)).shape
        torch.Size([32])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        dropout: float,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or any(h < 1 for h in layer_sizes):
            raise ValueError(f"in_features and layer_sizes must be positive, got {in_features}, {list(layer_sizes)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        layers: List[nn.Module] = []
        previous = in_features
        for size in layer_sizes:
            layers += [
                Linear(previous, size, device=device),
                nn.BatchNorm1d(size, device=device),
                nn.ReLU(),
                UniformMaskDropout(dropout),
            ]
            previous = size
        layers.append(nn.Linear(previous, 1, device=device))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``[B, in_features]``.

        Returns:
            logits ``[B]``.
        """
        return self.layers(features).squeeze(-1)

    def output_biases(self) -> List[nn.Parameter]:
        """The bias parameters whose sum is the constant term of the logit (here the last layer's)."""
        return [self.layers[-1].bias]


class CINOverArch(nn.Module):
    """xDeepFM's head: ``Linear(C, 1)`` on the averaged CIN features plus the MLP over arch on the averaged
    projections (the paper's ``cin_post`` and ``mlp_post``).

    Args:
        cin_features: C, the leading columns of the input.
        mlp: the over arch of the remaining columns.
        device: where the parameters live.

    Example::

        >>> over = CINOverArch(32, MLPOverArch(400, [400], dropout=0.2))
        >>> over(torch.randn(8, 432)).shape
        torch.Size([8])
    """

    def __init__(self, cin_features: int, mlp: MLPOverArch, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if cin_features < 1:
            raise ValueError(f"cin_features must be >= 1, got {cin_features}")
        self.cin_features = cin_features
        self.in_features = cin_features + mlp.in_features
        self.cin_linear = nn.Linear(cin_features, 1, device=device)
        self.mlp = mlp

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``[B, C + H]``.

        Returns:
            logits ``[B]``.
        """
        cin_logit = self.cin_linear(features[:, : self.cin_features]).squeeze(-1)
        return cin_logit + self.mlp(features[:, self.cin_features :])

    def output_biases(self) -> List[nn.Parameter]:
        """The bias parameters whose sum is the constant term of the logit (the CIN read-out's, then the MLP's)."""
        return [self.cin_linear.bias, *self.mlp.output_biases()]


class BilinearFusionOverArch(nn.Module):
    r"""FinalMLP's fusion of its two streams' outputs ``x``, ``y``:
    :math:`w_x^T x + b_x + w_y^T y + b_y + x^T W_{xy} y`, ``W_xy`` initialised to zero (the paper's code).

    Args:
        stream_dim: H, the width of each stream.
        device: where the parameters live.

    Example::

        >>> fusion = BilinearFusionOverArch(400)
        >>> fusion(torch.randn(8, 800)).shape
        torch.Size([8])
    """

    def __init__(self, stream_dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if stream_dim < 1:
            raise ValueError(f"stream_dim must be >= 1, got {stream_dim}")
        self.stream_dim = stream_dim
        self.in_features = 2 * stream_dim
        self.linear_x = nn.Linear(stream_dim, 1, device=device)
        self.linear_y = nn.Linear(stream_dim, 1, device=device)
        self.bilinear = nn.Parameter(torch.empty(stream_dim, stream_dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bilinear.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``[B, 2H]``, the x stream then the y stream.

        Returns:
            logits ``[B]``.
        """
        x = features[:, : self.stream_dim]
        y = features[:, self.stream_dim :]
        bilinear = ((x @ self.bilinear) * y).sum(dim=1)
        return self.linear_x(x).squeeze(-1) + self.linear_y(y).squeeze(-1) + bilinear

    def output_biases(self) -> List[nn.Parameter]:
        """The bias parameters whose sum is the constant term of the logit (``b_x``, ``b_y``)."""
        return [self.linear_x.bias, self.linear_y.bias]
