"""A drop-in nn.LSTM forward for CPUs: one input projection for all steps, a hand-written recurrence.

nn.LSTM on a CPU projects the input step by step and has autograd record every small op of every
step. Here each layer does two things:

1. the input projection of all T steps and both directions as one matrix product (the two
   directions' weights concatenated). With 4096-d features that is most of a head's work, and the
   part that runs in bfloat16 under `projection_dtype` (what amp "auto" picks on CPUs with native
   bfloat16: about half the time of float32 there);
2. the recurrence as one autograd Function (`_Recurrence`), always in the weights' float32: its
   forward runs the steps without autograd, both directions in one batched product per step, and
   its backward is backpropagation through time written out (Werbos 1990), per step on slices that
   stay in cache, with W_hh's and the bias's gradients summed over all steps at once afterwards.
   Both directions keep time order in its buffers; the reverse one just walks them backwards.

Each step computes (Hochreiter & Schmidhuber 1997, with forget gate; PyTorch's gate order)
    i, f, g, o = W_ih x_t + b_ih + W_hh h + b_hh
    c = sigma(f) c + sigma(i) tanh(g);  h = sigma(o) tanh(c)
with tanh(g) taken as 2 sigma(2g) - 1, so one sigmoid serves all four gates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

_PROJECTION_DTYPE: ContextVar[torch.dtype | None] = ContextVar("projection_dtype", default=None)


@contextlib.contextmanager
def projection_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, the fused LSTMs' input products and self-attention's projections run in `dtype`.

    The narrow form of autocast for CPUs (the attention is `streams.heads.self_attention`): those
    large matrix products gain most from bfloat16, while the ops around them (recurrence, attention
    weights, norms, small dense layers) are as fast or faster in float32 and keep its precision.
    Master weights and gradients stay in their own dtype. None: no change.
    """
    token = _PROJECTION_DTYPE.set(dtype)
    try:
        yield
    finally:
        _PROJECTION_DTYPE.reset(token)


def current_projection_dtype() -> torch.dtype | None:
    """The dtype `projection_dtype` set for the current block; None outside one."""
    return _PROJECTION_DTYPE.get()


def _step(buf: torch.Tensor, s: int) -> torch.Tensor:
    """Step s of every direction as one view: time s forwards, time T-1-s for the reverse direction.

    Shape: (dirs, T, N, ...) -> (dirs, N, ...). Both directions keep time order in `buf`, so the
    reverse direction needs no flipped copies; its step s lies (T-1-2s) time strides further on.
    """
    if buf.shape[0] == 1:
        return buf[:, s]
    t, st = buf.shape[1], buf.stride(1)
    return buf.as_strided((2, *buf.shape[2:]), (buf.stride(0) + (t - 1 - 2 * s) * st, *buf.stride()[2:]),
                          buf.storage_offset() + s * st)


def _after_first(buf: torch.Tensor, previous: bool = False) -> torch.Tensor:
    """Steps 1..T-1 of every direction as one view (or, with `previous`, the step before each).

    Shape: (dirs, T, N, ...) -> (dirs, T-1, N, ...); each direction's steps in time order.
    """
    if buf.shape[0] == 1:
        return buf[:, :-1] if previous else buf[:, 1:]
    sd, st = buf.stride(0), buf.stride(1)
    # Forwards step s is time s; backwards it is time T-1-s, so "the step before" is one time later.
    return buf.as_strided((2, buf.shape[1] - 1, *buf.shape[2:]), (sd + st if previous else sd - st, *buf.stride()[1:]),
                          buf.storage_offset() + (0 if previous else st))


class _Recurrence(torch.autograd.Function):
    """The LSTM time loop of one layer from zero states, all directions batched in one product per step.

    Shape: gates_in (N, T, dirs * 4H) (input projection, batch-first, any float dtype), bias
    (dirs, 4H) or None (b_ih + b_hh), w_hh (dirs, 4H, H) -> out (N, T, dirs * H) and c_last
    (dirs, N, H), in w_hh's dtype: the recurrence keeps the master weights' precision (float32)
    whatever the projection ran in. Buffers are (dirs, T, N, .) with both directions in time order.
    """

    @staticmethod
    def forward(ctx, gates_in: torch.Tensor, bias: torch.Tensor | None,
                w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(w_hh.device.type, enabled=False):  # float32 under amp "bf16" too
            return _Recurrence._forward(ctx, gates_in, bias, w_hh)

    @staticmethod
    def _forward(ctx, gates_in: torch.Tensor, bias: torch.Tensor | None,
                 w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dirs, four_h, hidden = w_hh.shape
        n, t = gates_in.shape[:2]
        by_time = gates_in.view(n, t, dirs, four_h).permute(2, 1, 0, 3)  # (dirs, T, N, 4H)
        acts = torch.empty(dirs, t, n, four_h, dtype=w_hh.dtype, device=w_hh.device)  # gate inputs, then gates
        if bias is None:
            acts.copy_(by_time)
        else:
            torch.add(by_time, bias.view(dirs, 1, 1, four_h), out=acts)
        g_rows = slice(2 * hidden, 3 * hidden)
        acts[..., g_rows] *= 2  # tanh(x) = 2 sigma(2x) - 1: one sigmoid for all four gates
        w = w_hh.transpose(1, 2).clone()  # (dirs, H, 4H)
        w[..., g_rows] *= 2
        cs = torch.empty_like(acts[..., :hidden])  # cell after each step, (dirs, T, N, H)
        hs = torch.empty_like(cs)  # hidden state after each step
        tanh_c = torch.empty_like(cs)
        for s in range(t):
            a = _step(acts, s)  # (dirs, N, 4H)
            if s:  # the states start at zero, so step 0 has no recurrent product
                a.baddbmm_(_step(hs, s - 1), w)
            i, f, g, o = a.sigmoid_().chunk(4, -1)
            g.mul_(2).sub_(1)  # tanh of the g gate's input, kept for the backward pass
            c = torch.mul(i, g, out=_step(cs, s))
            if s:
                c.addcmul_(f, _step(cs, s - 1))  # c = f c_prev + i g
            torch.mul(o, torch.tanh(c, out=_step(tanh_c, s)), out=_step(hs, s))
        ctx.save_for_backward(w_hh, acts, cs, hs, tanh_c)
        ctx.in_dtype, ctx.bias = gates_in.dtype, bias is not None
        out = hs.permute(2, 1, 0, 3).contiguous().view(n, t, dirs * hidden)
        return out, _step(cs, t - 1).clone()

    @staticmethod
    def backward(ctx, d_out: torch.Tensor,
                 d_c_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        w_hh, acts, cs, hs, tanh_c = ctx.saved_tensors  # acts: sigma(i), sigma(f), tanh(g), sigma(o)
        dirs, t, n, four_h = acts.shape
        hidden = four_h // 4
        d_h_out = torch.empty_like(cs)
        d_h_out.copy_(d_out.view(n, t, dirs, hidden).permute(2, 1, 0, 3))
        d_pre = torch.empty_like(acts)  # gradient of the gate inputs, (dirs, T, N, 4H)
        slope = acts.new_empty(dirs, n, four_h)  # per step: the gates' derivatives
        factor = torch.empty_like(slope)  # per step: what multiplies them (dc or dh times another gate)
        f_i, f_f, f_g, f_o = factor.chunk(4, -1)
        dc = d_c_last.to(acts.dtype, copy=True)  # (dirs, N, H)
        # Each step small enough to stay in cache: reading per-step slices twice beats full-size temporaries.
        for s in range(t - 1, -1, -1):
            a, tc = _step(acts, s), _step(tanh_c, s)
            i, _, g, o = a.chunk(4, -1)
            if s < t - 1:
                dh = torch.baddbmm(_step(d_h_out, s), _step(d_pre, s + 1), w_hh)  # (dirs, N, H)
                dc.mul_(_step(acts, s + 1)[..., hidden : 2 * hidden])  # through c_next = f_next c + ...
            else:
                dh = _step(d_h_out, s)
            torch.mul(tc, tc, out=f_o).neg_().add_(1)  # 1 - tanh(c)^2, then dc += dh o (1 - tanh(c)^2)
            dc.addcmul_(dh, f_o.mul_(o))
            torch.addcmul(a, a, a, value=-1, out=slope)  # sigma' = s (1 - s) for i, f, o
            slope[..., 2 * hidden : 3 * hidden].add_(1).sub_(g)  # tanh' = 1 - g^2 = g (1 - g) + 1 - g
            torch.mul(dc, g, out=f_i)
            if s:
                torch.mul(dc, _step(cs, s - 1), out=f_f)
            else:
                f_f.zero_()
            torch.mul(dc, i, out=f_g)
            torch.mul(dh, tc, out=f_o)
            torch.mul(slope, factor, out=_step(d_pre, s))
        # dW_hh = sum over steps of d_pre^T h_prev (h before step 0 is zero): one product per direction.
        d_w = torch.bmm(_after_first(d_pre).flatten(1, 2).transpose(1, 2),
                        _after_first(hs, previous=True).flatten(1, 2))
        d_bias = d_pre.sum((1, 2)) if ctx.bias else None
        d_in = torch.empty(n, t, dirs, four_h, dtype=ctx.in_dtype, device=d_pre.device)
        d_in.copy_(d_pre.permute(2, 1, 0, 3))
        return d_in.view(n, t, dirs * four_h), d_bias, d_w


class _FusedLSTM(nn.LSTM):
    """nn.LSTM with the fused CPU forward; same parameters, state-dict keys and results (to rounding).

    Packed sequences, initial states, projections and time-major input fall back to nn.LSTM.
    """

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own argument name
        if not isinstance(input, torch.Tensor) or hx is not None or not self.batch_first or self.proj_size:
            return super().forward(input, hx)
        x = input  # (N, T, D)
        dtype = current_projection_dtype() or x.dtype
        suffixes = ("", "_reverse") if self.bidirectional else ("",)
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            names = [f"_l{layer}{s}" for s in suffixes]
            # Cast each direction's weights before joining them: half the bytes to copy in bfloat16.
            w_ih = torch.cat([getattr(self, "weight_ih" + s).to(dtype) for s in names])  # (dirs * 4H, D)
            gates_in = F.linear(x.to(dtype), w_ih)  # (N, T, dirs * 4H): every step's input product at once
            bias = None  # added in float32 inside the recurrence, on the copy it makes anyway
            if self.bias:
                bias = torch.stack([getattr(self, "bias_ih" + s) + getattr(self, "bias_hh" + s) for s in names])
            w_hh = torch.stack([getattr(self, "weight_hh" + s) for s in names])  # (dirs, 4H, H)
            x, c = _Recurrence.apply(gates_in, bias, w_hh)  # (N, T, dirs * H), (dirs, N, H)
            h_last.append(x[:, -1, : self.hidden_size])  # each direction's last step: time T-1 forwards,
            if len(names) == 2:
                h_last.append(x[:, 0, self.hidden_size :])  # time 0 backwards
            c_last.append(c)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, (torch.stack(h_last), torch.cat(c_last))


def use_fused_lstm(module: nn.Module, enabled: bool = True) -> int:
    """Switch every nn.LSTM inside `module` to the fused CPU forward (or back); returns how many.

    Only the forward changes: parameters, state dicts and optimiser references stay as they are.
    """
    count = 0
    for m in module.modules():
        if enabled and type(m) is nn.LSTM:
            m.__class__ = _FusedLSTM
            count += 1
        elif not enabled and type(m) is _FusedLSTM:
            m.__class__ = nn.LSTM
            count += 1
    return count
