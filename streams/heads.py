"""Temporal heads: per-frame features (N, T, D) -> one violence logit per clip (N,).

Every head encodes the sequence into (N, T, E), pools it over time with learned attention scores
(Bahdanau-style: s_t = v^T tanh(W h_t), softmax over valid steps) and classifies the pooled vector
with dense layers; the last hidden dense layer is the clip embedding (`embed`).

A `mask` (N, T) marks valid steps with True. Valid steps must come first (padding at the end),
and every clip needs at least one. Padding never changes the result: recurrent layers see packed
sequences, temporal convolutions see zeros (as at a real sequence end), attention ignores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from streams.config import HEADS, ModelConfig
from streams.fused_lstm import current_projection_dtype


def check_mask(mask: torch.Tensor | None, n: int, t: int) -> torch.Tensor | None:
    """Validate a (N, T) valid-step mask; returns the lengths (N,) or None when nothing is padded."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, t):
        raise ValueError(f"mask must be a bool tensor of shape ({n}, {t}), got {mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("mask leaves a clip with no valid step")
    prefix = torch.arange(t, device=mask.device) < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("mask must mark a prefix of each clip as valid (padding at the end only)")
    return None if bool((lengths == t).all()) else lengths


def attention_pool(h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax-weighted mean over time of h, ignoring masked steps.

    Shape: h (N, T, E), scores (N, T), mask (N, T) bool or None -> (N, E).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=1)  # (N, T)
    return torch.einsum("nt,nte->ne", weights, h)


def self_attention(h: torch.Tensor, attn: nn.MultiheadAttention, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`attn(h, h, h)` of a batch-first nn.MultiheadAttention, written out (Vaswani et al. 2017, sec. 3.2.2).

    Same parameters and results as the module, with its input and output projections in the
    projection dtype when one is set (`streams.fused_lstm.projection_dtype`) and the attention
    itself in h's dtype. Shape: h (N, T, E), mask (N, T) bool (True = valid step) -> (N, T, E).
    """
    if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return attn(h, h, h, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
    n, t, e = h.shape
    heads = attn.num_heads
    dtype = current_projection_dtype() or h.dtype

    def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(h.dtype)

    qkv = project(h, attn.in_proj_weight, attn.in_proj_bias).view(n, t, 3, heads, e // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, heads, T, E / heads) each
    keep = None if mask is None else mask[:, None, None, :]  # every query sees the valid keys only
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=attn.dropout if attn.training else 0.0)
    return project(a.transpose(1, 2).reshape(n, t, e), attn.out_proj.weight, attn.out_proj.bias)


def sinusoidal_positions(t: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Transformer positional encoding (Vaswani et al. 2017, sec. 3.5). Shape: (T, dim)."""
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(t, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


class TemporalHead(nn.Module):
    """Base of every head: `encode` (subclass) -> attention pooling -> dense classifier."""

    def __init__(self, enc_dim: int, dense_units: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        # The scorer's output has no bias: softmax ignores a shift, so the bias would never learn.
        self.score = nn.Sequential(nn.Linear(enc_dim, enc_dim), nn.Tanh(), nn.Linear(enc_dim, 1, bias=False))
        layers: list[nn.Module] = []
        width = enc_dim
        for units in dense_units:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = units
        self.dense = nn.Sequential(*layers[:-1])  # the embedding is taken before the last dropout
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, 1)
        self.embed_dim = width

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        """Shape: (N, T, D) -> (N, T, E)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Clip embedding. Shape: (N, T, D), mask (N, T) -> (N, dense_units[-1])."""
        if x.ndim != 3:
            raise ValueError(f"head expects features (N, T, D), got {tuple(x.shape)}")
        lengths = check_mask(mask, x.shape[0], x.shape[1])
        mask = mask if lengths is not None else None
        h = self.encode(x, mask, lengths)  # (N, T, E)
        pooled = attention_pool(h, self.score(h).squeeze(-1), mask)  # (N, E)
        return self.dense(pooled)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: (N, T, D), mask (N, T) -> logits (N,)."""
        return self.out(self.dropout(self.embed(x, mask))).squeeze(-1)


def _run_rnn(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if lengths is None:
        return rnn(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


class RecurrentAttentionHead(TemporalHead):
    """Bidirectional LSTM or GRU -> multi-head self-attention with residual + LayerNorm -> pool."""

    def __init__(self, in_dim: int, cfg: ModelConfig, cell: str = "lstm") -> None:
        enc = 2 * cfg.lstm_hidden
        super().__init__(enc, cfg.dense_units, cfg.dropout)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(in_dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True, bidirectional=True,
                       dropout=cfg.lstm_dropout if cfg.lstm_layers > 1 else 0.0)
        self.attn = nn.MultiheadAttention(enc, cfg.attention_heads, batch_first=True)
        self.norm = nn.LayerNorm(enc)

    def encode(self, x, mask, lengths):
        h = _run_rnn(self.rnn, x, lengths)  # (N, T, 2H)
        return self.norm(h + self_attention(h, self.attn, mask))


class ConvLSTMHead(TemporalHead):
    """Two temporal convolutions (local motion patterns) -> bidirectional LSTM -> pool."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__(2 * cfg.lstm_hidden, cfg.dense_units, cfg.dropout)
        k, c = cfg.conv_kernel, cfg.conv_channels
        self.conv1 = nn.Conv1d(in_dim, c, k, padding=k // 2)
        self.conv2 = nn.Conv1d(c, c, k, padding=k // 2)
        self.rnn = nn.LSTM(c, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True, bidirectional=True,
                           dropout=cfg.lstm_dropout if cfg.lstm_layers > 1 else 0.0)

    def encode(self, x, mask, lengths):
        # Zeroing padded steps before each convolution makes them look like the conv's own zero
        # padding, so valid steps come out exactly as for the unpadded clip.
        keep = None if mask is None else mask[:, None, :].to(x.dtype)  # (N, 1, T)
        h = x.transpose(1, 2)  # (N, D, T)
        for conv in (self.conv1, self.conv2):
            h = torch.relu(conv(h if keep is None else h * keep))
        return _run_rnn(self.rnn, h.transpose(1, 2), lengths)  # (N, T, 2H)


class TransformerHead(TemporalHead):
    """Linear projection + sinusoidal positions -> small pre-norm transformer encoder -> pool."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        d = cfg.transformer_dim
        super().__init__(d, cfg.dense_units, cfg.dropout)
        self.proj = nn.Linear(in_dim, d)
        layer = nn.TransformerEncoderLayer(d, cfg.attention_heads, cfg.transformer_ff, cfg.transformer_dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.transformer_layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.drop = nn.Dropout(cfg.transformer_dropout)

    def encode(self, x, mask, lengths):
        h = self.proj(x)  # (N, T, d)
        h = self.drop(h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype))
        return self.encoder(h, src_key_padding_mask=None if mask is None else ~mask)


STD_FLOOR = 1e-3  # added to a statistic's deviation before it divides: constant statistics get a bounded gain


def masked_statistics(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-dimension mean, standard deviation, max and mean |x_t - x_{t-1}| over each clip's valid steps.

    The pooled statistics of bag-of-features classifiers (Laptev et al. 2008; Hassner et al. 2012's
    ViF pools frame-change magnitudes the same way); the last one measures temporal irregularity.
    The deviation is sqrt(population variance + eps) (finite gradient for constant dimensions); a
    clip of one step has no change (0). Shape: x (N, T, D), mask (N, T) bool or None -> (N, 4D).
    """
    n, t, _ = x.shape
    if mask is None:
        mask = torch.ones(n, t, dtype=torch.bool, device=x.device)
    valid = mask[..., None]  # (N, T, 1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count = mask.sum(dim=1, keepdim=True).to(x.dtype)  # (N, 1)
    # torch.where, not a multiplication by the mask: padding must not leak in, even as 0 * inf.
    mean = torch.where(valid, x, zero).sum(dim=1) / count  # (N, D)
    std = (torch.where(valid, (x - mean[:, None]) ** 2, zero).sum(dim=1) / count + eps).sqrt()
    peak = x.masked_fill(~valid, float("-inf")).amax(dim=1)
    pair = (mask[:, 1:] & mask[:, :-1])[..., None]  # (N, T-1, 1) both steps valid
    step = torch.where(pair, (x[:, 1:] - x[:, :-1]).abs(), zero).sum(dim=1)
    change = step / pair.sum(dim=1).clamp_min(1).to(x.dtype)
    return torch.cat([mean, std, peak, change], dim=1)


class StatsPoolHead(nn.Module):
    """Pooled statistics of each clip -> per-dimension affine -> dropout -> linear embedding -> logit.

    For hand-crafted descriptors and a few dozen training videos: a linear classifier on temporally
    pooled statistics (`masked_statistics`), the classical recipe, instead of thousands of recurrent
    weights. The embedding (dense_units[-1] wide, the size `ModelConfig.embed_dim` promises) is a
    linear map with no activation, so the whole head stays linear in the pooled statistics; its
    rank-E factorisation plus weight decay is the only extra regularisation.

    The affine standardises the statistics: it starts from the first training batch's mean and
    deviation (data-dependent initialisation, as Glow's ActNorm; Kingma & Dhariwal 2018), since the
    features' scales differ by 100x and no dataset statistics reach the head, then trains as
    ordinary parameters. Unlike BatchNorm it behaves the same in training and evaluation. Under
    torch.distributed the first batches of all processes are pooled, so every copy starts equal.
    """

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        stats_dim = 4 * in_dim
        self.shift = nn.Parameter(torch.zeros(stats_dim))
        self.log_scale = nn.Parameter(torch.zeros(stats_dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(stats_dim, cfg.dense_units[-1])
        self.dropout = nn.Identity()  # generic callers compute out(dropout(embed)); the dropout is on the input
        self.out = nn.Linear(cfg.dense_units[-1], 1)
        self.embed_dim = cfg.dense_units[-1]

    @torch.no_grad()
    def _initialize(self, stats: torch.Tensor) -> None:
        s = stats.detach()  # (N, 4D)
        s = s if s.dtype == torch.float64 else s.float()
        moments = torch.stack([torch.full_like(s[0], s.shape[0]), s.sum(dim=0), (s * s).sum(dim=0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        count, total, squares = moments
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0.0).sqrt()
        self.shift.copy_(mean)
        self.log_scale.copy_(-torch.log(std + STD_FLOOR))  # dims constant in the batch get a bounded gain
        self.initialized.fill_(True)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Clip embedding. Shape: (N, T, D), mask (N, T) -> (N, dense_units[-1])."""
        if x.ndim != 3:
            raise ValueError(f"head expects features (N, T, D), got {tuple(x.shape)}")
        lengths = check_mask(mask, x.shape[0], x.shape[1])
        stats = masked_statistics(x, mask if lengths is not None else None)  # (N, 4D)
        if self.training and not bool(self.initialized):
            self._initialize(stats)
        z = (stats - self.shift.to(stats.dtype)) * self.log_scale.exp().to(stats.dtype)
        return self.proj(self.input_dropout(z))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: (N, T, D), mask (N, T) -> logits (N,)."""
        return self.out(self.dropout(self.embed(x, mask))).squeeze(-1)


def build_head(cfg: ModelConfig, in_dim: int) -> TemporalHead | StatsPoolHead:
    """The head named by `cfg.head` over `in_dim`-d frame features."""
    if cfg.head == "stats_pool":
        return StatsPoolHead(in_dim, cfg)
    if cfg.head == "logistic":  # stage 1 fits it in closed form (streams.logistic)
        from streams.logistic import LogisticHead

        return LogisticHead(in_dim, cfg)
    if cfg.head == "bilstm_attention":
        return RecurrentAttentionHead(in_dim, cfg, "lstm")
    if cfg.head == "gru_attention":
        return RecurrentAttentionHead(in_dim, cfg, "gru")
    if cfg.head == "conv1d_lstm":
        return ConvLSTMHead(in_dim, cfg)
    if cfg.head == "transformer":
        return TransformerHead(in_dim, cfg)
    raise ValueError(f"unknown head {cfg.head!r}; choose one of {', '.join(HEADS)}")
