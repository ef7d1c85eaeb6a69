"""CLIP text encoder of SD 1.x (ViT-L/14 text tower), from scratch.

Token + learned position embeddings, `layers` pre-LayerNorm transformer layers with
causal self-attention and a QuickGELU MLP, then a final LayerNorm. Numerically it
follows transformers' CLIPTextModel with `_attn_implementation="sdpa"`: that path
passes no mask tensor and calls SDPA with `is_causal=True` (the prompt is padded to
77 tokens and the padding is attended to causally, like the original), so we do too.

Names are our own (`embed.tok`, `layers.3.attn.qkv`, `norm`); the key table in
scratch_sd/convert/clip.py maps them to transformers' and to the original LDM names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratch_sd import layers
from scratch_sd.config import CLIPTextConfig

Tensor = torch.Tensor


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.max_positions, cfg.width)
        # Position ids 0..max-1, shaped (1, max) so the lookup is (1, T, width) as in the reference.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions)[None], persistent=False)

    def reset_buffers(self) -> None:
        """Rebuild the non-persistent buffer (lost when the model is built on the meta device)."""
        self.position_ids = torch.arange(self.pos.num_embeddings, device=self.pos.weight.device)[None]

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[-1]
        if t > self.pos.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_positions {self.pos.num_embeddings}")
        return self.tok(input_ids) + self.pos(self.position_ids[:, :t])


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = layers.Linear(cfg.width, 3 * cfg.width)
        self.out = layers.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(layers.attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.exact_gelu = cfg.activation == "gelu"
        self.fc1 = layers.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = layers.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h) if self.exact_gelu else layers.quick_gelu(h)
        return self.fc2(h)


class Layer(nn.Module):
    """Pre-LN transformer layer: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = layers.add(self.attn(self.norm1(x)), x, h_first=False)
        return layers.add(self.mlp(self.norm2(x)), x, h_first=False)


class CLIPTextModel(layers.ExactOrFast, nn.Module):
    def __init__(self, cfg: CLIPTextConfig, exact: bool = False):
        """exact=False (default): the fast mode (oneDNN linears on the CPU in inference);
        True: bit-identical to transformers (layers.ExactOrFast)."""
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.set_exact(exact)

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False):
        """input_ids (B, T) -> last hidden state (B, T, width), after the final LayerNorm.

        With output_hidden_states=True, returns (last_hidden_state, hidden_states), where
        hidden_states is a tuple of layers + 1 tensors as transformers gives them: the
        embeddings, then each layer's output (none of them final-normed). Clip skip n
        uses `model.norm(hidden_states[-(n + 1)])`, as diffusers' pipeline does.
        """
        x = self.embed(input_ids)
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        last = self.norm(x)
        return (last, tuple(hidden_states)) if output_hidden_states else last

    def pooled(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """(B, T, width) -> (B, width): the hidden state at each prompt's end-of-text token.

        Legacy configs (eos_token_id == 2, every SD 1.x checkpoint) take the position of the
        largest token id (the tokenizer's eos 49407 is the largest id); newer configs take
        the first position equal to eos_token_id. Both as transformers' CLIPTextModel.
        """
        ids = input_ids.to(device=hidden.device, dtype=torch.int)
        if self.cfg.eos_token_id == 2:
            pos = ids.argmax(dim=-1)
        else:
            pos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
