"""Cross-entropy over class indices, and linear + cross-entropy chunked over rows: the compiled ops
``cross_entropy_fwd`` / ``cross_entropy_bwd``, their fake kernels, the wrappers, the pure-torch
formula and the loss reduction (written once, for the kernels and the formula alike).

For logits x [N, C] and targets t [N], with eps = label_smoothing:

    lse_i = log sum_c exp(x_ic)   (float32; float64 for float64 logits)
    loss_i = (1 - eps) (lse_i - x_{i,t_i}) + eps (lse_i - mean_c x_ic),  0 where t_i == ignore_index
    dx_i = g_i (softmax(x_i) - eps / C - (1 - eps) onehot(t_i)),  0 for ignored rows

reduced by 'none', 'sum' or 'mean' (over the non-ignored rows), as ``F.cross_entropy`` without
class weights; g_i is the reduction's pullback factor (:func:`loss_grad_scale`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture.leaves import announces
from . import kernel_choice
from ._common import acc_dtype, compiled, fake, kernel_ok, row_lse, to_acc

# float32 forward + backward, 1 thread: 31.5 vs 16.1 us (ours vs torch's) at 128x128 logits,
# 84.9 vs 86.7 us at 512x256
kernel_choice.measured("cross_entropy", kernel_choice.FAST, min_numel=131072)


@fake("cross_entropy_fwd")
def _(logits, target, ignore_index, label_smoothing):
    m = logits.shape[0]
    return logits.new_empty((m,), dtype=acc_dtype(logits.dtype)), logits.new_empty((m,), dtype=acc_dtype(logits.dtype))


fake("cross_entropy_bwd")(lambda grad, logits, target, lse, ignore_index, label_smoothing:
                          logits.new_empty(logits.shape))


# ---------------------------------------------------------------------------------------------
# the reduction

def _mean_divisor(target, ignore_index, reduction):
    """The number of non-ignored rows for 'mean', None for 'none' and 'sum' (a ValueError otherwise)."""
    if reduction == "mean":
        return (target != ignore_index).sum()
    if reduction in ("none", "sum"):
        return None
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def reduce_loss(rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """'none': the per-row losses; 'sum': their sum; 'mean': their sum over the number of rows
    whose target is not ignore_index (NaN when there is none, as torch)."""
    divisor = _mean_divisor(target, ignore_index, reduction)
    if reduction == "none":
        return rows
    return rows.sum() if divisor is None else rows.sum() / divisor.to(rows.dtype)


def loss_grad_scale(dloss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """The per-row (or single) factor g of the cross-entropy pullback: dloss for 'none' (per row)
    and 'sum', dloss / (number of non-ignored rows) for 'mean'; a 1-d tensor of ``dtype``."""
    divisor = _mean_divisor(target, ignore_index, reduction)
    dloss = torch.as_tensor(dloss, device=target.device).to(dtype)
    if reduction == "none":
        return dloss.reshape(-1)
    g = dloss.reshape(1)
    return g if divisor is None else g / divisor.to(dtype)


# ---------------------------------------------------------------------------------------------
# the formula

def _valid_targets(target, ignore_index):
    """(the rows whose target is not ignored, the targets with ignored ones replaced by class 0)."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target)).long()


def cross_entropy_forward_reference(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """(loss, lse) of :func:`cross_entropy_forward` in pure torch (see the module docs)."""
    x = to_acc(logits)
    lse = row_lse(x)
    valid, t = _valid_targets(target, ignore_index)
    rows = lse - x.gather(1, t[:, None])[:, 0]
    if label_smoothing > 0:
        rows = (1 - label_smoothing) * rows + label_smoothing * (lse - x.mean(1))
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return reduce_loss(rows, target, ignore_index, reduction).to(logits.dtype), lse


def cross_entropy_backward_reference(dloss, logits, target, lse, ignore_index=-100, label_smoothing=0.0,
                                     reduction="mean"):
    """dlogits of :func:`cross_entropy_backward` in pure torch (see the module docs)."""
    x = to_acc(logits)
    c = x.shape[1]
    g = loss_grad_scale(dloss, target, ignore_index, reduction, x.dtype)
    g = g.expand(x.shape[0])[:, None]
    valid, t = _valid_targets(target, ignore_index)
    d = torch.exp(x - lse.to(x.dtype)[:, None]) - label_smoothing / c
    d = d - (1 - label_smoothing) * torch.nn.functional.one_hot(t, c).to(x.dtype)
    d = torch.where(valid[:, None], g * d, torch.zeros_like(d))
    return d.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# the kernel or the formula

def _uses_kernel(logits, target):
    return kernel_ok(logits, target) and not target.is_floating_point()


def _ce_rows(logits, target, ignore_index, label_smoothing):
    """Per-row losses (accumulation dtype) and lse [N] of cross-entropy on [N, C] logits."""
    if _uses_kernel(logits, target):
        return compiled().cross_entropy_fwd(logits, target, int(ignore_index), float(label_smoothing))
    x = to_acc(logits)
    rows, lse = cross_entropy_forward_reference(x, target, ignore_index, label_smoothing, "none")
    return rows, lse


def _ce_grad(g, logits, target, lse, ignore_index, label_smoothing):
    """dlogits of cross-entropy given the per-row (or single) factor g."""
    if _uses_kernel(logits, target):
        return compiled().cross_entropy_bwd(g, logits, target, lse, int(ignore_index), float(label_smoothing))
    return cross_entropy_backward_reference(g.expand(logits.shape[0]).contiguous(), logits, target, lse,
                                            ignore_index, label_smoothing, "none")


@announces
def cross_entropy_forward(logits, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: str = "mean"):
    """Cross-entropy over class indices for logits [N, C] and target [N]; returns (loss, lse).

    lse_i = log sum_c exp(x_ic) (float32; float64 for float64 logits), saved for the backward;
    loss_i = (1 - eps) (lse_i - x_{i,t_i}) + eps (lse_i - mean_c x_ic)   (eps = label_smoothing),
    0 where t_i == ignore_index; reduction 'none' (loss [N]), 'sum', or 'mean' (sum over the
    number of non-ignored rows), as ``F.cross_entropy`` without class weights. The loss has the
    dtype of the logits.
    """
    rows, lse = _ce_rows(logits, target, ignore_index, label_smoothing)
    return reduce_loss(rows, target, ignore_index, reduction).to(logits.dtype), lse


@announces
def cross_entropy_backward(dloss, logits, target, lse, ignore_index: int = -100, label_smoothing: float = 0.0,
                           reduction: str = "mean"):
    """dlogits = g_i (softmax(x_i) - eps / C - (1 - eps) onehot(t_i)), 0 for ignored rows, with
    g_i = dloss_i ('none'), dloss ('sum'), dloss / #non-ignored ('mean'); one read of the logits
    and one write of the gradient (lse from ``cross_entropy_forward``)."""
    g = loss_grad_scale(dloss, target, ignore_index, reduction, acc_dtype(logits.dtype))
    return _ce_grad(g, logits, target, lse, ignore_index, label_smoothing)


# ---------------------------------------------------------------------------------------------
# linear + cross-entropy, chunked over rows

def _chunk_rows(n, v, chunk_size):
    if chunk_size is None:
        chunk_size = max(1, (1 << 26) // max(v, 1))  # about 64M logits per chunk
    return max(1, min(int(chunk_size), max(n, 1)))


def linear_cross_entropy_forward(x, weight, bias, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                                 reduction: str = "mean", chunk_size: int | None = None):
    """loss = cross_entropy(x @ weight.T + bias, target) for x [N, H], weight [V, H], bias [V] or
    None, computed ``chunk_size`` rows at a time so that only one chunk of logits ever exists.
    Returns (loss, lse [N]); the backward recomputes each chunk's logits from x and uses lse."""
    n, v = x.shape[0], weight.shape[0]
    cs = _chunk_rows(n, v, chunk_size)
    rows, lses = [], []
    for s in range(0, n, cs):
        logits = F.linear(x[s:s + cs], weight, bias)
        r, lse = _ce_rows(logits, target[s:s + cs], ignore_index, label_smoothing)
        rows.append(r)
        lses.append(lse)
    if not rows:
        rows = [x.new_zeros(0, dtype=acc_dtype(x.dtype))]
        lses = [x.new_zeros(0, dtype=acc_dtype(x.dtype))]
    rows, lse = torch.cat(rows), torch.cat(lses)
    return reduce_loss(rows, target, ignore_index, reduction).to(x.dtype), lse


def linear_cross_entropy_backward(dloss, x, weight, bias, target, lse, ignore_index: int = -100,
                                  label_smoothing: float = 0.0, reduction: str = "mean",
                                  chunk_size: int | None = None):
    """(dx, dweight, dbias) of ``linear_cross_entropy_forward``: per chunk, logits are recomputed,
    dlogits = cross_entropy_backward(...), dx = dlogits @ weight, dweight += dlogits.T @ x,
    dbias += sum_rows dlogits (dweight, dbias accumulated in float32; dbias None without bias)."""
    n, v = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    g = loss_grad_scale(dloss, target, ignore_index, reduction, acc)
    cs = _chunk_rows(n, v, chunk_size)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    db = torch.zeros(v, dtype=acc, device=weight.device) if bias is not None else None
    for s in range(0, n, cs):
        xc = x[s:s + cs]
        logits = F.linear(xc, weight, bias)
        gc = g if g.numel() == 1 else g[s:s + cs]
        dl = _ce_grad(gc, logits, target[s:s + cs], lse[s:s + cs], ignore_index, label_smoothing)
        torch.mm(dl, weight, out=dx[s:s + cs])
        if dl.dtype == acc:
            dw.addmm_(dl.t(), xc)
        else:
            dw += torch.mm(dl.t(), xc).to(acc)
        if db is not None:
            db += dl.sum(0, dtype=acc)
    return dx, dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size):
        loss, lse = linear_cross_entropy_forward(x, weight, bias, target, ignore_index, label_smoothing,
                                                 reduction, chunk_size)
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.args = (ignore_index, label_smoothing, reduction, chunk_size)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, weight, bias, target, lse = ctx.saved_tensors
        dx, dw, db = linear_cross_entropy_backward(dloss, x, weight, bias, target, lse, *ctx.args)
        return dx, dw, db, None, None, None, None, None


def linear_cross_entropy(x, weight, bias, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", chunk_size: int | None = None):
    """``F.cross_entropy(F.linear(x, weight, bias), target, ...)`` as a torch.autograd.Function whose
    forward and backward never hold more than one chunk of logits (see the two functions above)."""
    return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size)
