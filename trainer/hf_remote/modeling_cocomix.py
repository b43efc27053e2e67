"""A CoCoMix student for transformers, loaded with ``trust_remote_code=True`` (docs/export.md).

The same network as the project's trainer/model.py and trainer/concept.py (Tack et al. 2025,
arXiv 2502.08524, Eq. 2-4; docs/method.md section 2): a GPT-2-style decoder (learned positions, pre-LN
blocks, tanh GELU, tied LM head) with a concept block after block L_ins that predicts concept logits
z over the SAE's C latents, keeps the k largest, compresses them into a continuous concept and mixes it
into the stream (``interleave``: a concept slot after every token from L_ins on, the LM head reading
the concept slots; ``add``; ``none``). Parameter names are the trainer's, so the weights are its own.

Beyond the trainer's model: an ``attention_mask`` (left padding, as batched generation uses) gives
positions counted over the real tokens and keeps padded keys out of attention.

Steering (docs/method.md section 2.6): ``steer={concept_id: scale}`` multiplies that concept's
predicted logit before TopK, at positions >= ``steer_from``; ``config.steer`` is the default for every
call. ``generate`` steers from the last prompt position on, as ``python -m trainer.generate --steer``.

Generation keeps its own KV cache (:class:`CocomixCache`: one entry per token before L_ins, two after
it with ``interleave``), as the trainer's generate does, for greedy decoding and sampling; beam search
and assisted decoding, which reorder or roll back transformers' own cache, recompute the sequence
at every step instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_cocomix import CocomixConfig

# The SAE's input normalisation: eps added to the unbiased std (trainer/concept.py).
SAE_LN_EPS = 1e-5


@dataclass
class CocomixCausalLMOutput(CausalLMOutputWithPast):
    """Logits plus what the concept block predicted."""

    concept_logits: torch.FloatTensor | None = None
    """z (B, T, C) after steering."""
    concept_ids: torch.LongTensor | None = None
    """The k concept ids kept per position (B, T, k), by descending logit."""


class CocomixCache:
    """Keys and values per layer of every position processed so far (for generation)."""

    def __init__(self, n_layer: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.n_tokens = 0
        """Tokens processed: the next token's index."""


def _attn_mask(valid: torch.Tensor | None, n: int, past: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for ``n`` queries after ``past`` cached keys. ``valid`` (B, past + n) marks
    real tokens (None: all real). Query i sees keys 0 .. past + i that are real, and always itself (a
    padded query would otherwise see no key: NaN)."""
    padded = valid is not None and not bool(valid.all())
    if not padded:
        if past == 0:
            return None, True
        if n == 1:
            return None, False  # one new query sees the whole past
    allowed = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)
    if not padded:
        return allowed, False
    own = torch.zeros(n, past + n, dtype=torch.bool, device=device)
    own[torch.arange(n), past + torch.arange(n)] = True
    return ((allowed[None] & valid[:, None, :]) | own[None])[:, None], False


class Attention(nn.Module):
    def __init__(self, cfg: CocomixConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: tuple[torch.Tensor | None, bool], cache: CocomixCache | None,
                layer: int) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, L, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            prev = cache.kv[layer]
            if prev is not None:
                k, v = torch.cat([prev[0], k], dim=2), torch.cat([prev[1], v], dim=2)
            cache.kv[layer] = (k, v)
        p = self.dropout if self.training else 0.0
        attn_mask, causal = mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=causal)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, L, d)))


class MLP(nn.Module):
    def __init__(self, cfg: CocomixConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: CocomixConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: tuple[torch.Tensor | None, bool], cache: CocomixCache | None,
                layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def steer_logits(z: torch.Tensor, steer: dict[int, float] | None, steer_from: int = 0) -> torch.Tensor:
    """Multiply z[..., id] by its scale at positions >= steer_from."""
    if not steer:
        return z
    scale = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
    for cid, s in steer.items():
        if not 0 <= cid < z.shape[-1]:
            raise ValueError(f"steered concept id {cid} is outside [0, {z.shape[-1]})")
        scale[cid] = s
    if steer_from <= 0:
        return z * scale
    pos = torch.arange(z.shape[1], device=z.device)[None, :, None]
    return torch.where(pos >= steer_from, z * scale, z)


class ConceptBlock(nn.Module):
    """Predict z from the normalised hidden state, keep the top k, compress them into c_hat."""

    def __init__(self, cfg: CocomixConfig) -> None:
        super().__init__()
        d, C = cfg.n_embd, cfg.n_concepts
        self.topk = cfg.topk
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.predictor = nn.Linear(d, C)
        if cfg.mix != "none":
            self.comp_weight = nn.Parameter(torch.zeros(C, d))  # W_comp transposed: row i is concept i
            self.comp_bias = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("comp_weight", None)
            self.register_parameter("comp_bias", None)

    def forward(
        self, h: torch.Tensor, steer: dict[int, float] | None, steer_from: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        B, T, d = h.shape
        mu = h.mean(dim=-1, keepdim=True)
        hc = h - mu
        std = hc.std(dim=-1, keepdim=True)  # unbiased, as the SAE's normalisation
        x = hc / (std + SAE_LN_EPS) - self.pre_bias
        z = steer_logits(self.predictor(x), steer, steer_from)
        vals, idx = torch.topk(z, self.topk, dim=-1)  # raw signed logits, no ReLU
        if self.comp_weight is None:
            return z, None, idx
        w = self.comp_weight
        comp = F.embedding_bag(
            idx.reshape(-1, self.topk), w, per_sample_weights=vals.reshape(-1, self.topk).to(w.dtype), mode="sum"
        ).view(B, T, d)
        return z, (comp + self.comp_bias + self.pre_bias) * std + mu, idx


class CocomixForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CocomixConfig
    base_model_prefix = "cocomix"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: CocomixConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.concept = ConceptBlock(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ConceptBlock):
            nn.init.zeros_(module.pre_bias)
            if module.comp_weight is not None:
                nn.init.normal_(module.comp_weight, std=std)
                nn.init.zeros_(module.comp_bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def config_steer(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (getattr(self.config, "steer", None) or {}).items()}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        steer: dict[int, float] | None = None,
        steer_from: int = 0,
        cocomix_cache: CocomixCache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CocomixCausalLMOutput | tuple:
        """``steer`` (default ``config.steer``) scales predicted concept logits at positions >=
        ``steer_from`` (counted from the first cached token). ``cocomix_cache``: the tokens continue the
        cached ones and ``attention_mask`` covers both. ``labels``: the shifted next-token cross-entropy."""
        B, T = input_ids.shape
        cfg = self.config
        cache = cocomix_cache
        past = cache.n_tokens if cache is not None else 0
        if past + T > cfg.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's n_positions={cfg.n_positions}")
        valid = attention_mask.bool() if attention_mask is not None else None
        if valid is not None and valid.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {valid.shape[1]} tokens, the input {past} cached + {T} new")
        if position_ids is None:
            if valid is not None:  # left padding: count the real tokens
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        steer = self.config_steer() if steer is None else {int(k): float(v) for k, v in steer.items()}
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        mask = _attn_mask(valid, T, past, x.device)
        for i in range(cfg.insert_layer):
            x = self.blocks[i](x, mask, cache, i)
        z, c_hat, top = self.concept(x, steer, steer_from - past if steer_from > past else 0)
        if cfg.mix == "interleave":
            x = torch.stack([x, c_hat], dim=2).view(B, 2 * T, -1)  # h_1, c_1, h_2, c_2, ...
            mask = _attn_mask(valid.repeat_interleave(2, dim=1) if valid is not None else None, 2 * T, 2 * past,
                              x.device)
        elif cfg.mix == "add":
            x = x + c_hat
        for i in range(cfg.insert_layer, cfg.n_layer):
            x = self.blocks[i](x, mask, cache, i)
        if cfg.mix == "interleave":
            x = x[:, 1::2]  # the concept slots predict the next token
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head
        if cache is not None:
            cache.n_tokens += T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CocomixCausalLMOutput(loss=loss, logits=logits, concept_logits=z, concept_ids=top)
        return out if return_dict is not False else out.to_tuple()

    # -- generation: our own KV cache, never transformers' -----------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' Cache classes hold one entry per token; ours holds two after L_ins

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        cache = kwargs.get("cocomix_cache")
        if cache is not None and cache.n_tokens:
            input_ids = input_ids[:, cache.n_tokens:]  # only what the cache has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "steer": kwargs.get("steer"),
                "steer_from": kwargs.get("steer_from", 0), "cocomix_cache": cache}

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """GenerationMixin.generate, steering (``steer=`` or ``config.steer``) from the last prompt
        position on, as ``python -m trainer.generate --steer`` does; with a KV cache unless
        ``use_cache=False`` or the strategy keeps several hypotheses (beams) or rolls back (assistants)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None and "steer_from" not in kwargs:
            kwargs["steer_from"] = ids.shape[-1] - 1
        gc = kwargs.get("generation_config") or self.generation_config
        simple = (kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1) == 1 and not any(
            kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate"))
        if simple and kwargs.get("use_cache", True) is not False and "cocomix_cache" not in kwargs:
            kwargs["cocomix_cache"] = CocomixCache(self.config.n_layer)
        return super().generate(inputs, **kwargs)
