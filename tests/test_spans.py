"""spans.py against hand-written spans and per-character brute-force oracles."""

import functools
import random

import pytest
from tiny_tokenizers import CORPUS, bytelevel_tokenizer, metaspace_tokenizer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import spans
import teacher
import train
from plumbing import files, flags, problems

PROMPT = "Question: {question}\nRationale:"
TOKENIZERS = [bytelevel_tokenizer, metaspace_tokenizer]


@functools.cache
def _spaced():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def spaced_tokenizer():
    """Every whitespace run is its own token (as SmolLM2 / Llama 3 give the space before a number its own token),
    BOS "<s>" first and EOS "</s>" last, both with empty offsets."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_spaced(), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


STEP_TOKENIZERS = [*TOKENIZERS, spaced_tokenizer]


def texts(text, found):
    return [text[s:e] for s, e in found]


def offsets_of(tokenizer, text, **kw):
    enc = tokenizer(text, return_offsets_mapping=True, **kw)
    return [tuple(o) for o in enc["offset_mapping"]]


# ---------------------------------------------------------------- numbers


def test_decimal_is_one_number():
    text = "It weighs 3.5 kg. Then 2."
    assert spans.number_spans(text) == [(10, 13), (23, 24)]
    assert spans.step_spans(text) == [(0, 17), (18, 25)]  # "3.5" never splits a step


def test_thousands_commas():
    text = "A town has 1,000 people, 12,345,678 ants and 1,5 pets."
    assert texts(text, spans.number_spans(text)) == ["1,000", "12,345,678", "1", "5"]
    assert spans.number_spans(text)[0] == (11, 16)


def test_currency_and_percent():
    text = "It costs $5, or 25% of $20."
    assert spans.number_spans(text) == [(10, 11), (16, 18), (24, 26)]


def test_number_ending_a_sentence():
    text = "The answer is 42."
    assert spans.number_spans(text) == [(14, 16)]  # "42", not "42."
    assert spans.step_spans(text) == [(0, 17)]  # the period belongs to the step


def test_number_spans_window_and_every_occurrence():
    text = "3 and 3 and 30"
    assert spans.number_spans(text) == [(0, 1), (6, 7), (12, 14)]
    assert spans.number_spans(text, 2, 13) == [(6, 7), (12, 13)]


def test_unicode_text():
    text = "12 ÷ 4 = 3. John’s dog ate 2.5 treats."
    assert texts(text, spans.number_spans(text)) == ["12", "4", "3", "2.5"]
    assert texts(text, spans.step_spans(text)) == ["12 ÷ 4 = 3.", "John’s dog ate 2.5 treats."]
    assert spans.keyword_spans(text, ["john’s"]) == [(12, 18)]


def test_no_numbers():
    text, steps, words = spans.example_spans("Who is taller?", "Ann is taller than Bob.", PROMPT)
    assert words == [] and spans.number_spans("No digits here.") == []
    for make in TOKENIZERS:
        ids, step_tokens, word_tokens = spans.encode(make(), text, steps, words)
        assert word_tokens == {} and sorted(step_tokens) == [0, 1]


# ---------------------------------------------------------------- steps


def test_steps_hand_example():
    seg = "  Tom has 3.5 kg.  He eats 1.\n\nHow much is left?  "
    assert spans.step_spans(seg) == [(2, 17), (19, 29), (31, 48)]
    assert spans.step_spans(seg, offset=100) == [(102, 117), (119, 129), (131, 148)]


def test_steps_no_delimiter_empty_and_blank():
    assert spans.step_spans("So the answer is 3") == [(0, 18)]
    assert spans.step_spans("") == [] and spans.step_spans(" \n ") == []
    assert spans.step_spans("Hi. . Bye.") == [(0, 3), (4, 5), (6, 10)]  # "." alone is not blank
    assert spans.step_spans("Wait... then v2.0 came.") == [(0, 7), (8, 23)]
    with pytest.raises(ValueError):
        spans.step_spans("a. b.", delimiters="")


def test_question_mark_is_not_a_default_delimiter():
    seg = "Is it big? Yes. Why! Because."
    assert texts(seg, spans.step_spans(seg)) == ["Is it big? Yes.", "Why! Because."]
    assert texts(seg, spans.step_spans(seg, delimiters=".?!")) == ["Is it big?", "Yes.", "Why!", "Because."]
    q, r = "Sam has 3 kg of rice. How much is left?", "He has 3 kg. The answer is 3."
    text, steps, _ = spans.example_spans(q, r, PROMPT)
    assert texts(text, steps) == [
        "Sam has 3 kg of rice.",
        "How much is left?",
        "He has 3 kg.",
        "The answer is 3.",
    ]


def test_rationale_without_period():
    text, steps, words = spans.example_spans("Tom has 3 cats.", "So the answer is 3", PROMPT)
    assert text == "Question: Tom has 3 cats.\nRationale: So the answer is 3"
    assert steps == [(10, 25), (37, 55)]
    assert words == [(18, 19), (54, 55)]


def test_template_words_join_the_adjacent_step():
    prompt = "Step 1 of 2. Question: {question}\nRationale 3:"
    text, steps, words = spans.example_spans("Ann has 4 pens. She loses 1.", "4 - 1 = 3. The answer is 3.", prompt)
    assert text == "Step 1 of 2. Question: Ann has 4 pens. She loses 1.\nRationale 3: 4 - 1 = 3. The answer is 3."
    assert steps == [(23, 38), (39, 51), (65, 75), (76, 92)]  # sentences: where each step starts
    assert texts(text, words) == ["4", "1", "4", "1", "3", "3"]  # the template's 1, 2, 3 are not words
    assert words[0] == (31, 32)
    # Eq. 2: the steps tile the text; "Step 1 of 2. Question: " joins the first, "\nRationale 3: " the second
    assert spans.step_tiles(steps, len(text)) == [(0, 39), (39, 65), (65, 76), (76, 92)]
    head, tail = text.index("Ann"), (text.index("\nRationale"), text.index("4 - 1"))
    for make in STEP_TOKENIZERS:
        tok = make()
        offsets = offsets_of(tok, text)
        step_tokens = spans.token_groups(text, offsets, steps, "step")
        assert sorted(i for group in step_tokens.values() for i in group) == list(range(len(offsets)))
        for i, (a, b) in enumerate(offsets):
            at = ([c for c in range(a, b) if not text[c].isspace()] or [a])[0]  # BOS: 0
            if i == 0 or b > a and at < head:  # BOS and "Step 1 of 2. Question: "
                assert i in step_tokens[0]
            elif b > a and tail[0] <= at < tail[1]:  # "\nRationale 3: "
                assert i in step_tokens[1]


def test_example_spans_bad_prompt():
    for prompt in ["Question:", "{question} {question}"]:
        with pytest.raises(ValueError):
            spans.example_spans("q.", "r.", prompt)


def test_example_spans_with_braces_in_question():
    text, steps, words = spans.example_spans("Is {x} 5?", "Yes.", "Q: {question}\nA:")
    assert text == "Q: Is {x} 5?\nA: Yes." and texts(text, steps) == ["Is {x} 5?", "Yes."]
    assert words == [(10, 11)]


# ---------------------------------------------------------------- keywords


def test_keywords_case_insensitive_and_word_bounded():
    text = "Areas near the area. AREA! The area_code and subarea."
    assert spans.keyword_spans(text, ["area"]) == [(15, 19), (21, 25)]


def test_keyword_absent_blank_and_window():
    assert spans.keyword_spans("The forest is dense.", ["desert"]) == []
    assert spans.keyword_spans("The forest is dense.", ["", "  "]) == []
    assert spans.keyword_spans("forest, forest", ["forest"], start=1) == [(8, 14)]


def test_keyword_overlaps_multiword_and_punctuation():
    text = "A wooded   area is an area. Forest floor plan. C++ rocks."
    found = spans.keyword_spans(text, ["area", "wooded area", "floor plan", "forest floor", "c++"])
    assert texts(text, found) == ["wooded   area", "area", "Forest floor", "C++"]
    # the same keyword twice, or in two cases, gives each occurrence once
    assert spans.keyword_spans("tree tree", ["tree", "TREE"]) == [(0, 4), (5, 9)]


def test_keywords_only_inside_question_and_rationale():
    prompt = "Forest quiz: {question}\nForest notes:"
    text, _, words = spans.example_spans("Where is a forest?", "A forest has trees. So forest.", prompt, ["forest"])
    assert texts(text, words) == ["forest"] * 3
    assert words[0] == (24, 30)


# ---------------------------------------------------------------- tokens (hand-made offsets)


def test_token_groups_hand_offsets():
    text = "A.  B."
    steps = [(0, 2), (4, 6)]
    # BOS (0, 0) starts step 0; the whitespace-only "  " is in the step of its start; a trailing special token
    # (0, 0) follows the token before it, into the last step: every token is in one step
    assert spans.token_groups(text, [(0, 0), (0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (0, 0)], steps, "step") == {
        0: [0, 1, 2, 3],
        1: [4, 5, 6],
    }
    # a step owns the text up to the next step: " X." before "B." is step 0's, the last step runs to the end
    assert spans.token_groups("A. X. B. Y", [(0, 2), (2, 4), (4, 5), (5, 8), (8, 10)], [(0, 2), (6, 8)], "step") == {
        0: [0, 1, 2],
        1: [3, 4],
    }
    # a token ".  B" starts in step 0: it belongs there (first non-space char), yet still covers "B"
    assert spans.token_groups(text, [(0, 1), (1, 5), (5, 6)], steps, "step") == {0: [0, 1], 1: [2]}
    # two tokens with the same offsets (one multibyte character) both belong to the word
    assert spans.token_groups("x ÷ 2", [(0, 1), (1, 3), (2, 3), (3, 4), (4, 5)], [(2, 3), (4, 5)], "word") == {
        0: [1, 2],
        1: [4],
    }


def test_empty_token_inside_a_word_belongs_to_nothing():
    assert spans.token_groups("x 12", [(0, 1), (2, 3), (3, 3), (3, 4)], [(2, 4)], "word") == {0: [1, 3]}


def test_token_groups_coverage_rule():
    text = "ab 12345 cd."
    words = [(3, 8)]
    assert spans.token_groups(text, [(0, 2), (2, 3), (3, 5), (5, 8)], words, "word") == {0: [2, 3]}
    assert spans.token_groups(text, [(0, 2), (2, 3), (3, 5)], words, "word") == {}  # cut number
    assert spans.token_groups(text, [(0, 2), (2, 3), (3, 5), (6, 8)], words, "word") == {}  # hole
    assert spans.token_groups(text, [(0, 12)], [(0, 12)], "step") == {0: [0]}
    # offsets that leave out the spaces (trimmed offsets) still cover the step: spaces need no token
    assert spans.token_groups(text, [(0, 2), (3, 8), (9, 12)], [(0, 12)], "step") == {0: [0, 1, 2]}
    assert spans.token_groups(text, [(0, 11)], [(0, 12)], "step") == {}


def test_step_tiles():
    assert spans.step_tiles([(3, 5), (6, 9), (12, 14)], 16) == [(0, 6), (6, 12), (12, 16)]
    assert spans.step_tiles([(0, 4)], 4) == [(0, 4)] and spans.step_tiles([], 0) == []
    for steps in [[(3, 5), (3, 9)], [(6, 9), (3, 5)], [(0, 1), (4, 5)], [(0, 2), (0, 2)]]:
        with pytest.raises(ValueError, match="increasing"):
            spans.step_tiles(steps, 4)


def test_token_groups_errors():
    with pytest.raises(ValueError):
        spans.token_groups("ab", [(0, 2)], [(0, 2)], "token")
    with pytest.raises(ValueError):
        spans.token_groups("ab", [(0, 3)], [(0, 2)], "word")
    with pytest.raises(ValueError):
        spans.token_groups("ab. cd.", [(0, 3), (3, 7)], [(4, 7), (0, 3)], "step")  # steps out of text order


def test_align_intersection():
    teacher = {0: [1], 2: [3], 5: [4, 5]}
    student = {2: [1], 0: [4], 7: [1]}
    assert spans.align(teacher, student) == [0, 2]
    assert spans.align(teacher, student, {2: [9]}) == [2]
    assert spans.align(teacher) == [0, 2, 5]
    assert spans.align(teacher, {}) == []
    with pytest.raises(ValueError):
        spans.align()


# ---------------------------------------------------------------- real (tiny) tokenizers


def test_tiny_tokenizers_contract():
    for make in TOKENIZERS:
        assert len(make()) <= 512 and make().is_fast
        left = make(padding_side="left")
        batch = left(["a", "a b c"], padding=True)
        assert batch["attention_mask"][0][0] == 0 and make().padding_side == "right"
    assert bytelevel_tokenizer().pad_token == bytelevel_tokenizer().eos_token == "<|endoftext|>"


@pytest.mark.parametrize("make", TOKENIZERS)
def test_multibyte_characters_share_offsets(make):
    text = "12 ÷ 4 is 3. John’s"
    offsets = offsets_of(make(), text)
    for char in "÷’":
        c = text.index(char)
        assert offsets.count((c, c + 1)) >= 2  # the fact: one character, several byte tokens


@pytest.mark.parametrize("make", TOKENIZERS)
def test_overlapping_offsets_grouped(make):
    text, steps, words = spans.example_spans("12 ÷ 4 is what?", "John’s answer is 3.", PROMPT, ["john’s", "÷"])
    tok = make()
    offsets = offsets_of(tok, text)
    _, step_tokens, word_tokens = spans.encode(tok, text, steps, words)
    div, apo = text.index("÷"), text.index("’")
    assert texts(text, words) == ["÷", "John’s"]
    assert word_tokens[0] == [i for i, o in enumerate(offsets) if o == (div, div + 1)]
    assert {i for i, o in enumerate(offsets) if o == (apo, apo + 1)} < set(word_tokens[1])
    assert {i for i, o in enumerate(offsets) if o == (div, div + 1)} < set(step_tokens[0])


def test_bos_has_empty_offsets_and_starts_the_first_step():
    tok = metaspace_tokenizer()
    text, steps, words = spans.example_spans("Tom has 5 pens.", "He has 5.", PROMPT)
    ids, step_tokens, word_tokens = spans.encode(tok, text, steps, words)
    offsets = offsets_of(tok, text)
    assert ids[0] == tok.bos_token_id and offsets[0] == (0, 0)
    assert all(0 not in group for group in word_tokens.values())
    assert sorted(step_tokens) == [0, 1] and sorted(word_tokens) == [0, 1]
    # BOS, "Question:" (template) and "Tom has 5 pens." up to "\nRationale:" are step 0; "He has 5." step 1
    he = text.index("He")
    first = next(i for i, (a, b) in enumerate(offsets) if a <= he < b)  # the token of "He"'s "H"
    assert step_tokens[0] == list(range(first)) and step_tokens[1] == list(range(first, len(ids)))


@pytest.mark.parametrize("make", TOKENIZERS)
def test_truncation_cuts_a_number_and_a_step(make):
    tok = make()
    text, steps, words = spans.example_spans(
        "Tom has 5 apples. He buys 123456 more.", "So 5 + 123456 = 123461. The answer is 123461.", PROMPT
    )
    offsets = offsets_of(tok, text)
    middle = text.index("123456") + 3  # the "4"
    cut = next(i for i, (a, b) in enumerate(offsets) if a <= middle < b)
    ids, step_tokens, word_tokens = spans.encode(tok, text, steps, words, max_length=cut)
    assert len(ids) == cut
    assert sorted(step_tokens) == [0] and sorted(word_tokens) == [0]  # "Tom has 5 apples." and "5"

    end = text.index("more.") + len("more.")  # cut right after the second step's period
    last = next(i for i, (a, b) in enumerate(offsets) if a < end <= b)
    assert offsets[last][1] == end
    _, step_tokens, word_tokens = spans.encode(tok, text, steps, words, max_length=last + 1)
    # the second step owns "\nRationale:" too (up to the next step): without it, it is cut, so it does not count
    assert sorted(step_tokens) == [0] and sorted(word_tokens) == [0, 1]

    end = text.index("Rationale:") + len("Rationale:")  # cut right after the template: the second step is whole
    last = next(i for i, (a, b) in enumerate(offsets) if a < end <= b)
    assert offsets[last][1] == end
    _, step_tokens, word_tokens = spans.encode(tok, text, steps, words, max_length=last + 1)
    assert sorted(step_tokens) == [0, 1] and sorted(word_tokens) == [0, 1]
    assert sorted(i for group in step_tokens.values() for i in group) == list(range(last + 1))


def test_slow_tokenizer_is_rejected_before_use():
    class SlowTokenizer:
        is_fast = False

        def __call__(self, *args, **kwargs):
            raise AssertionError("a slow tokenizer must not be called")

    for tok in [SlowTokenizer(), object()]:
        with pytest.raises(ValueError, match="fast"):
            spans.encode(tok, "Tom has 5.", [(0, 10)], [(8, 9)])


# ---------------------------------------------------------------- brute-force oracles (random texts)

PIECES = [
    "Tom",
    "has",
    "apples",
    "area",
    "Area",
    "wooded",
    "÷",
    "’s",
    "é",
    "😀",
    "=",
    "+",
    "(a)",
    "$5",
    "25%",
]
SEPS = [" ", " ", " ", "  ", "\n", ", ", " . "]
ENDS = [".", ".", "?", "!", "", "..."]


def random_number(rng):
    n = str(rng.randint(0, 9999))
    return rng.choice([n, n + "." + str(rng.randint(0, 99)), f"{rng.randint(1, 99)},{rng.randint(0, 999):03d}"])


def random_segment(rng):
    sentences = []
    for _ in range(rng.randint(1, 4)):
        words = [rng.choice(PIECES) if rng.random() < 0.6 else random_number(rng) for _ in range(rng.randint(1, 6))]
        sentence = "".join(w + rng.choice(SEPS) for w in words[:-1]) + words[-1] + rng.choice(ENDS)
        sentences.append(sentence)
    return rng.choice(["", " "]) + rng.choice([" ", "  ", "\n"]).join(sentences) + rng.choice(["", " ", "\n"])


def oracle_steps(segment, delimiters):
    """Walk the characters; close a step at a delimiter followed by whitespace or the end."""
    found, start = [], 0
    for i, ch in enumerate(segment):
        closes = ch in delimiters and (i + 1 == len(segment) or segment[i + 1].isspace())
        if closes or i + 1 == len(segment):
            chars = [c for c in range(start, i + 1) if not segment[c].isspace()]
            if chars:
                found.append((chars[0], chars[-1] + 1))
            start = i + 1
    return found


def oracle_numbers(text):
    """Scan digits by hand: digits, then ",ddd" groups, then an optional ".d+"."""
    found, i = [], 0
    while i < len(text):
        if text[i] not in "0123456789":
            i += 1
            continue
        j = i
        while j < len(text) and text[j] in "0123456789":
            j += 1
        while (
            text[j : j + 1] == ","
            and len(text[j + 1 : j + 4]) == 3
            and all(c in "0123456789" for c in text[j + 1 : j + 4])
        ):
            j += 4
        if text[j : j + 1] == "." and text[j + 1 : j + 2] in list("0123456789"):
            j += 1
            while j < len(text) and text[j] in "0123456789":
                j += 1
        found.append((i, j))
        i = j
    return found


def oracle_word_groups(text, offsets, special, found):
    """Per character: which word owns it, which tokens touch it, which characters are kept."""
    owner = {c: k for k, (s, e) in enumerate(found) for c in range(s, e)}
    groups = {k: [] for k in range(len(found))}
    covered = set()
    for t, ((a, b), is_special) in enumerate(zip(offsets, special, strict=True)):
        if is_special:
            assert a == b
            continue
        covered |= set(range(a, b))
        for k in sorted({owner[c] for c in range(a, b) if c in owner}):
            groups[k].append(t)
    whole = {k for k, (s, e) in enumerate(found) if all(c in covered or text[c].isspace() for c in range(s, e))}
    return {k: g for k, g in groups.items() if g and k in whole}


def oracle_step_groups(text, offsets, special, steps):
    """Eq. 2 by walking the characters: a new step begins at each step's first character (the first step at
    character 0, the last running to the end); a token joins the step of its first non-space character (of its
    start if it has none; special tokens: of the end of the text before them); a step counts if every
    non-space character it owns lies in a non-special token."""
    if not steps:
        return {}
    owner, k = [], 0
    for c in range(len(text) + 1):  # position len(text): after the last character, still the last step
        if k + 1 < len(steps) and c == steps[k + 1][0]:
            k += 1
        owner.append(k)
    groups = {k: [] for k in range(len(steps))}
    covered, seen = set(), 0
    for t, ((a, b), is_special) in enumerate(zip(offsets, special, strict=True)):
        if is_special:
            assert a == b
            groups[owner[seen]].append(t)
            continue
        covered |= set(range(a, b))
        seen = b
        chars = [c for c in range(a, b) if not text[c].isspace()] or [a]
        groups[owner[chars[0]]].append(t)
    cut = {owner[c] for c in range(len(text)) if c not in covered and not text[c].isspace()}
    return {k: g for k, g in groups.items() if g and k not in cut}


def test_step_spans_match_character_oracle():
    rng = random.Random(0)
    for _ in range(300):
        segment = random_segment(rng)
        for delimiters in [".", ".?!"]:
            assert spans.step_spans(segment, 7, delimiters) == [
                (s + 7, e + 7) for s, e in oracle_steps(segment, delimiters)
            ]


def test_number_spans_match_scanner():
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("0123456789,. a$%") for _ in range(rng.randint(0, 25)))
        assert spans.number_spans(text) == oracle_numbers(text), text


def test_keyword_spans_match_scan():
    rng = random.Random(2)
    vocab = ["area", "Area", "wooded", "areas", "sub", "tree", "TREE", "x", "a"]
    for _ in range(300):
        text = " ".join(rng.choice(vocab) + rng.choice(["", "", ".", ","]) for _ in range(rng.randint(0, 10)))
        keywords = rng.sample(["area", "wooded area", "tree", "a", "sub", "area sub"], rng.randint(0, 3))
        matches = []
        for kw in keywords:
            for i in range(len(text) - len(kw) + 1):
                bounded = (i == 0 or not text[i - 1].isalnum()) and (
                    i + len(kw) == len(text) or not text[i + len(kw)].isalnum()
                )
                if bounded and text[i : i + len(kw)].lower() == kw:
                    matches.append((i, i + len(kw)))
        expected = []
        for s, e in sorted(set(matches), key=lambda m: (m[0], m[0] - m[1])):
            if all(e0 <= s for _, e0 in expected):
                expected.append((s, e))
        assert spans.keyword_spans(text, keywords) == expected, (text, keywords)


def test_spaced_tokenizer_has_whitespace_tokens_bos_and_eos():
    tok = spaced_tokenizer()
    text = "Question: Tom has  5 apples.\nRationale: 5."
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"][-1] == tok.eos_token_id
    assert offsets[0] == offsets[-1] == (0, 0) and enc["special_tokens_mask"][-1] == 1
    assert {text[a:b] for a, b in offsets if b > a and text[a:b].isspace()} >= {" ", "\n"}  # whitespace-only


@pytest.mark.parametrize("make", STEP_TOKENIZERS)
def test_token_groups_match_character_oracle(make):
    rng = random.Random(3)
    tok = make()
    for _ in range(60):
        question, rationale = random_segment(rng), random_segment(rng)
        keywords = rng.choice([None, ["area", "wooded area", "Tom", "÷", "😀"]])
        prompt = rng.choice([PROMPT, "{question}\n\nRationale:", "Q:  {question}  A: "])
        text, steps, words = spans.example_spans(question, rationale, prompt, keywords)
        full = len(tok(text)["input_ids"])
        for max_length in [None, rng.randint(2, full)]:
            ids, step_tokens, word_tokens = spans.encode(tok, text, steps, words, max_length)
            enc = tok(
                text,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                truncation=max_length is not None,
                max_length=max_length,
            )
            assert ids == enc["input_ids"]
            offsets, special = enc["offset_mapping"], enc["special_tokens_mask"]
            assert step_tokens == oracle_step_groups(text, offsets, special, steps)
            assert word_tokens == oracle_word_groups(text, offsets, special, words)
            if max_length is None:  # every step and word counts; every token is in exactly one step
                assert sorted(step_tokens) == list(range(len(steps)))
                assert sorted(word_tokens) == list(range(len(words)))
                assert sorted(t for group in step_tokens.values() for t in group) == list(range(len(ids)))
            else:  # the steps that count are the first ones, each whole: a prefix of the tokens
                kept = [t for k in sorted(step_tokens) for t in step_tokens[k]]
                assert sorted(step_tokens) == list(range(len(step_tokens))) and kept == list(range(len(kept)))


# ---------------------------------------------------------------- the teacher cache records the step rule


def test_teacher_cache_built_with_untiled_steps_is_refused(tmp_path, monkeypatch):
    args = flags.parse_args(["--data", "builtin", "--teacher", "t", "--out", str(tmp_path), "--n-train", "3"])
    examples = problems.make_problems(3, seed=0)
    built = []
    monkeypatch.setattr(teacher, "build_attention_cache", lambda model, tok, ex, meta, *a: built.append(meta) or {
        "meta": meta, "items": {}})
    train.attention_cache(args, examples, lambda: (None, None))
    assert built and built[0]["steps"] == "tiled"
    old = {k: v for k, v in built[0].items() if k != "steps"}  # a cache whose steps do not tile the text
    files.save_atomic({"meta": old, "items": {}}, tmp_path / "teacher_cache.pt")
    with pytest.raises(ValueError, match=r"differs in: steps\)"):
        train.attention_cache(args, examples, lambda: (None, None))
