"""spans.py against hand-written spans and per-character brute-force oracles."""

import random

import pytest
from tiny_tokenizers import bytelevel_tokenizer, metaspace_tokenizer

import spans

PROMPT = "Question: {question}\nRationale:"
TOKENIZERS = [bytelevel_tokenizer, metaspace_tokenizer]


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


def test_template_belongs_to_no_step():
    prompt = "Step 1 of 2. Question: {question}\nRationale 3:"
    text, steps, words = spans.example_spans("Ann has 4 pens. She loses 1.", "4 - 1 = 3. The answer is 3.", prompt)
    assert text == "Step 1 of 2. Question: Ann has 4 pens. She loses 1.\nRationale 3: 4 - 1 = 3. The answer is 3."
    assert steps == [(23, 38), (39, 51), (65, 75), (76, 92)]
    assert texts(text, words) == ["4", "1", "4", "1", "3", "3"]  # the template's 1, 2, 3 are not words
    assert words[0] == (31, 32)
    template = {c for c in range(len(text)) if not any(s <= c < e for s, e in steps)}
    for make in TOKENIZERS:
        tok = make()
        offsets = offsets_of(tok, text)
        step_tokens = spans.token_groups(text, offsets, steps, "step")
        in_steps = {i for group in step_tokens.values() for i in group}
        first_of = {
            i: next((c for c in range(a, b) if not text[c].isspace()), None) for i, (a, b) in enumerate(offsets)
        }
        for i, c in first_of.items():
            if c is not None and c in template:
                assert i not in in_steps


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
    assert spans.token_groups(text, [(0, 0), (0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (0, 0)], steps, "step") == {
        0: [1, 2],
        1: [4, 5],
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


def test_token_groups_errors():
    with pytest.raises(ValueError):
        spans.token_groups("ab", [(0, 2)], [(0, 2)], "token")
    with pytest.raises(ValueError):
        spans.token_groups("ab", [(0, 3)], [(0, 2)], "word")


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


def test_bos_has_empty_offsets_and_no_group():
    tok = metaspace_tokenizer()
    text, steps, words = spans.example_spans("Tom has 5 pens.", "He has 5.", PROMPT)
    ids, step_tokens, word_tokens = spans.encode(tok, text, steps, words)
    offsets = offsets_of(tok, text)
    assert ids[0] == tok.bos_token_id and offsets[0] == (0, 0)
    assert all(0 not in group for group in [*step_tokens.values(), *word_tokens.values()])
    assert sorted(step_tokens) == [0, 1] and sorted(word_tokens) == [0, 1]
    # "Tom" is the first step's first token after "Question:" (template)
    first = min(step_tokens[0])
    assert text[offsets[first][0] : offsets[first][1]].strip().startswith("T")


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
    assert sorted(step_tokens) == [0, 1] and sorted(word_tokens) == [0, 1]


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


def oracle_groups(text, offsets, special, found, by):
    """Per character: which span owns it, which tokens touch it, which characters are kept."""
    owner = {c: k for k, (s, e) in enumerate(found) for c in range(s, e)}
    groups = {k: [] for k in range(len(found))}
    covered = set()
    for t, ((a, b), is_special) in enumerate(zip(offsets, special, strict=True)):
        if is_special:
            assert a == b
            continue
        covered |= set(range(a, b))
        if by == "step":
            chars = [c for c in range(a, b) if not text[c].isspace()][:1]
        else:
            chars = list(range(a, b))
        for k in sorted({owner[c] for c in chars if c in owner}):
            groups[k].append(t)
    whole = {k for k, (s, e) in enumerate(found) if all(c in covered or text[c].isspace() for c in range(s, e))}
    return {k: g for k, g in groups.items() if g and k in whole}


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


@pytest.mark.parametrize("make", TOKENIZERS)
def test_token_groups_match_character_oracle(make):
    rng = random.Random(3)
    tok = make()
    for _ in range(60):
        question, rationale = random_segment(rng), random_segment(rng)
        keywords = rng.choice([None, ["area", "wooded area", "Tom", "÷", "😀"]])
        text, steps, words = spans.example_spans(question, rationale, PROMPT, keywords)
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
            assert step_tokens == oracle_groups(text, offsets, special, steps, "step")
            assert word_tokens == oracle_groups(text, offsets, special, words, "word")
            if max_length is None:
                assert sorted(step_tokens) == list(range(len(steps)))
                assert sorted(word_tokens) == list(range(len(words)))
