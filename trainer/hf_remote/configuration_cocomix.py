"""The configuration of a CoCoMix student exported by ``python -m trainer.export`` (docs/export.md).

GPT-2's field names for the shared part (so tools that read ``n_positions`` / ``max_position_embeddings``
find the context length), plus the concept block of docs/method.md section 2.2 and ``steer``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class CocomixConfig(PretrainedConfig):
    model_type = "cocomix"
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size: int = 50304,
        n_positions: int = 1024,
        n_embd: int = 512,
        n_layer: int = 8,
        n_head: int = 8,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        n_concepts: int = 32768,
        insert_layer: int = 3,
        topk: int = 32,
        mix: str = "interleave",
        steer: dict[str, float] | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        """The learned position table's size: the longest sequence the model reads."""
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.dropout = dropout
        self.bias = bias
        """Biases in the linear layers and layer norms (GPT-2 has them)."""
        self.layer_norm_epsilon = layer_norm_epsilon
        self.n_concepts = n_concepts
        """C: the concept vocabulary (the SAE's latents)."""
        self.insert_layer = insert_layer
        """L_ins: the concept block reads the output of the first L_ins blocks."""
        self.topk = topk
        """k: predicted concept logits kept for the continuous concept."""
        self.mix = mix
        """interleave (the paper: a concept slot after every token from L_ins on), add or none."""
        self.steer = {str(k): float(v) for k, v in (steer or {}).items()}
        """Concept steering applied by every forward call: {"CONCEPT_ID": SCALE} multiplies the predicted
        logit of that concept by SCALE before TopK (docs/method.md section 2.6). A ``steer=`` argument
        of forward / generate replaces it for that call."""
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
