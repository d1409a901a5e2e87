"""openPangu loading: the real config maps to LlamaForCausalLM with the real parameter count; the tiny twin
loads from local files with from_pretrained; the tokenizer's ids are SentencePiece's own."""
from __future__ import annotations

import json

import pytest

# openPangu-Embedded-7B-V1.1 config.json as published (public mirror; see ../shared/design/workloads.md)
REAL_CONFIG = {
    "architectures": ["PanguEmbeddedForCausalLM"], "bias": True, "attention_dropout": 0.0, "bos_token_id": 1,
    "pad_token_id": 0, "eos_token_id": 45892, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12800, "max_position_embeddings": 32768, "model_type": "PanguEmbedded",
    "num_attention_heads": 32, "num_hidden_layers": 34, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 16000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.53.2", "use_cache": True, "vocab_size": 153376,
}


def test_real_config_on_meta_has_the_real_parameter_count():
    import torch
    from transformers import LlamaForCausalLM

    from core.models.pangu import llama_config

    cfg = llama_config(REAL_CONFIG)
    assert cfg.attention_bias and not cfg.mlp_bias and cfg.rope_parameters["rope_theta"] == 1.6e7
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 8_030_887_936
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == 34 * 4 and all(".self_attn." in n for n in biases)


@pytest.fixture(scope="module")
def tiny(tiny_pangu_factory):
    return tiny_pangu_factory(layers=3)


def test_tiny_folder_has_the_real_files_and_loads(tiny):
    import torch
    from safetensors import safe_open

    from core.models.pangu import load_pangu

    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "PanguEmbedded" and cfg["bias"] is True and cfg["num_hidden_layers"] == 3
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in keys and "model.layers.2.self_attn.o_proj.bias" in keys
    model = load_pangu(tiny, dtype=torch.float32)
    assert model.config.num_hidden_layers == 3 and model.model.layers[0].self_attn.q_proj.bias is not None
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        assert torch.equal(model.lm_head.weight, f.get_tensor("lm_head.weight").float())
    out = model.generate(torch.tensor([[1, 10, 20]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_tokenizer_ids_equal_sentencepiece(tiny):
    import sentencepiece as spm

    from core.models.pangu import load_tokenizer

    tok = load_tokenizer(tiny)
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    for text in ["胸部CT平扫：双肺纹理清晰。", "No pneumothorax is seen.", "右侧少量胸腔积液 with atelectasis"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    tok.add_tokens(["<image>", "</image>"] + [f"<image{i}>" for i in range(32)], special_tokens=True)
    ids = tok.encode("<image><image0></image>", add_special_tokens=False)
    assert ids == [sp.GetPieceSize(), sp.GetPieceSize() + 2, sp.GetPieceSize() + 1]


def test_missing_files_are_clear_errors(tmp_path):
    from core.models.pangu import ModelFolderError, load_pangu, load_tokenizer

    with pytest.raises(ModelFolderError, match="no config.json"):
        load_pangu(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    with pytest.raises(ModelFolderError, match="no \\*.safetensors"):
        load_pangu(tmp_path)
    with pytest.raises(ModelFolderError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
