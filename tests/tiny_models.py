"""Tiny random causal LMs built from configs (no download), one per architecture the capture serves."""

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

ARCHS = ["gpt2", "llama", "qwen2", "gemma3"]


def tiny_config(arch, vocab=512):
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":  # GQA with one KV head, a sliding window that cuts the test sequences
        common.update(num_key_value_heads=1, head_dim=16)
        return Gemma3TextConfig(**common, sliding_window=6,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(arch)


def tiny_model(arch, attn="sdpa", seed=0, vocab=512):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), attn_implementation=attn)
    return model.eval()
