"""BatchNorm modules that route through the fused ops.

They subclass ``nn.BatchNorm2d`` so parameters, buffers and ``state_dict`` keys are exactly
``nn.BatchNorm2d``'s: checkpoints move freely between backends and to plain PyTorch.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import activations, dispatch, sync_bn


class _FusedBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, activation: str, negative_slope: float = 0.2,
                 eps: float = 1e-5, momentum: float | None = 0.1):
        activations.get(activation)  # ValueError for an unknown name
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.activation = activation
        self.negative_slope = negative_slope
        # (device type, requested backend, below auto's size for x's dtype and layout) -> kernel
        self._kernels: dict[tuple, str] = {}

    def _kernel(self, x: torch.Tensor) -> str:
        """The kernel for x, resolved once per (device type, requested backend, auto's size class)."""
        n = dispatch.per_channel(x)
        cl = dispatch.is_channels_last(x)
        key = (x.device.type, dispatch.requested(), dispatch.small(x.device.type, n, x.dtype, cl))
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = dispatch.resolve(key[0], n, key[1], x.dtype, cl)
        return kernel

    def forward_mode(self) -> tuple[bool, float]:
        """(use batch statistics, running-average factor), exactly as nn.BatchNorm2d decides them; in
        training it counts the call in num_batches_tracked, as nn.BatchNorm2d's forward does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return use_batch_stats, factor

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        use_batch_stats, factor = self.forward_mode()
        mean, var = self.running_stats()
        if self.training and sync_bn.enabled():  # inside ops.sync_batchnorm() with world > 1; eval never syncs
            return sync_bn.run(self._kernel(x), x, residual, mean, var, self.weight, self.bias, factor, self.eps,
                               self.activation, self.negative_slope, sync_bn.current_group())
        return dispatch.run(self._kernel(x), x, residual, mean, var, self.weight, self.bias, use_batch_stats, factor,
                            self.eps, self.activation, self.negative_slope)

    def running_stats(self):
        """(running_mean, running_var) as this forward uses them: None when training without tracking."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def plain_activation(self) -> nn.Module:
        """The activation applied after normalising, as a stock torch module (for folding)."""
        if self.activation == "relu":
            return nn.ReLU()
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        return nn.Identity()

    def fold(self, conv: nn.Module) -> nn.Module:
        """A stock-module copy of ``conv`` with this BatchNorm (eval semantics: running statistics)
        folded into its weight and bias; the caller adds ``plain_activation()`` (and, for
        BatchNormAddAct2d, the residual) after it. Uses torch's own fuse_conv_bn_eval."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"can only fold a BatchNorm into Conv2d/ConvTranspose2d, not {type(conv).__name__}")
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{self} keeps no running statistics and cannot be folded")
        plain = nn.BatchNorm2d(self.num_features, eps=self.eps).to(self.weight.device, self.weight.dtype)
        plain.load_state_dict(nn.BatchNorm2d.state_dict(self), strict=False)
        # fuse_conv_bn_eval copies conv but asserts eval mode: put a copy in eval mode, never the caller's conv.
        return fuse_conv_bn_eval(copy.deepcopy(conv).eval(), plain.eval(),
                                 transpose=isinstance(conv, nn.ConvTranspose2d))

    def extra_repr(self) -> str:
        act = self.activation + (f"({self.negative_slope})" if self.activation == "leaky_relu" else "")
        return f"{super().extra_repr()}, activation={act}"


class BatchNormAct2d(_FusedBatchNorm):
    """act(BatchNorm2d(x)), one fused op."""

    def __init__(self, num_features: int, activation: str = "relu", negative_slope: float = 0.2,
                 eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, activation, negative_slope, eps, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)


class BatchNormAddAct2d(_FusedBatchNorm):
    """act(BatchNorm2d(x) + residual), one fused op: the end of a residual block."""

    def __init__(self, num_features: int, activation: str = "identity", negative_slope: float = 0.2,
                 eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, activation, negative_slope, eps, momentum)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._run(x, residual)
