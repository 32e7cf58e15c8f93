"""Our CLIP text tower against Hugging Face transformers' CLIPTextModel on the same random weights."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e .[test]")


def test_clip_matches_transformers():
    from models.clip import CLIPTextModel
    from models.config import CLIPTextConfig
    from models.weights import load_text_encoder
    cfg = CLIPTextConfig(width=64, layers=3, heads=4, vocab_size=49408)
    hf_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF init leaves LayerNorms at identity: randomise every path
            p.add_(0.1 * torch.randn_like(p))
    ours = CLIPTextModel(cfg).eval()
    load_text_encoder(ours, hf.state_dict(), "transformers CLIPTextModel")
    ids = ours.empty_prompt_ids(1)
    ids[0, 3:6] = torch.tensor([320, 1125, 539])  # a non-empty prompt too
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        got = ours(ids)
        empty_ref = hf(input_ids=ours.empty_prompt_ids(1)).last_hidden_state
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert (ours.empty_context() - empty_ref).abs().max() / empty_ref.abs().max() < 1e-5
