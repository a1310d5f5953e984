"""AUTOMATIC1111's prompt weights, read into (text, weight) pieces: `(word:1.3)`, `(word)`, `[word]`, `\\(`, `BREAK`.

The grammar is A1111's (its `parse_prompt_attention`, the syntax Civitai prompts and most front ends write):

- `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1 / 1.1, nested brackets multiply;
- `(text:1.3)` multiplies it by 1.3 (a number after the last colon, before the closing bracket);
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the characters themselves;
- `BREAK` (a word of its own, upper case) ends the current 75-token chunk: what follows starts a new one;
- a bracket left open weighs the rest of the prompt; a closing bracket that closes nothing is text.

compel, the prompt-weighting library diffusers' documentation points to, reads its own syntax (`(word)1.3`,
`word++`) and leaves A1111's as plain text (checked with compel 2.5: `(red:1.3)` is encoded as "red:1 . 3"), so
this small parser turns A1111's syntax into pieces, and compel applies the weights to the text encoder's states
(genkit.families.clip_weights). Which families take weights, and how, is the family's (`Family.prompt_weights`).

A prompt without this syntax parses to itself with weight 1 (`has_syntax` is False) and is read exactly as
before, whatever `prompt_syntax` says. `prompt_syntax="plain"` reads every prompt as plain text.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from genkit.errors import GenkitError, term

SYNTAXES = ("a1111", "plain")
DEFAULT = "a1111"
ROUND = 1.1  # A1111's weight of (text)
SQUARE = 1 / 1.1  # and of [text]
BREAK = None  # the text of a BREAK piece

_TOKEN = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash: the character itself
  | \\                    # a lone backslash (dropped, as A1111)
  | \(                    # opens a round bracket
  | \[                    # opens a square bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)": closes a round bracket with a weight
  | \)                    # closes a round bracket (x 1.1)
  | \]                    # closes a square bracket (/ 1.1)
  | [^\\()\[\]:]+         # text
  | :                     # a colon that is text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_syntax(value) -> str:
    """`value` as one of SYNTAXES (None: the default); anything else is a GenkitError naming it."""
    if value is None:
        return DEFAULT
    if not isinstance(value, str) or value.strip().lower() not in SYNTAXES:
        raise GenkitError(f"must be {' or '.join(SYNTAXES)}, got {value!r} (a1111 reads (word:1.3) weights; plain "
                          "reads brackets as text)", param="prompt_syntax")
    return value.strip().lower()


@lru_cache(maxsize=4096)
def parse(text: str) -> tuple[tuple[str | None, float], ...]:
    """The prompt as (text, weight) pieces in order, runs of one weight merged; a BREAK is (None, 0.0)."""
    pieces: list[list] = []
    rounds: list[int] = []  # where each open bracket's pieces start
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[0] is not BREAK:
                piece[1] *= factor

    for match in _TOKEN.finditer(text):
        part, weight = match.group(0), match.group(1)
        if part.startswith("\\"):
            pieces.append([part[1:], 1.0])
        elif part == "(":
            rounds.append(len(pieces))
        elif part == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            weigh(rounds.pop(), _number(weight, text))
        elif part == ")" and rounds:
            weigh(rounds.pop(), ROUND)
        elif part == "]" and squares:
            weigh(squares.pop(), SQUARE)
        else:
            for k, chunk in enumerate(_BREAK.split(part)):
                if k:
                    pieces.append([BREAK, 0.0])
                pieces.append([chunk, 1.0])
    for start in rounds:  # left open: weighs the rest
        weigh(start, ROUND)
    for start in squares:
        weigh(start, SQUARE)
    merged: list[list] = []
    for piece in pieces:
        if merged and piece[0] is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        elif piece[0] is BREAK or piece[0]:
            merged.append(piece)
    return tuple((text_, weight) for text_, weight in merged) or (("", 1.0),)


def _number(weight: str, text: str) -> float:
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise GenkitError(f"{text!r}: {weight!r} is not a weight (write (word:1.3); {term('prompt_syntax')} plain "
                          "reads brackets as text)", param="prompt")
    return value


def has_syntax(text: str) -> bool:
    """The prompt holds weights, BREAK or escapes: A1111's syntax reads it otherwise than as plain text."""
    return bool(text) and parse(text) != ((text, 1.0),)


def weighted(pieces) -> bool:
    """Some piece has a weight other than 1, or there is a BREAK."""
    return any(text is BREAK or weight != 1.0 for text, weight in pieces)


def plain(pieces) -> str:
    """The text of the pieces, without weights (a BREAK as a space)."""
    return "".join(" " if text is BREAK else text for text, _ in pieces)
