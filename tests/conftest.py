"""Shared fixtures: tiny random teacher and student saved as model folders, as a user's would be."""

import pytest
from tiny_models import tiny_model
from tiny_tokenizers import bytelevel_tokenizer, metaspace_tokenizer


def save_tiny(folder, arch, tokenizer):
    model = tiny_model(arch)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """Gemma3 architecture (GQA, sliding window) with a SentencePiece-style tokenizer that adds <bos>."""
    return save_tiny(tmp_path_factory.mktemp("teacher"), "gemma3", metaspace_tokenizer())


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    """Llama architecture with a byte-level BPE tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("student"), "llama", bytelevel_tokenizer())
