"""Rules for the loss functions of ``torch.nn.functional``: cross_entropy (class indices or class
probabilities, class weights, ignore_index, label smoothing, unbatched and N-d inputs), nll_loss,
mse_loss, l1_loss, smooth_l1_loss, huber_loss, binary_cross_entropy, binary_cross_entropy_with_logits
and kl_div; and, as rules via rules (torch's own formulas differentiated through the rules of their
ops, :func:`._util._via_rules`), the margin, embedding, Poisson and Gaussian NLL, multilabel and
triplet losses, linear_cross_entropy and ctc_loss.

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

import math

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from ..ad.registry import rrule
from .. import ops
from ..ops import use_kernels
from ..ops.softmax import log_softmax_backward_formula
from ._util import NoTangent, _via_rules, grad_like, is_zero, nondiff

Tensor = torch.Tensor

_REDUCTIONS = ("none", "mean", "sum")


def _reduction(size_average, reduce, reduction: str, allowed=_REDUCTIONS, warn=True) -> str:
    """The effective reduction: the legacy pair maps as torch maps it (mean unless ``reduce`` is
    False, sum if ``size_average`` is False), with torch's deprecation warning unless ``warn=False``."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce, emit_warning=warn)
    if reduction not in allowed:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _reduce(loss, reduction):
    """torch's loss reduction ('none' | 'mean' | 'sum'), as the legacy size_average/reduce flags resolve."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _reduce_coef(dy, reduction, numel):
    """The cotangent of the loss before ``_reduce``'s 'mean' or 'sum' (a scalar dy): dy / numel or dy."""
    return dy / numel if reduction == "mean" else dy


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
    reduction = _reduction(size_average, reduce, reduction, _REDUCTIONS + ("batchmean",))
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


# ---------------------------------------------------------------------------------------------
# the other losses, via rules
# Each is torch's own formula (ATen's loss kernels or torch.nn.functional's Python), op for op, so
# the subgradients at kinks are torch's: clamp_min where torch clamps, relu where it tests z > 0.

def _loss_rule(decomposition, n_args, value=None):
    """(y, pullback) for a loss whose first ``n_args`` positional arguments may be tensors."""
    def rule(*args):
        y, back = _via_rules(decomposition, *args[:n_args], value=value and (lambda: value(*args)))
        return y, lambda dy: back(dy) + nondiff(len(args) - n_args)
    return rule


@rrule(F.soft_margin_loss)
def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """loss = log(1 + exp(-y x)), reduced;  through the rules of mul, exp, log1p."""
    red = _reduction(size_average, reduce, reduction, warn=False)
    return _loss_rule(lambda x, t: _reduce(torch.log1p(torch.exp(-x * t)), red), 2)(
        input, target, size_average, reduce, reduction)


@rrule(F.margin_ranking_loss)
def margin_ranking_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """loss = max(0, -y (x1 - x2) + margin), reduced (torch's clamp_min)."""
    red = _reduction(size_average, reduce, reduction, warn=False)
    return _loss_rule(lambda a, b, t: _reduce((-t * (a - b) + margin).clamp_min(0), red), 3)(
        input1, input2, target, margin, size_average, reduce, reduction)


@rrule(F.hinge_embedding_loss)
def hinge_embedding_loss(input, target, margin=1.0, size_average=None, reduce=None, reduction="mean"):
    """loss = x where y == 1, max(0, margin - x) where y == -1 (torch sums both masks), reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(x, t):
        clamp = (margin - x).clamp_min(0)
        out = torch.where(t != 1, clamp, torch.zeros_like(clamp)) + torch.where(t != -1, x, torch.zeros_like(x))
        return _reduce(out, red)

    return _loss_rule(decomposition, 2)(input, target, margin, size_average, reduce, reduction)


@rrule(F.cosine_embedding_loss)
def cosine_embedding_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """cos = <x1, x2> / sqrt((|x1|^2 + 1e-12)(|x2|^2 + 1e-12));  loss = 1 - cos where y == 1,
    max(0, cos - margin) where y == -1, reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(a, b, t):
        d = 1 if a.dim() == 2 else 0
        prod = (a * b).sum(d)
        denom = torch.sqrt(((a * a).sum(d) + 1e-12) * ((b * b).sum(d) + 1e-12))
        cos = prod / denom
        zeros = torch.zeros_like(cos)
        out = torch.where(t == 1, 1 - cos, zeros) + torch.where(t == -1, (cos - margin).clamp_min(0), zeros)
        return _reduce(out, red)

    return _loss_rule(decomposition, 3)(input1, input2, target, margin, size_average, reduce, reduction)


@rrule(F.poisson_nll_loss)
def poisson_nll_loss(input, target, log_input=True, full=False, size_average=None, eps=1e-8, reduce=None,
                     reduction="mean"):
    """loss = exp(x) - y x (log_input) or x - y log(x + eps), plus Stirling's term for y > 1 when
    full, reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(x, t):
        loss = torch.exp(x) - t * x if log_input else x - t * torch.log(x + eps)
        if full:
            stirling = t * torch.log(t) - t + 0.5 * torch.log(2 * math.pi * t)
            loss = loss + stirling.masked_fill(t <= 1, 0)
        return _reduce(loss, red)

    return _loss_rule(decomposition, 2)(input, target, log_input, full, size_average, eps, reduce, reduction)


@rrule(F.gaussian_nll_loss)
def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """loss = (log(max(var, eps)) + (x - y)^2 / max(var, eps)) / 2 (+ log(2 pi) / 2 when full), reduced;
    like torch, the clamp of var is not differentiated."""
    def decomposition(x, t, v):
        if not isinstance(v, Tensor):
            v = torch.ones_like(x) * v
        if v.shape != x.shape and x.shape[:-1] == v.shape:
            v = v.unsqueeze(-1)
        v = v + (v.clamp(min=eps) - v).detach()
        loss = 0.5 * (torch.log(v) + (x - t) ** 2 / v)
        if full:
            loss = loss + 0.5 * math.log(2 * math.pi)
        return _reduce(loss, reduction)

    return _loss_rule(decomposition, 3)(input, target, var, full, eps, reduction)


@rrule(F.multilabel_soft_margin_loss)
def multilabel_soft_margin_loss(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """loss = -mean over classes of (y logsigmoid(x) + (1 - y) logsigmoid(-x)) (times weight), reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(x, t, w):
        loss = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        if w is not None:
            loss = loss * w
        c = x.dim() - 1
        return _reduce(loss.sum(c) / x.shape[c], red)

    return _loss_rule(decomposition, 3)(input, target, weight, size_average, reduce, reduction)


@rrule(F.multi_margin_loss)
def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
                      reduction="mean"):
    """loss_n = sum over classes j != y_n of w[y_n] * max(0, margin - x[y_n] + x[j])^p / C (torch's
    z > 0 test), reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(x, t, w):
        c = x.shape[-1] if x.dim() else 1
        x2, t2 = x.reshape(-1, c), t.reshape(-1, 1)
        z = torch.relu(margin - x2.gather(1, t2) + x2)
        h = z if p == 1 else z * z
        h = torch.where(torch.arange(c, device=x.device) == t2, torch.zeros_like(h), h)
        if w is not None:
            h = h * w[t2.reshape(-1)].unsqueeze(1)
        return _reduce((h.sum(1) / c).reshape(t.shape), red)

    y, back = _via_rules(decomposition, input, target, weight)

    def pullback(dy):
        g = back(dy)
        return (NoTangent(), g[1], g[2], NoTangent(), NoTangent(), g[3]) + nondiff(3)

    return y, pullback


@rrule(F.multilabel_margin_loss)
def multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """loss_n = sum over target classes j (those before the first -1) and non-target classes k of
    max(0, 1 - (x[j] - x[k])) / C (torch's z > 0 test), reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(x, t):
        c = x.shape[-1] if x.dim() else 1
        x2, t2 = x.reshape(-1, c), t.reshape(-1, c)
        valid = (t2 >= 0).long().cumprod(1)
        idx = torch.where(valid.bool(), t2, torch.zeros_like(t2))
        is_target = (F.one_hot(idx, c) * valid.unsqueeze(-1)).amax(1)
        z = torch.relu(1 - x2.gather(1, idx).unsqueeze(2) + x2.unsqueeze(1))
        mask = valid.unsqueeze(2) * (1 - is_target).unsqueeze(1)
        loss = (z * mask).sum((1, 2)) / c
        return _reduce(loss.reshape(x.shape[:-1] if x.dim() else ()), red)

    return _loss_rule(decomposition, 2)(input, target, size_average, reduce, reduction)


@rrule(F.triplet_margin_loss)
def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False, size_average=None,
                        reduce=None, reduction="mean"):
    """loss = max(0, margin + d(a, p) - d(a, n)), d the pairwise p-distance (with swap: d(a, n)
    replaced by min(d(a, n), d(p, n))), reduced."""
    red = _reduction(size_average, reduce, reduction, warn=False)

    def decomposition(a, pos, neg):
        d_pos = F.pairwise_distance(a, pos, p, eps)
        d_neg = F.pairwise_distance(a, neg, p, eps)
        if swap:
            d_neg = torch.minimum(d_neg, F.pairwise_distance(pos, neg, p, eps))
        return _reduce((margin + d_pos - d_neg).clamp_min(0), red)

    return _loss_rule(decomposition, 3)(anchor, positive, negative, margin, p, eps, swap, size_average, reduce,
                                        reduction)


@rrule(F.triplet_margin_with_distance_loss)
def triplet_margin_with_distance_loss(anchor, positive, negative, *, distance_function=None, margin=1.0,
                                      swap=False, reduction="mean"):
    """loss = max(0, margin + d(a, p) - d(a, n)) for the given distance (pairwise_distance by
    default; with swap d(a, n) becomes min(d(a, n), d(p, n))), reduced; through the distance's rules."""
    dist_fn = distance_function if distance_function is not None else F.pairwise_distance

    def decomposition(a, pos, neg):
        d_pos = dist_fn(a, pos)
        d_neg = dist_fn(a, neg)
        if swap:
            d_neg = torch.minimum(d_neg, dist_fn(pos, neg))
        return _reduce(torch.clamp_min(margin + d_pos - d_neg, 0), reduction)

    return _via_rules(decomposition, anchor, positive, negative)


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None):
    """loss = cross_entropy(linear(x, W, b), target, ...) (the reference formula; the chunked
    ``options`` path computes the same loss);  through the rules of linear and cross_entropy.
    (linear_bias and the later parameters are keywords in torch.)"""
    num_batches = tuple(input.shape[:-1])
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    ignore = ignore_index if ignore_index is not None else -100

    def decomposition(x, w, t, b, cw):
        logits = F.linear(x, w.reshape(-1, w.shape[-1]), b.reshape(-1) if b is not None else None)
        logits = logits.reshape(num_batches + (num_classes,) + out_features)
        return F.cross_entropy(logits, t, weight=cw, reduction=reduction, ignore_index=ignore,
                               label_smoothing=label_smoothing)

    y, back = _via_rules(decomposition, input, linear_weight, target, linear_bias, weight)
    return y, lambda dy: back(dy) + nondiff(4)


if hasattr(F, "linear_cross_entropy"):  # new in torch 2.13
    rrule(F.linear_cross_entropy)(linear_cross_entropy)


# ---------------------------------------------------------------------------------------------
# ctc_loss

_CTC_NEG = -1e30  # "log 0" kept finite, so the pullback of logsumexp over unreachable states is not NaN


def _ctc_decomposition(lp, targets, input_lengths, target_lengths, blank, reduction, zero_infinity):
    """The CTC forward (alpha) recursion in log space, written with ruled ops."""
    if lp.dim() == 2:
        lp, targets = lp.unsqueeze(1), targets.reshape(1, -1)
    t_len, n, _ = lp.shape
    dev = lp.device
    in_len = torch.as_tensor(input_lengths, dtype=torch.long, device=dev).reshape(-1)
    tg_len = torch.as_tensor(target_lengths, dtype=torch.long, device=dev).reshape(-1)
    if targets.dim() == 1:  # concatenated targets: pad them to (N, total length)
        total = targets.shape[0]
        starts = tg_len.cumsum(0) - tg_len
        idx = (starts.unsqueeze(1) + torch.arange(total, device=dev)).clamp(max=max(total - 1, 0))
        targets = targets[idx] if total else targets.new_zeros(n, 0)
    s = targets.shape[1]
    states = 2 * s + 1
    ext = torch.cat([torch.stack([torch.full_like(targets, blank), targets], -1).reshape(n, 2 * s),
                     torch.full((n, 1), blank, dtype=targets.dtype, device=dev)], 1)
    lp_ext = lp.gather(2, ext.unsqueeze(0).expand(t_len, n, states))
    pos = torch.arange(states, device=dev)
    prev2 = torch.cat([ext.new_full((n, 2), blank), ext[:, :-2]], 1) if states > 2 else ext
    skip = (pos >= 2) & (ext != blank) & (ext != prev2)
    neg = lp.new_full((n, 1), _CTC_NEG)
    alpha = torch.where(pos < 2, lp_ext[0], _CTC_NEG)
    for t in range(1, t_len):
        a1 = torch.cat([neg, alpha[:, :-1]], 1)
        a2 = torch.where(skip, torch.cat([neg, neg, alpha[:, :-2]], 1), _CTC_NEG) if states > 2 else a1
        new = torch.logsumexp(torch.stack([alpha, a1, a2]), 0) + lp_ext[t]
        alpha = torch.where((t < in_len).unsqueeze(1), new, alpha)
    last = alpha.gather(1, (2 * tg_len).unsqueeze(1)).squeeze(1)
    before = alpha.gather(1, (2 * tg_len - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    before = torch.where(tg_len > 0, before, _CTC_NEG)
    loss = -torch.logsumexp(torch.stack([last, before]), 0)
    infeasible = loss > -_CTC_NEG / 2
    if zero_infinity:
        loss = torch.where(infeasible, 0.0, loss)
    if reduction == "mean":
        return (loss / tg_len.clamp_min(1).to(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@rrule(F.ctc_loss)
def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    """loss = -log of the total probability of the alignments of targets (with blanks) to the
    frames, by the forward (alpha) recursion: alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1),
    alpha_{t-1}(s-2) where a skip is allowed) + log_probs[t, ext(s)];  dlog_probs through the rules of
    gather, logsumexp and where (torch's value is kept for the forward)."""
    unbatched = log_probs.dim() == 2

    def decomposition(lp):
        out = _ctc_decomposition(lp, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
        return out.squeeze(0) if unbatched and reduction == "none" else out

    y, back = _via_rules(decomposition, log_probs,
                         value=lambda: F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                                                  zero_infinity))
    return y, lambda dy: back(dy) + nondiff(6)
