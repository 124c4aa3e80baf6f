"""Rules for the loss functions of ``torch.nn.functional``: cross_entropy (class indices or class
probabilities, class weights, ignore_index, label smoothing, unbatched and N-d inputs), nll_loss,
mse_loss, l1_loss, smooth_l1_loss, huber_loss, binary_cross_entropy, binary_cross_entropy_with_logits
and kl_div.

Each rule mirrors F's Python signature, including the legacy ``size_average`` / ``reduce`` pair,
which maps to a ``reduction`` exactly as torch maps it (with torch's deprecation warning). Forward
values come from torch's own functions (or the same composition torch uses), so values, validation
and error messages are torch's.

Every floating argument gets its cotangent: the input, a probability / regression target, and also
class weights and ``pos_weight``. torch.autograd refuses to differentiate ``weight`` of nll_loss,
cross_entropy with class indices, binary_cross_entropy and binary_cross_entropy_with_logits; here
it is the exact derivative of the loss (for ``reduction='mean'`` that includes the normalisation by
the summed weights), checked against finite differences.

A known torch quirk: ``F.l1_loss`` forwards no ``weight`` to ``__torch_function__``, so under
capture a weighted L1 loss is seen (and computed) unweighted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from ..ad.registry import rrule
from .. import ops
from ..ops import use_kernels
from ..ops.softmax import log_softmax_backward_formula
from ._util import NoTangent, grad_like, is_zero, nondiff

_REDUCTIONS = ("none", "mean", "sum")


def _reduction(size_average, reduce, reduction: str, allowed=_REDUCTIONS) -> str:
    """The effective reduction: the legacy pair maps as torch maps it (mean unless ``reduce`` is
    False, sum if ``size_average`` is False)."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if reduction not in allowed:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _cot(g, x):
    """Cotangent for an optional tensor argument ``x``."""
    return grad_like(g, x) if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) \
        else NoTangent()


def _other_dims(ndim: int, keep: int) -> list:
    return [d for d in range(ndim) if d != keep]


# ---------------------------------------------------------------------------------------------
# nll_loss / cross_entropy with class-index targets

def _class_index_loss(logp, target, weight, ignore_index, reduction, smoothing):
    """Loss and pullback (dlogp, dweight) of the class-index NLL on log-probabilities ``logp``
    (class dim 1, or 0 for unbatched input), with torch's label smoothing:

        loss_i = -(1 - eps) * w[t_i] * logp[i, t_i] - eps/C * sum_c w_c * logp[i, c]

    for targets t_i != ignore_index (0 for ignored ones); 'mean' divides the sum by
    W = sum_i w[t_i] over non-ignored targets, 'sum' sums, 'none' keeps the per-sample losses.
    dlogp[i, c] = -g_i * ((1 - eps) * w[t_i] * [c == t_i] + eps/C * w_c) with g_i = dy_i, dy or dy/W;
    dw_c = -g_i terms gathered per class, minus (dy * loss / W) * #{i: t_i == c} for 'mean'."""
    cd = 0 if logp.dim() == 1 else 1
    C = logp.shape[cd]
    y = F.nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
    valid = target != ignore_index
    safe, wt = _target_weights(target, valid, weight, logp.dtype)
    wb = weight.view([C if d == cd else 1 for d in range(logp.dim())]) if weight is not None else None
    if smoothing > 0:
        smooth = -(logp * wb).sum(cd) if wb is not None else -logp.sum(cd)
        smooth = torch.where(valid, smooth, torch.zeros_like(smooth))
        if reduction == "mean":
            smooth = smooth.sum() / wt.sum()
        elif reduction == "sum":
            smooth = smooth.sum()
        y = (1 - smoothing) * y + smooth * (smoothing / C)

    def pullback(dy):
        validf = valid.to(logp.dtype)
        if reduction == "mean":
            g = dy / wt.sum()
        else:
            g = dy
        idx = safe.unsqueeze(cd)
        dlogp = torch.zeros_like(logp).scatter(cd, idx, (-(1 - smoothing) * g * wt).unsqueeze(cd))
        gi = (g * validf).unsqueeze(cd)
        if smoothing > 0:
            dlogp = dlogp - (smoothing / C) * (gi * wb if wb is not None else gi)
        dweight = NoTangent()
        if weight is not None:
            flat = safe.reshape(-1)
            picked = logp.gather(cd, idx).squeeze(cd)
            contrib = (-(1 - smoothing) * g * validf * picked).expand(safe.shape).reshape(-1)
            dweight = torch.zeros(C, dtype=logp.dtype, device=logp.device).index_add(0, flat, contrib)
            if smoothing > 0:
                s = gi * logp
                dims = _other_dims(logp.dim(), cd)
                dweight = dweight - (smoothing / C) * (s.sum(dims) if dims else s)
            if reduction == "mean":
                counts = torch.zeros(C, dtype=logp.dtype, device=logp.device).index_add(0, flat, validf.reshape(-1))
                dweight = dweight - (g * y) * counts
            dweight = grad_like(dweight, weight)
        return dlogp, dweight

    return y, pullback


def _target_weights(target, valid, weight, dtype):
    """(targets with ignored ones replaced by class 0, w[t_i] with 0 for ignored targets)."""
    safe = torch.where(valid, target, torch.zeros_like(target))
    validf = valid.to(dtype)
    if weight is None:
        return safe, validf
    w = weight if weight.dtype == dtype else weight.to(dtype)
    return safe, w.index_select(0, safe.reshape(-1)).reshape(safe.shape) * validf


@rrule(F.nll_loss)
def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"):
    """loss_i = -w[t_i] * x[i, t_i] over targets != ignore_index; 'mean' divides the sum by the
    summed w[t_i];  dx[i, c] = -g_i * w[t_i] * [c == t_i] (see ``_class_index_loss``)."""
    reduction = _reduction(size_average, reduce, reduction)
    y, back = _class_index_loss(input, target, weight, ignore_index, reduction, 0.0)

    def pullback(dy):
        dx, dw = back(dy)
        return (NoTangent(), grad_like(dx, input), NoTangent(), dw) + nondiff(4)

    return y, pullback


def _prob_target_loss(input, target, weight, reduction, smoothing):
    """Cross-entropy with class-probability targets (``target`` shaped like ``input``):
    q = target * (1 - eps) + eps/C,  loss_i = -sum_c w_c * q[i, c] * logp[i, c]; 'mean' divides
    the sum by the number of samples (numel / C);  with g = dy (per sample), dy or dy/(numel/C):
    dlogp = -g * w * q,  dx = dlogp - softmax(x) * sum_c dlogp,  dtarget = -(1 - eps) * g * w * logp,
    dw_c = -sum_i g_i * q[i, c] * logp[i, c]."""
    cd = 0 if input.dim() == 1 else 1
    C = input.shape[cd]
    if not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
    logp = torch.log_softmax(input, cd)
    q = target * (1 - smoothing) + smoothing / C if smoothing > 0 else target
    wb = weight.view([C if d == cd else 1 for d in range(input.dim())]) if weight is not None else None
    prod = logp * q * wb if wb is not None else logp * q
    n = input.numel() // C if C else 0
    if reduction == "none":
        y = -prod.sum(cd)
    elif reduction == "sum":
        y = -prod.sum()
    else:
        y = -prod.sum() / n if n else torch.full((), float("nan"), dtype=logp.dtype, device=logp.device)

    def pullback(dy):
        g = dy.unsqueeze(cd) if reduction == "none" else (dy / n if reduction == "mean" else dy)
        gw = g * wb if wb is not None else g
        dlogp = -gw * q
        dx = log_softmax_backward_formula(dlogp, logp, cd)
        dt = _cot(-(1 - smoothing) * gw * logp, target)
        dw = NoTangent()
        if weight is not None:
            s = -g * q * logp
            dims = _other_dims(input.dim(), cd)
            dw = grad_like(s.sum(dims) if dims else s, weight)
        return grad_like(dx, input), dt, dw

    return y, pullback


@rrule(F.cross_entropy)
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """cross_entropy(x, t) = nll_loss(log_softmax(x, class_dim), t) for class-index targets (with
    label smoothing as torch defines it), or -sum_c w_c q_c log_softmax(x)_c for probability
    targets (``target`` shaped like ``input``);  dx = dlogp - softmax(x) * sum_c dlogp (see
    ``_class_index_loss`` and ``_prob_target_loss`` for dlogp, dtarget, dweight)."""
    reduction = _reduction(size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if input.shape == target.shape:
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        y, back = _prob_target_loss(input, target, weight, reduction, label_smoothing)

        def pullback(dy):
            dx, dt, dw = back(dy)
            return (NoTangent(), dx, dt, dw) + nondiff(5)

        return y, pullback

    if input.dim() == 2 and weight is None and label_smoothing == 0.0 and input.is_floating_point():
        return _fused_cross_entropy(input, target, ignore_index, reduction)
    cd = 0 if input.dim() == 1 else 1
    logp = torch.log_softmax(input, cd)
    y, back = _class_index_loss(logp, target, weight, ignore_index, reduction, label_smoothing)

    def pullback(dy):
        dlogp, dw = back(dy)
        dx = log_softmax_backward_formula(dlogp, logp, cd)
        return (NoTangent(), grad_like(dx, input), NoTangent(), dw) + nondiff(5)

    return y, pullback


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
aten = torch.ops.aten


def _fused_cross_entropy(input, target, ignore_index, reduction):
    """The common case (N, C) logits, class targets, no weights or smoothing, with fused kernels
    (ours on CUDA: one read of the logits each way; torch's on the CPU): logp = log_softmax(x);
    loss = nll(logp, t);
    dlogp = nll_loss_backward(dy) (-g at each target, g = dy or dy/#valid);
    dx = dlogp - softmax(x) * sum_c dlogp  (_log_softmax_backward_data)."""
    if use_kernels(input, "cross_entropy") and not target.is_floating_point():
        y, lse = ops.cross_entropy_forward(input, target, ignore_index, 0.0, reduction)
        return y, lambda dy: (NoTangent(), ops.cross_entropy_backward(dy, input, target, lse, ignore_index, 0.0,
                                                                      reduction)) + nondiff(7)
    logp = torch.log_softmax(input, 1)
    red = _REDUCTION_ENUM[reduction]
    y, total_weight = aten.nll_loss_forward(logp, target, None, red, ignore_index)

    def pullback(dy):
        dlogp = aten.nll_loss_backward(dy, logp, target, None, red, ignore_index, total_weight)
        dx = aten._log_softmax_backward_data(dlogp, logp, 1, input.dtype)
        return (NoTangent(), dx) + nondiff(7)

    return y, pullback


@rrule(aten.nll_loss_forward, aten.nll_loss_forward.default)
def nll_loss_forward(self, target, weight, reduction, ignore_index):
    """(loss, total_weight) = torch's NLL kernel;  dself = nll_loss_backward(dloss)."""
    out = aten.nll_loss_forward(self, target, weight, reduction, ignore_index)

    def pullback(dout):
        dloss = dout[0]
        if is_zero(dloss):
            return (NoTangent(),) + nondiff(5)
        dself = aten.nll_loss_backward(dloss, self, target, weight, reduction, ignore_index, out[1])
        return (NoTangent(), dself) + nondiff(4)

    return out, pullback


@rrule(aten.nll_loss_backward, aten.nll_loss_backward.default)
def nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight):
    """The NLL pullback as an op (so second derivatives go through rules): it is linear in
    grad_output g, out[i, t_i] = -g_i w_{t_i} / W;  dg = nll_loss_forward(dout) (the same gather,
    the same normalisation W)."""
    out = aten.nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight)

    def pullback(dout):
        dg = aten.nll_loss_forward(dout, target, weight, reduction, ignore_index)[0]
        return (NoTangent(), grad_like(dg, grad_output)) + nondiff(6)

    return out, pullback


# ---------------------------------------------------------------------------------------------
# pointwise regression losses

def _pointwise_loss(input, target, weight, reduction, loss, dloss, weighted_mean="sum"):
    """Elementwise loss l(d), d = x - t (broadcast), optionally times ``weight``, reduced.
    'mean' divides by numel, or with a weight by sum(weight) (``weighted_mean='sum'``: mse, l1) or
    by numel (``'numel'``: huber);  with g = dy, dy or dy/denominator:
    dx = unbroadcast(g * w * l'(d)),  dt = -unbroadcast(g * w * l'(d)),
    dw = g * l(d)  (minus dy * loss / sum(w) for the sum-normalised mean)."""
    x, t = torch.broadcast_tensors(input, target)
    d = x - t

    def pullback(dy, y):
        local = dloss(d)
        if reduction == "mean":
            denom = weight.sum() if weight is not None and weighted_mean == "sum" else d.numel()
            g = dy / denom
        else:
            g = dy
        gd = g * local * weight if weight is not None else g * local
        dw = NoTangent()
        if _is_float(weight):
            gw = g * loss(d)
            if reduction == "mean" and weighted_mean == "sum":
                gw = gw - g * y
            dw = grad_like(gw, weight)
        return _cot(gd, input), _cot(-gd, target), dw

    return pullback


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _sign(d):
    return torch.sign(d)


@rrule(F.mse_loss)
def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """l = (x - t)^2 (times weight);  dx = g * w * 2 (x - t),  dt = -dx (unbroadcast);
    'mean' divides by numel, or by sum(weight) when weighted."""
    reduction = _reduction(size_average, reduce, reduction)
    y = F.mse_loss(input, target, reduction=reduction, weight=weight)
    back = _pointwise_loss(input, target, weight, reduction, lambda d: d * d, lambda d: 2 * d)

    def pullback(dy):
        dx, dt, dw = back(dy, y)
        return NoTangent(), dx, dt, NoTangent(), NoTangent(), NoTangent(), dw

    return y, pullback


@rrule(F.l1_loss)
def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """l = |x - t| (times weight);  dx = g * w * sign(x - t),  dt = -dx (unbroadcast);
    'mean' divides by numel, or by sum(weight) when weighted."""
    reduction = _reduction(size_average, reduce, reduction)
    y = F.l1_loss(input, target, reduction=reduction, weight=weight)
    back = _pointwise_loss(input, target, weight, reduction, torch.abs, _sign)

    def pullback(dy):
        dx, dt, dw = back(dy, y)
        return NoTangent(), dx, dt, NoTangent(), NoTangent(), NoTangent(), dw

    return y, pullback


@rrule(F.smooth_l1_loss)
def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """l = 0.5 d^2 / beta for |d| < beta, |d| - 0.5 beta otherwise (l1 for beta = 0), d = x - t;
    dl/dd = d / beta inside, sign(d) outside."""
    reduction = _reduction(size_average, reduce, reduction)
    y = F.smooth_l1_loss(input, target, reduction=reduction, beta=beta)
    if beta == 0:
        dloss = _sign
    else:
        def dloss(d):
            return torch.where(d <= -beta, -torch.ones_like(d), torch.where(d >= beta, torch.ones_like(d), d / beta))
    back = _pointwise_loss(input, target, None, reduction, None, dloss)

    def pullback(dy):
        dx, dt, _ = back(dy, y)
        return NoTangent(), dx, dt, NoTangent(), NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(F.huber_loss)
def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """l = 0.5 d^2 for |d| < delta, delta (|d| - 0.5 delta) otherwise (times weight), d = x - t;
    dl/dd = clamp(d, -delta, delta); 'mean' divides by numel, weighted or not."""
    reduction = _reduction(None, None, reduction)
    y = F.huber_loss(input, target, reduction=reduction, delta=delta, weight=weight)

    def loss(d):
        a = d.abs()
        return torch.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))

    back = _pointwise_loss(input, target, weight, reduction, loss, lambda d: d.clamp(-delta, delta),
                           weighted_mean="numel")

    def pullback(dy):
        dx, dt, dw = back(dy, y)
        return NoTangent(), dx, dt, NoTangent(), NoTangent(), dw

    return y, pullback


# ---------------------------------------------------------------------------------------------
# binary cross-entropy, KL divergence

def _reduce_coef(dy, reduction, numel):
    return dy / numel if reduction == "mean" else dy


@rrule(F.binary_cross_entropy)
def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """l = -w (t log x + (1 - t) log(1 - x)), logs clamped at -100 as torch does;
    dx = g * w * (x - t) / max(x (1 - x), 1e-12),  dt = g * w * (log(1 - x) - log x) (clamped),
    dw = g * l / w."""
    reduction = _reduction(size_average, reduce, reduction)
    y = F.binary_cross_entropy(input, target, weight, reduction=reduction)

    def pullback(dy):
        g = _reduce_coef(dy, reduction, input.numel())
        gw = g * weight if weight is not None else g
        dx = gw * (input - target) / torch.clamp_min((1 - input) * input, 1e-12)
        log_x = torch.log(input).clamp_min(-100)
        log_1mx = torch.log1p(-input).clamp_min(-100)
        dt = _cot(gw * (log_1mx - log_x), target)
        dw = _cot(-g * (target * log_x + (1 - target) * log_1mx), weight) if _is_float(weight) else NoTangent()
        return NoTangent(), grad_like(dx, input), dt, dw, NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(F.binary_cross_entropy_with_logits)
def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """l = w ((1 - t) x + L softplus(-x)),  L = 1 + (pw - 1) t  (= -w (pw t log s(x) + (1-t) log(1-s(x))));
    dx = g w ((1 - t) - L sigmoid(-x)),  dt = g w ((pw - 1) softplus(-x) - x),
    dpw = g w t softplus(-x),  dw = g l / w  (unbroadcast to each argument's shape)."""
    reduction = _reduction(size_average, reduce, reduction)
    y = F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    def pullback(dy):
        g = _reduce_coef(dy, reduction, input.numel())
        sp = F.softplus(-input)
        big_l = 1 + (pos_weight - 1) * target if pos_weight is not None else None
        gw = g * weight if weight is not None else g
        if big_l is not None:
            dx = gw * ((1 - target) - big_l * torch.sigmoid(-input))
            dt = gw * ((pos_weight - 1) * sp - input)
        else:
            dx = gw * (torch.sigmoid(input) - target)
            dt = -gw * input
        dpw = _cot(gw * target * sp, pos_weight)
        dw = NoTangent()
        if _is_float(weight):
            unweighted = (1 - target) * input + (big_l * sp if big_l is not None else sp)
            dw = grad_like(g * unweighted, weight)
        return (NoTangent(), grad_like(dx, input), _cot(dt, target), dw, NoTangent(), NoTangent(),
                NoTangent(), dpw)

    return y, pullback


@rrule(F.kl_div)
def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """l = t (log t - x) (xlogy(t, t) - t x), or exp(t) (t - x) with ``log_target``;
    dx = -g t (or -g exp(t)),  dt = g (log t + 1 - x) (NaN at t = 0, as torch.autograd's xlogy
    gives), or g exp(t) (t - x + 1);  'mean' divides by numel, 'batchmean' by input.size(0)."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS + ("batchmean",):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    y = F.kl_div(input, target, reduction=reduction, log_target=log_target)
    shape = torch.broadcast_shapes(input.shape, target.shape)

    def pullback(dy):
        if reduction == "mean":
            g = dy / torch.Size(shape).numel()
        elif reduction == "batchmean" and input.dim() != 0:
            g = dy / input.shape[0]
        else:
            g = dy
        if log_target:
            et = torch.exp(target)
            dx = -g * et
            dt = g * et * (target - input + 1)
        else:
            dx = -g * target
            dt = g * (torch.xlogy((target != 0).to(target.dtype), target) + target / target - input)
        dx = dx.expand(shape) if dx.shape != shape else dx
        return (NoTangent(), grad_like(dx, input), _cot(dt, target)) + nondiff(4)

    return y, pullback
