"""Index sets of Eq. 2 and Eq. 3: reasoning steps (M1 / N1) and critical words (M2 / N2), paper §3.2 and App. C.

Steps and critical words (numerals for math tasks, the teacher's keywords for CSQA) are character spans
`(start, end)` of one text, found once and shared by the teacher and the student (paper App. C.2); each model's
tokenizer then maps them to its own token indices.

    example_spans(question, rationale, prompt, keywords, delimiters) -> (text, steps, words)   Eq. 2/3, M and N
    step_tiles(steps, length) -> [(start, end)]            Eq. 2: the characters each step owns (they tile the text)
    encode(tokenizer, text, steps, words, max_length) -> (input_ids [N], {id: tokens}, {id: tokens})   App. C.2
    align(*kept) -> [id]                                   App. C.2: the ids both models keep, so one [S, W]

Choices the paper leaves open (docs/design.md, "Steps", "Critical words", "Tokens and identical shape"):
- numerals use ASCII digits only (`[0-9]` for `\\d`);
- a keyword matches case-insensitively where no letter, digit or "_" touches either end, and any run of
  whitespace matches a space inside a multi-word keyword; when matches of two keywords overlap, the
  earlier-starting one is kept, then the longer one;
- a step is found as a sentence, but owns every character from its start to the next step's start (the first from
  character 0, the last to the end of the text), so every token, the template's, BOS and whitespace-only ones
  included, is in exactly one step (Eq. 2: M1 covers tokens 0 .. M-1);
- a step or word counts for a model only if every non-space character of it (of its tile, for a step) lies
  inside a kept (non-special, non-truncated) token and it got at least one token.
"""

import bisect
import re

NUMBER = re.compile(r"[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")


def step_spans(segment: str, offset: int = 0, delimiters: str = ".") -> list[tuple[int, int]]:
    """Sentences of `segment`, whitespace-stripped, shifted by `offset`; a delimiter ends a step only
    when followed by whitespace or the end of the segment (so "3.5" never splits)."""
    if not delimiters:
        raise ValueError("delimiters must name at least one character")
    ends = [m.end() for m in re.finditer(f"[{re.escape(delimiters)}](?=\\s|\\Z)", segment)]
    spans = []
    for a, b in zip([0] + ends, ends + [len(segment)], strict=True):
        piece = segment[a:b]
        if piece.strip():
            s = a + len(piece) - len(piece.lstrip())
            e = a + len(piece.rstrip())
            spans.append((offset + s, offset + e))
    return spans


def number_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Every numeral in text[start:end] ("1,000" and "3.5" are one word; "42." gives "42")."""
    end = len(text) if end is None else end
    return [m.span() for m in NUMBER.finditer(text, start, end)]


def keyword_spans(text: str, keywords: list[str], start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Every word-bounded, case-insensitive occurrence of each keyword in text[start:end], in text order;
    of overlapping matches the earlier-starting, then the longer one is kept."""
    end = len(text) if end is None else end
    found = []
    for keyword in keywords:
        if keyword.strip():
            body = r"\s+".join(re.escape(w) for w in keyword.split())
            pattern = re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)
            found += [m.span() for m in pattern.finditer(text, start, end)]
    spans = []
    for s, e in sorted(found, key=lambda span: (span[0], span[0] - span[1])):
        if not spans or s >= spans[-1][1]:
            spans.append((s, e))
    return spans


def example_spans(
    question: str, rationale: str, prompt: str, keywords: list[str] | None = None, delimiters: str = "."
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """text = prompt.format(question=question) + " " + rationale (docs/design.md, "Text layout"), its steps (question's
    sentences, then the rationale's; each owns the text up to the next one, template words included: `step_tiles`)
    and its critical words (numbers, or `keywords` when given), found only in the question and the rationale, never
    in the template."""
    if prompt.count("{question}") != 1:
        raise ValueError(f"prompt must contain '{{question}}' exactly once: {prompt!r}")
    q0 = len(prompt[: prompt.index("{question}")].format())
    head = prompt.format(question=question)
    text = head + " " + rationale
    segments = [(q0, q0 + len(question)), (len(head) + 1, len(text))]
    steps = [span for a, b in segments for span in step_spans(text[a:b], a, delimiters)]
    if keywords is None:
        words = [span for a, b in segments for span in number_spans(text, a, b)]
    else:
        words = [span for a, b in segments for span in keyword_spans(text, keywords, a, b)]
    return text, steps, words


def step_tiles(steps: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The characters `(start, end)` each step owns in a text of `length` characters: step k runs from its start
    to the next step's start, the first from 0 and the last to `length` (Eq. 2: M1 covers every token).
    `steps` are in text order, as `example_spans` gives them."""
    if not steps:
        return []
    starts = [s for s, _ in steps]
    if starts[0] < 0 or any(b <= a for a, b in zip(starts, starts[1:] + [length], strict=True)):
        raise ValueError(f"steps must start in increasing order, from 0 and before {length}: {steps}")
    return list(zip([0] + starts[1:], starts[1:] + [length], strict=True))


def token_groups(
    text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]], by: str
) -> dict[int, list[int]]:
    """Span id -> token indices, for the spans that count.

    by="word": tokens whose character interval overlaps the span (byte-level BPE may give several tokens the
    same offsets); tokens with empty offsets (special) belong to no word.
    by="step": `spans` are all the steps in text order; step k owns `step_tiles(spans, len(text))[k]` and every
    token is in the step that owns its anchor: its first non-space character, the start of a whitespace-only
    token, and for a token with empty offsets (BOS, a special token) the end of the token before it (0 first).
    A span counts if it got a token and every non-space character of it (of its tile, for a step) lies in a
    token with non-empty offsets (so a step or word cut by truncation does not count)."""
    if by not in ("word", "step"):
        raise ValueError(f"by must be 'word' or 'step', got {by!r}")
    if any(b > len(text) for _, b in offsets):
        raise ValueError("offsets reach past the end of text: were they computed on another text?")
    kept = [(i, a, b) for i, (a, b) in enumerate(offsets) if b > a]
    covered = [False] * len(text)
    for _, a, b in kept:
        covered[a:b] = [True] * (b - a)
    if by == "word":
        regions = spans
        members = [[i for i, a, b in kept if a < e and s < b] for s, e in spans]
    else:
        regions = step_tiles(spans, len(text))
        starts = [s for s, _ in regions[1:]]
        members = [[] for _ in regions]
        if regions:
            for i, c in enumerate(_anchors(text, offsets)):
                members[bisect.bisect_right(starts, c)].append(i)
    groups = {}
    for k, (s, e) in enumerate(regions):
        whole = all(covered[c] or text[c].isspace() for c in range(s, e))
        if members[k] and whole:
            groups[k] = members[k]
    return groups


def _anchors(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """The character that places each token in a step: its first non-space character, else (whitespace only)
    its start; for empty offsets, the end of the last token before it with non-empty offsets, or 0."""
    out, end = [], 0
    for a, b in offsets:
        if b > a:
            first = next((c for c in range(a, b) if not text[c].isspace()), a)
            out.append(first)
            end = b
        else:
            out.append(end)
    return out


def align(*kept: dict[int, list[int]]) -> list[int]:
    """The span ids present in every dict, in text order (teacher and student keep the same steps/words)."""
    if not kept:
        raise ValueError("align needs at least one dict of kept spans")
    return sorted(set(kept[0]).intersection(*kept[1:]))


def encode(
    tokenizer,
    text: str,
    steps: list[tuple[int, int]],
    words: list[tuple[int, int]],
    max_length: int | None = None,
) -> tuple[list[int], dict[int, list[int]], dict[int, list[int]]]:
    """Tokenize `text` (specials added, truncated to `max_length` when given) and map steps and words to
    this tokenizer's token indices: (input_ids, step_tokens, word_tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: offset_mapping is needed")
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=True,
    )
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return (
        enc["input_ids"],
        token_groups(text, offsets, steps, "step"),
        token_groups(text, offsets, words, "word"),
    )
