"""The divergence guard: an update whose loss or gradients are not finite is skipped, and a run that
keeps producing them goes back to its last good checkpoint (training/loop.py) instead of training on NaNs.

Checked after every backward (``precision.backward_and_step`` calls ``after_backward``), with no
host sync: the "bad" flag is a device tensor handed to torch's fused Adam as ``found_inf`` (the
same mechanism GradScaler uses), which leaves weights, moments and the step count untouched when
it is set. On several ranks the guard also averages the gradients (distributed.GradientReducer,
bucketed and overlapped with the backward) and the flag rides in their last all-reduce, so every
rank skips the same updates and the weights stay identical. The counters are read on the host only
when the trainer logs or checkpoints.
"""
from __future__ import annotations

import torch

from . import distributed


class UpdateGuard:
    def __init__(self, device, bucket_mb: float = 0.0):
        self.device = torch.device(device)
        self.reducer = distributed.GradientReducer(bucket_mb * 2 ** 20) if distributed.current().distributed else None
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.skipped = zero.clone()        # updates skipped since the last read
        self.step_bad = zero.clone()       # whether the current training step skipped an update
        self.bad_steps_in_a_row = zero.clone()
        self.worst_run = zero.clone()      # longest run of bad steps since the last read

    @staticmethod
    def _params(optimizers) -> list:
        return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]

    def before_backward(self, optimizers) -> None:
        """Ready the gradient buckets of these optimizers' parameters (several ranks only)."""
        if self.reducer is not None:
            self.reducer.begin(self._params(optimizers))

    def after_backward(self, loss: torch.Tensor, optimizers, scaler=None) -> None:
        """Average the gradients over the ranks, and mark the optimizers to skip this update when
        the loss or any gradient is not finite."""
        params = [p for p in self._params(optimizers) if p.grad is not None]
        grads = [p.grad for p in params]
        total = loss.detach().float().reshape(())
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads, 1)).float().sum()
        bad = (~torch.isfinite(total)).float().reshape(1)
        if self.reducer is not None:
            bad = self.reducer.finish(bad).clamp_(max=1.0)
        bad = bad.reshape(())
        self.skipped += bad
        self.step_bad = torch.maximum(self.step_bad, bad)
        if scaler is not None:
            return  # fp16: GradScaler skips non-finite updates itself (and lowers its scale)
        for opt in optimizers:
            if _fused(opt):
                opt.found_inf = bad
            elif bool(bad):  # an unfused optimizer cannot skip on its own: one host sync
                for p in params:
                    p.grad = None

    def end_step(self) -> None:
        self.bad_steps_in_a_row = (self.bad_steps_in_a_row + 1) * self.step_bad
        self.worst_run = torch.maximum(self.worst_run, self.bad_steps_in_a_row)
        self.step_bad = torch.zeros_like(self.step_bad)

    def read(self) -> tuple[int, int]:
        """(updates skipped, longest run of bad steps ending) since the last read; one host sync."""
        skipped, worst = int(self.skipped), int(self.worst_run)
        self.skipped.zero_()
        self.worst_run.zero_()  # a run still going on keeps counting in bad_steps_in_a_row
        return skipped, worst


def _fused(opt) -> bool:
    return all(group.get("fused") for group in opt.param_groups)
