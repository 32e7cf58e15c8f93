"""CLIP ViT-L/14 text tower (HF CLIPTextModel layout), enough to compute CLIP("") (spec §2.6).

The empty prompt tokenises to [BOS, EOS, EOS x 75] (the openai tokenizer pads with its EOS
token), so no vocabulary file is needed. Output: last_hidden_state after final_layer_norm,
(B, 77, width). Keys: `text_model.*` (under `cond_stage_model.transformer.` in checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import CLIPTextConfig


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_ratio * cfg.width)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        tm = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        tm.embeddings.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)])
        tm.final_layer_norm = nn.LayerNorm(cfg.width)
        self.text_model = tm

    def empty_prompt_ids(self, batch: int = 1) -> torch.Tensor:
        ids = torch.full((batch, self.cfg.max_positions), self.cfg.eos_token, dtype=torch.long)
        ids[:, 0] = self.cfg.bos_token
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tm = self.text_model
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(pos)[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    @torch.no_grad()
    def empty_context(self) -> torch.Tensor:
        """CLIP("") last_hidden_state, (1, 77, width): the constant context of X-Portrait."""
        return self(self.empty_prompt_ids().to(self.text_model.final_layer_norm.weight.device))
