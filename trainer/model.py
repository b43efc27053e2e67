"""The student: a GPT-2-style decoder with an optional CoCoMix concept block (docs/method.md section 2)
or the pause-token baseline.

Learned absolute positions, pre-LN blocks, PyTorch SDPA attention, tied LM head (nanoGPT layout).
With ``concept.mix == "interleave"`` the blocks from L_ins on run on 2T positions
[h_1, c_1, h_2, c_2, ...] under a plain causal mask and the LM head reads only the concept slots, so
the logit for token t+1 comes from slot c_t. A KV cache holds one entry per token before L_ins and two
after it.

With ``pause_layer`` set (the pause-token baseline of the paper's Fig. 6f; Goyal et al. 2024, "Think
before you speak") the same interleave runs with one learned vector p in every second slot,
[h_1, p, h_2, p, ...], from block ``pause_layer`` on: CoCoMix's extra positions and compute without
its concepts (no predictor, no compression). The LM head reads the pause slots, and the KV cache is
the same as CoCoMix's. The vector gets no position embedding, as c_t does not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.concept import ConceptBlock
from trainer.config import ModelConfig


class KVCache:
    """Per-layer keys and values of everything processed so far (for generation)."""

    def __init__(self, n_layer: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.n_tokens = 0
        """Tokens processed (positions of the next token start here)."""

    def entries(self, layer: int) -> int:
        kv = self.kv[layer]
        return 0 if kv is None else kv[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, L, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        past = 0
        if cache is not None:
            prev = cache.kv[layer]
            if prev is not None:
                past = prev[0].shape[2]
                k = torch.cat([prev[0], k], dim=2)
                v = torch.cat([prev[1], v], dim=2)
            cache.kv[layer] = (k, v)
        p = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif L == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one query sees the whole past
        else:
            # L new queries after `past` cached keys: query i sees keys 0 .. past + i.
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, L, d)  # (B, L, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPTOut(NamedTuple):
    logits: torch.Tensor | None
    """Next-token logits (B, T, V): position t predicts token t+1. None when called with head=False."""
    concept_logits: torch.Tensor | None
    """Predicted concept logits z (B, T, C), None without a concept block."""
    concept_ids: torch.Tensor | None
    """The top-k concept ids selected per position (B, T, k), None without a concept block."""
    hidden: torch.Tensor | None = None
    """With head=False: the final hidden states (B, T, d) after ln_f, which the LM head would read
    (trainer/chunked_ce.py computes the head and its losses over chunks of them)."""


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (GPT-2)
        self.concept = ConceptBlock(cfg.d_model, cfg.concept) if cfg.concept is not None else None
        self.pause = nn.Parameter(torch.empty(cfg.d_model)) if cfg.pause_layer is not None else None
        """The learned pause vector (d,), None without pause tokens."""
        self.apply(self._init_weights)
        if self.concept is not None and self.concept.comp_weight is not None:
            nn.init.normal_(self.concept.comp_weight, std=0.02)
        if self.pause is not None:
            nn.init.normal_(self.pause, std=0.02)  # as the token embeddings it sits between
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def insert_layer(self) -> int:
        """The first block that sees what is mixed in: L_ins of the concept block, the pause layer, or
        n_layer (nothing mixed in)."""
        if self.cfg.concept is not None:
            return self.cfg.concept.insert_layer
        return self.cfg.pause_layer if self.cfg.pause_layer is not None else self.cfg.n_layer

    @property
    def interleaves(self) -> bool:
        """Whether the blocks from ``insert_layer`` on run on 2T positions (interleaved concepts or pauses)."""
        c = self.cfg.concept
        return self.cfg.pause_layer is not None or (c is not None and c.mix == "interleave")

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        steer: dict[int, float] | None = None,
        steer_from: int = 0,
        head: bool = True,
    ) -> GPTOut:
        """idx (B, T) token ids. With ``cache`` the tokens continue the cached ones. ``steer`` scales
        predicted concept logits at positions >= ``steer_from`` of this call. ``head=False`` skips the
        LM head: ``logits`` is None and ``hidden`` holds its input (the training loop's chunked loss)."""
        B, T = idx.shape
        start = cache.n_tokens if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, d)
        L_ins = self.insert_layer
        for i in range(L_ins):
            x = self.blocks[i](x, cache, i)
        z = top = slot = None  # slot: what goes after each token when interleaving (B, T, d)
        if self.concept is not None:
            out = self.concept(x, steer, steer_from)
            z, top = out.logits, out.top_idx
            if self.cfg.concept.mix == "interleave":
                slot = out.c_hat
            elif self.cfg.concept.mix == "add":
                x = x + out.c_hat
        elif self.pause is not None:
            slot = self.pause.to(x.dtype).expand_as(x)
        if slot is not None:
            x = torch.stack([x, slot], dim=2).view(B, 2 * T, -1)  # (B, 2T, d): h_1, s_1, h_2, s_2, ...
        for i in range(L_ins, self.cfg.n_layer):
            x = self.blocks[i](x, cache, i)
        if self.interleaves:
            x = x[:, 1::2]  # (B, T, d): the concept / pause slots predict the next token
        h = self.ln_f(x)
        if cache is not None:
            cache.n_tokens += T
        if not head:
            return GPTOut(None, z, top, h)
        return GPTOut(self.lm_head(h), z, top)  # (B, T, V)

    # -- accounting ------------------------------------------------------------------------------

    def num_params(self, exclude_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n

    def flops_per_token(self, T: int) -> float:
        """Forward+backward FLOPs per predicted token for windows of T tokens (matmuls only:
        2 FLOPs per multiply-add, backward = 2x forward; Kaplan et al. 2020 / PaLM appendix B)."""
        c, d = self.cfg, self.cfg.d_model
        L_ins = self.insert_layer
        per_pos_block = 2 * 12 * d * d  # qkv (3d^2) + proj (d^2) + MLP (8d^2), multiply-adds x2

        def attn(n_ctx: int) -> float:  # QK^T and AV, causal average context n_ctx/2 per query
            return 2 * 2 * d * n_ctx / 2

        fwd = L_ins * (per_pos_block + attn(T))
        rest = c.n_layer - L_ins
        if c.concept is not None:
            C, k = c.concept.n_concepts, c.concept.topk
            fwd += 2 * d * C  # predictor
            if c.concept.mix != "none":
                fwd += 2 * k * d  # compression of k columns
        if self.interleaves:
            fwd += rest * 2 * (per_pos_block + attn(2 * T))  # two positions per token (concept or pause slot)
        else:
            fwd += rest * (per_pos_block + attn(T))
        fwd += 2 * d * c.vocab_size  # LM head
        return 3.0 * fwd
