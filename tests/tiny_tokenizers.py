"""Tiny offline fast tokenizers for tests, trained in-process on a built-in word-problem corpus.

- `bytelevel_tokenizer()`: GPT-2 / SmolLM style byte-level BPE (digits split one by one, offsets not
  trimmed as in GPT-2), eos "<|endoftext|>", pad = eos, no BOS. A multibyte character ("÷", "’") becomes
  several byte tokens that share the character's offsets (overlapping offsets).
- `metaspace_tokenizer()`: Llama-2 / Gemma (SentencePiece) style BPE with Metaspace, single digits and
  byte fallback; "<bos>" is prepended with offset (0, 0); pad "<pad>", eos "<eos>".

Both have at most 512 tokens. Training is cached; every call returns a fresh wrapper, so a test may set
`padding_side` (or pass it here) without affecting other tests.
"""

import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
# No "÷" or "’" here on purpose: they must stay unmerged byte tokens.
CORPUS = [
    "Question: Mary has 12 apples. She gives 3 apples to John. How many apples does she have left?",
    "Rationale: Mary starts with 12 apples. She gives away 3, so 12 - 3 = 9. The answer is 9.",
    "Question: A shirt costs $25 and a hat costs $7.50. What is the total cost?\nAnswer: 32.50",
    "Rationale: The total cost is 25 + 7.50 = 32.50 dollars. The answer is 32.50.",
    "Question: A town has 1,200 people. 25% of them are children. How many children are there?",
    "Rationale: 25% of 1,200 is 0.25 * 1,200 = 300. So there are 300 children. The answer is 300.",
    "Question: Tom reads 15 pages every day for 4 days. How many pages does he read in total?",
    "Rationale: He reads 15 pages each day. In 4 days he reads 15 * 4 = 60 pages. The answer is 60.",
    "Question: A baker made 48 cookies and put them into boxes of 6. How many boxes did he fill?",
    "Rationale: 48 / 6 = 8, so the baker filled 8 boxes. The answer is 8.",
    "Question: Where would you find a wooded area with many trees? Answer Choices: (a) city (b) forest",
    "Rationale: A forest is a large wooded area. The answer is (b) forest.",
    "The train travels 120 miles in 2 hours, so its speed is 60 miles per hour.",
    "There were 36 students in the class and 1/3 of them walked to school on Monday.",
]


def _train(tok, trainer):
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


@functools.cache
def _bytelevel():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return _train(tok, trainer)


@functools.cache
def _metaspace():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback()])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=specials, show_progress=False)
    _train(tok, trainer)
    # SentencePiece byte fallback: unknown characters become their UTF-8 bytes <0xNN>.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return tok


def bytelevel_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_bytelevel(),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
    )


def metaspace_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_metaspace(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
