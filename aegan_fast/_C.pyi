# Type stub for the native extension aegan_fast._C (csrc/bindings.cpp). Use it through
# aegan_fast.ops (the cpp backend's custom ops), not directly.
from typing import Optional

from torch import Tensor

openmp: bool
with_cuda: bool

def bn_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
               act: int, slope: float, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """act(BN(x) [+ residual]) -> (out, mean, invstd, var_unbiased); act: 0 identity, 1 relu, 2 leaky_relu."""

def bn_backward(dy: Tensor, src: Tensor, y: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, invstd: Tensor, training: bool, act: int, slope: float, memory_efficient: bool,
                want_dres: bool, dx: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dres, dweight, dbias); src is x, or the output when memory_efficient."""

def bn_running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var_unbiased: Tensor,
                      momentum: float) -> None: ...
