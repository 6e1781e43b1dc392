# Type stub for the native extension aegan_fast._C (csrc/bindings.cpp, csrc/cuda/bn_cuda_binding.cpp).
# Use it through aegan_fast.ops (the cpp / cuda kernel adapters behind the ops' one contract), not directly.
from typing import Optional

from torch import Tensor

openmp: bool
with_cuda: bool
ACTIVATION_CODES: dict[str, int]  # aegan_fast::Act (csrc/bn_params.h)

def bn_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
               act: int, slope: float, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """act(BN(x) [+ residual]) -> (out, batch mean, biased batch var) in training, (out, empty, empty) in eval."""

def bn_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, var: Tensor, training: bool, eps: float, act: int, slope: float, want_dres: bool,
                dx: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dres, dweight, dbias); dweight / dbias are fp32 sums; dres is empty unless want_dres."""

def cpu_isa() -> str:
    """The instruction set the CPU kernels run with: 'base', 'avx2' or 'avx512'."""

def best_cpu_isa() -> str:
    """The best one this CPU supports (AEGAN_CPU_ISA in the environment caps the start-up choice)."""

def set_cpu_isa(name: str) -> str:
    """Run the CPU kernels with ``name`` (tests); returns the previous one. ValueError for an unknown name
    or one above best_cpu_isa()."""

# CUDA builds only (with_cuda): the same contract on CUDA tensors.
def cuda_bn_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                    act: int, slope: float) -> tuple[Tensor, Tensor, Tensor]: ...

def cuda_bn_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float, act: int,
                     slope: float, want_dres: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...
