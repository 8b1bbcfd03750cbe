"""Next-character models for windows of character (or token) ids.

Both models take ``(B, L)`` ids, stored as ``uint8`` or ``int64`` (cast with
``.long()`` in ``forward``), and return logits ``(B, num_classes)`` for the
character that follows the window, read from the last position as in the
LEAF Shakespeare benchmark. ``num_classes`` is also the vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_dropout, check_positive_int, check_sequence_shape

__all__ = ["CharLSTM", "CharTransformer", "EncoderBlock", "SelfAttention"]


class CharLSTM(nn.Module):
    """LEAF-style character LSTM: ``embed``, a stacked ``lstm``, linear ``fc``.

    Defaults (``embed_dim=8, hidden=256, layers=2``) give 819,920 parameters for
    an 80-character vocabulary. The window length only has to be >= 1.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        embed_dim: int = 8,
        hidden: int = 256,
        layers: int = 2,
    ) -> None:
        check_sequence_shape("char_lstm", input_shape)
        for option, value in (("embed_dim", embed_dim), ("hidden", hidden), ("layers", layers)):
            check_positive_int("char_lstm", option, value)
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)  # (B, L) -> (B, L, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))  # (B, L) -> (B, L, E) -> (B, L, hidden)
        return self.fc(out[:, -1])  # last step: (B, hidden) -> (B, num_classes)


class SelfAttention(nn.Module):
    """Multi-head self-attention with four plain ``nn.Linear`` projections.

    Written out instead of using ``nn.MultiheadAttention``, whose packed
    ``in_proj_weight`` is a bare parameter and whose ``out_proj`` is a
    ``Linear`` subclass: ``q_proj``/``k_proj``/``v_proj``/``out_proj`` here can
    each be wrapped or factorised on their own. No mask: every position
    attends to the whole window.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            # (B, T, D) -> (B, heads, T, D / heads)
            return proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj),
            heads(self.k_proj),
            heads(self.v_proj),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))  # heads back to (B, T, D)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder layer.

    Computes the same function as ``nn.TransformerEncoderLayer(d_model, n_heads,
    ff, dropout, batch_first=True, norm_first=True)`` (ReLU feed-forward,
    LayerNorm eps 1e-5), with the attention of :class:`SelfAttention` and the
    feed-forward as plain ``ff1``/``ff2`` linears.
    """

    def __init__(self, d_model: int, n_heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ff)
        self.ff2 = nn.Linear(ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) -> (B, T, D)
        x = x + self.dropout(self.attn(self.norm1(x)))
        hidden = self.dropout(F.relu(self.ff1(self.norm2(x))))  # (B, T, ff)
        return x + self.dropout(self.ff2(hidden))


class CharTransformer(nn.Module):
    """Small bidirectional transformer encoder that classifies the next character.

    Token ``embed`` plus learned ``pos_embed`` (one row per position of the
    ``L``-long window), ``n_layers`` pre-norm :class:`EncoderBlock` s in
    ``blocks``, a final ``norm`` and linear ``fc`` on the last position.
    Windows shorter than ``L`` are accepted and use the first positions.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        ff: int = 512,
        dropout: float = 0.0,
    ) -> None:
        max_len = check_sequence_shape("transformer", input_shape)
        sizes = {"d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "ff": ff}
        for option, value in sizes.items():
            check_positive_int("transformer", option, value)
        if d_model % n_heads:
            raise ValueError(
                f"model 'transformer': option d_model={d_model} must be divisible by "
                f"n_heads={n_heads}"
            )
        dropout = check_dropout("transformer", dropout)
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(num_classes, d_model)
        self.pos_embed = nn.Embedding(self.max_len, d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, n_heads, ff, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)  # pre-norm blocks leave the residual stream unnormalised
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"transformer built for windows of {self.max_len} ids got {t}")
        positions = torch.arange(t, device=x.device)
        h = self.embed(x.long()) + self.pos_embed(positions)  # (B, T, D) + (T, D)
        for block in self.blocks:
            h = block(h)
        return self.fc(self.norm(h[:, -1]))  # last position: (B, D) -> (B, num_classes)
