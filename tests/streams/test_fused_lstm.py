import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from streams.config import ModelConfig
from streams.fused_lstm import _Recurrence, projection_dtype, use_fused_lstm
from streams.heads import build_head

TINY = ModelConfig(lstm_layers=2, lstm_hidden=8, attention_heads=2, dense_units=(8,), dropout=0.0, lstm_dropout=0.0)


def _pair(layers: int, bidirectional: bool, bias: bool = True, dim: int = 6, hidden: int = 5):
    """An nn.LSTM and a fused copy of it with the same weights."""
    torch.manual_seed(0)
    ref = nn.LSTM(dim, hidden, layers, batch_first=True, bidirectional=bidirectional, bias=bias)
    fused = nn.LSTM(dim, hidden, layers, batch_first=True, bidirectional=bidirectional, bias=bias)
    fused.load_state_dict(ref.state_dict())
    assert use_fused_lstm(fused) == 1
    return ref, fused


def _loss(out: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Uses every output, so the gradients through h_n and c_n are checked too."""
    return out.square().sum() + (h * torch.linspace(-1, 1, h.shape[-1])).sum() + c.sum()


@pytest.mark.parametrize(("layers", "bidirectional", "bias"), [(1, False, True), (2, True, True), (3, True, True),
                                                               (2, True, False), (2, False, True)])
@pytest.mark.parametrize(("n", "t"), [(3, 7), (1, 1), (2, 2)])
def test_matches_nn_lstm_outputs_states_and_gradients(layers, bidirectional, bias, n, t):
    ref, fused = _pair(layers, bidirectional, bias)
    x = torch.randn(n, t, 6)
    (a, (ha, ca)), (b, (hb, cb)) = ref(x), fused(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hb, ha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cb, ca, atol=1e-5, rtol=1e-5)
    _loss(a, ha, ca).backward()
    _loss(b, hb, cb).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_input_gradient_matches():
    ref, fused = _pair(2, True)
    xa = torch.randn(4, 5, 6).requires_grad_()
    xb = xa.detach().clone().requires_grad_()
    ref(xa)[0].square().sum().backward()
    fused(xb)[0].square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("layers", "dropped"), [(1, False), (2, True)])
def test_dropout_only_between_layers_and_only_in_training(layers, dropped):
    ref, fused = _pair(layers, True)
    ref.dropout = fused.dropout = 0.5  # set after construction: nn.LSTM warns about dropout on one layer
    x = torch.randn(4, 5, 6)
    train_out = fused(x)[0]
    fused.eval()
    ref.eval()
    torch.testing.assert_close(fused(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    assert (not torch.allclose(train_out, fused(x)[0])) == dropped


@pytest.mark.parametrize("dirs", [1, 2])
def test_recurrence_gradcheck(dirs):
    torch.manual_seed(0)
    hidden = 3
    gates_in = torch.randn(2, 4, dirs * 4 * hidden, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(dirs, 4 * hidden, hidden, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dirs, 4 * hidden, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Recurrence.apply, (gates_in, bias, w_hh))
    assert torch.autograd.gradcheck(_Recurrence.apply, (gates_in, None, w_hh))


@pytest.mark.parametrize("scope", ["projections", "autocast"])
def test_bf16_equals_float32_within_tolerance(scope):
    ref, fused = _pair(3, True, dim=64, hidden=16)
    x = torch.randn(4, 9, 64)
    a, (ha, ca) = ref(x)
    bf16 = projection_dtype(torch.bfloat16) if scope == "projections" else torch.autocast("cpu", torch.bfloat16)
    with bf16:
        b, (hb, cb) = fused(x)
    assert b.dtype == hb.dtype == cb.dtype == torch.float32  # the recurrence stays in float32
    assert not torch.equal(b, a)
    torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
    _loss(a, ha, ca).backward()
    _loss(b, hb, cb).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters(), strict=True):
        assert q.grad.dtype == torch.float32, name  # master weights and their gradients stay float32
        err = (q.grad - p.grad).norm() / p.grad.norm()
        assert err < 2e-2, f"{name}: relative gradient error {err:.3g}"


def test_projection_dtype_applies_only_inside_the_block():
    ref, fused = _pair(1, True)
    x = torch.randn(2, 3, 6)
    with pytest.raises(RuntimeError, match="boom"), projection_dtype(torch.bfloat16):
        raise RuntimeError("boom")
    torch.testing.assert_close(fused(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)


def test_keeps_state_dict_and_falls_back_for_packed_input():
    torch.manual_seed(0)
    head = build_head(TINY, 16)
    keys = list(head.state_dict())
    assert use_fused_lstm(head) == 1
    assert list(head.state_dict()) == keys
    x, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_fused = head.rnn(packed)[0].data
    assert use_fused_lstm(head, enabled=False) == 1
    torch.testing.assert_close(out_fused, head.rnn(packed)[0].data)
