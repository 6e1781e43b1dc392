"""Synchronized BatchNorm on the fused ops: batch statistics over the global batch of all ranks.

    with ops.sync_batchnorm():      # group=None: the default process group
        loss = step(nets, batch)    # BatchNormAct2d / BatchNormAddAct2d in training mode sync here
        loss.backward()             # and their backward reduces its two sums (see "Activation")

``torch.nn.SyncBatchNorm`` runs on CUDA only (``batch_norm_stats`` has no CPU kernel) and knows no
activation or residual; this runs on every kernel the dispatcher can pick (reference, cpp, triton,
cuda), any dtype and layout the kernels take, through the existing ops and nothing new in C++.

Why it is right. Training BatchNorm over the global batch of N values per channel (all ranks) is
z = x̂·w + b (+ residual), x̂ = (x − M)·invstd, invstd = 1/sqrt(V + eps), out = act(z), with M and the
biased V the statistics of the global batch. Given (M, V), that forward is exactly the ops' *eval*
mode with (M, V) in place of the running statistics, so the kernels run unchanged:

- Statistics: each rank packs (n_i, m_i, v_i) (its count, mean and biased variance per channel) and
  ONE all_gather (the list form: gloo has no all_gather_into_tensor) gives every rank all of them;
  the merge is exact (Chan et al.'s parallel formula), M = Σ n_i m_i / N, V = Σ n_i (v_i + (m_i − M)²) / N,
  which is the law of total variance: within-rank variance plus the spread of the rank means. The
  packet is fp64: counts stay exact beyond fp32's 2^24 and the merge loses nothing before the
  kernels take (M, V) in fp32 like their own statistics. A rank with n_i = 0 contributes nothing.
  Every rank merges the same gathered values in the same order, so every rank holds bit-identical
  (M, V), and the running statistics, updated once with them and the GLOBAL count (the unbiased
  variance is V·N/(N−1) as nn.BatchNorm2d on the concatenated batch), stay identical on every rank.
- Backward: in eval mode the ops' backward gives dx_eval = dz·w·invstd (dz = grad_out·act'(z)), the
  local Σdz·x̂ (their grad_weight) and Σdz (their grad_bias), and grad_residual = dz. Training-mode
  BatchNorm differentiates through M and V too:
      dx = w·invstd·(dz − mean(dz) − x̂·mean(dz·x̂)),   the means over the global batch,
  so dx = dx_eval − (w·invstd/N)·(Σdz + x̂·Σdz·x̂) with the sums over ALL ranks: ONE all_reduce(SUM) of
  the packed [Σdz, Σdz·x̂] (fp64, 2C values), the correction in fp32 and cast back to x's dtype once.
  grad_residual is dz, untouched by the statistics. grad_weight and grad_bias are the LOCAL sums
  (torch.nn.SyncBatchNorm's convention): the trainer averages parameter gradients across ranks
  afterwards, like DDP, which yields the global sum / world.
- An empty rank (n_i = 0) still joins both collectives (count 0, zero sums) and returns empty
  outputs and gradients of the right shapes (zero grad_weight/bias); no kernel sees an empty tensor.
  A global batch of one value per channel is the same ValueError nn.BatchNorm2d gives, on every rank
  (they all see the same global count, so none is left waiting in a collective).

Activation: ``sync_batchnorm(group)`` sets a context variable (like ``use_backend``); inside it the
fused BatchNorm modules IN TRAINING MODE take this path when torch.distributed is initialised and
the group has more than one rank. Eval mode never syncs (rank 0 can evaluate alone); outside the
block, without torch.distributed, or with one rank, behaviour is exactly the unsynchronized one.
The backward's all_reduce is made by autograd whether or not the block is still open (the
forward decided), so ``loss.backward()`` may sit outside it. What every rank must do alike: the same
sequence of synced BatchNorm calls, and a backward through each of them (a rank whose loss does not
depend on a synced output leaves the others waiting in the all_reduce, as with torch's SyncBatchNorm).

Limits: once differentiable (like the fused ops' own backward); the count is read on the host once
per call (one device sync per layer on a GPU); the local statistics take an fp32 copy of a bf16 input.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import activations, library, reference

_OFF = object()
_group: ContextVar = ContextVar("aegan_fast_sync_bn_group", default=_OFF)


@contextmanager
def sync_batchnorm(group=None):
    """Inside this block, fused BatchNorm modules in training mode compute their statistics over
    every rank of ``group`` (None: the default process group); see the module docstring."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"sync_batchnorm(group): expected a torch.distributed ProcessGroup or None, "
                        f"got {type(group).__name__}")
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


# Dynamo cannot trace ContextVar.get: a compiled graph bakes in the answer at compile time (compile
# inside the block you mean it for); run() itself is never traced.
@torch.compiler.assume_constant_result
def enabled() -> bool:
    """Whether training-mode BatchNorm syncs here: inside sync_batchnorm(), torch.distributed
    initialised, and more than one rank in the group."""
    group = _group.get()
    return (group is not _OFF and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


def current_group():
    """The process group of the innermost sync_batchnorm() block (None: the default group)."""
    group = _group.get()
    if group is _OFF:
        raise RuntimeError("aegan_fast ops: not inside ops.sync_batchnorm()")
    return group


def _check(x, residual):
    if x.dim() != 4:
        raise ValueError(f"synchronized BatchNorm2d expects a 4-D input (N, C, H, W), got {x.dim()}-D "
                         f"{tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the input's {tuple(x.shape)}")


def global_stats(x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased var) per channel over the inputs of every rank of ``group``, fp64, identical on
    every rank, and the global count per channel. One all_gather; every rank must call it."""
    C = x.shape[1]
    n = x.numel() // C if C else 0
    packed = torch.zeros(2 * C + 1, dtype=torch.float64, device=x.device)
    packed[0] = n
    if n:
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        packed[1:C + 1], packed[C + 1:] = mean, var
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    every = torch.stack(gathered)  # (world, 2C + 1)
    counts, means, vars_ = every[:, :1], every[:, 1:C + 1], every[:, C + 1:]
    total = int(counts.sum().item())
    if total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {total} over "
                         f"{len(gathered)} ranks (this rank's input size {list(x.shape)})")
    mean = (counts * means).sum(0) / total
    var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / total
    return mean, var, total


@torch.compiler.disable
def run(kernel: str, x, residual, running_mean, running_var, weight, bias, momentum, eps, activation,
        negative_slope, group=None):
    """act(BatchNorm2d(x) (+ residual)) in training mode with the statistics of the global batch over
    ``group``; updates the running statistics (when given) with them and the global count. The
    signature of dispatch.run without ``training`` (always batch statistics), plus the group."""
    activations.get(activation)
    _check(x, residual)
    fmt = library.memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    mean, var, total = global_stats(x, group)
    if running_mean is not None and running_var is not None:
        library.update_running_stats(running_mean, running_var, mean, var, float(momentum), total)
    return _SyncBatchNormAct.apply(x, residual, weight, bias, mean.float(), var.float(), float(eps), activation,
                                   float(negative_slope), kernel, group, total)


def _eval_forward(kernel, x, residual, weight, bias, mean, var, eps, activation, slope):
    if kernel == "reference":
        if residual is None:
            return reference.bn_act(x, mean, var, weight, bias, False, 0.0, eps, activation, slope)
        return reference.bn_add_act(x, residual, mean, var, weight, bias, False, 0.0, eps, activation, slope)
    if residual is None:
        return library.bn_act_op(x, weight, bias, mean, var, False, eps, activation, slope, kernel)[0]
    return library.bn_add_act_op(x, residual, weight, bias, mean, var, False, eps, activation, slope, kernel)[0]


def _eval_backward(kernel, grad_out, x, residual, has_res, weight, bias, mean, var, eps, activation, slope):
    """(dx_eval, grad_residual or None, Σdz·x̂, Σdz) of the eval-mode op with statistics (mean, var);
    ``residual`` is saved only where the activation needs the pre-activation (the ops' contract)."""
    if kernel == "reference":  # the definition of correct: autograd through the reference itself
        with torch.enable_grad():
            xx, ww, bb = (t.detach().requires_grad_() for t in (x, weight, bias))
            inputs = [xx, ww, bb]
            if residual is not None:
                rr = residual.detach().requires_grad_()
                inputs.append(rr)
                out = reference.bn_add_act(xx, rr, mean, var, ww, bb, False, 0.0, eps, activation, slope)
            else:  # bn_act, or bn_add_act with the identity: the residual does not change d/dx
                out = reference.bn_act(xx, mean, var, ww, bb, False, 0.0, eps, activation, slope)
            grads = torch.autograd.grad(out, inputs, grad_out)
        dres = grads[3] if residual is not None else (grad_out if has_res else None)
        return grads[0], dres, grads[1].float(), grads[2].float()
    grad_out = grad_out.contiguous(memory_format=library.memory_format(x))
    if has_res:
        dx, dres, dw, db = library.bn_add_act_backward_op(grad_out, x, residual, weight, bias, mean, var, False,
                                                          eps, activation, slope, kernel)
        if residual is None:
            dres = grad_out  # identity: the kernel leaves grad_residual empty, it is grad_out
    else:
        (dx, dw, db), dres = library.bn_act_backward_op(grad_out, x, weight, bias, mean, var, False, eps,
                                                        activation, slope, kernel), None
    return dx, dres, dw, db


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, mean, var, eps, activation, slope, kernel, group, total):
        C = x.shape[1]
        # An affine-free BatchNorm is w = 1, b = 0: the kernels' grad_weight is then still Σdz·x̂.
        w = weight if weight is not None else torch.ones(C, device=x.device)
        b = bias if bias is not None else torch.zeros(C, device=x.device)
        if x.numel() == 0:
            dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
            out = torch.empty_like(x, dtype=dtype)
        else:
            out = _eval_forward(kernel, x, residual, w, b, mean, var, eps, activation, slope)
        keep_res = residual if residual is not None and activations.get(activation).needs_preactivation else None
        ctx.save_for_backward(x, keep_res, w, b, mean, var)
        ctx.args = (eps, activation, slope, kernel, group, total, residual is not None)
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, residual, w, b, mean, var = ctx.saved_tensors
        eps, activation, slope, kernel, group, total, has_res = ctx.args
        C = x.shape[1]
        if x.numel():
            dx, dres, sdzx, sdz = _eval_backward(kernel, grad_out, x, residual, has_res, w, b, mean, var, eps,
                                                 activation, slope)
        else:
            dx, sdzx, sdz = torch.empty_like(x), *x.new_zeros((2, C), dtype=torch.float32)
            dres = torch.empty_like(grad_out) if has_res else None
        sums = torch.cat([sdz, sdzx]).double()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        if x.numel():
            invstd = (var.double() + eps).rsqrt()
            k = w.double() * invstd / total
            slope_x = (k * sums[C:] * invstd).float().view(1, C, 1, 1)  # per x̂ = (x − M)·invstd
            const = (k * sums[:C]).float().view(1, C, 1, 1)
            dx = (dx.float() - ((x.float() - mean.view(1, C, 1, 1)) * slope_x + const)).to(x.dtype)
        w_dtype, b_dtype = ctx.param_dtypes
        dw = sdzx.to(w_dtype) if w_dtype is not None and ctx.needs_input_grad[2] else None
        db = sdz.to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[3] else None
        return dx, dres, dw, db, None, None, None, None, None, None, None, None
