"""Counterfactual data augmentation by swapping gendered words (Zhao et al. 2018, "Gender Bias
in Coreference Resolution"; Lu et al. 2020, "Gender Bias in Neural NLP"): each training row that
mentions a gendered word gets a copy with the words swapped (he <-> she, king <-> queen ...);
the label stays the same.

Pronouns are handled here (a closed class); other words come from a configurable list of pairs
(``conf/transform/gender_swap.yaml``). Words are swapped whole (``manager``, ``shepherd``,
``he2`` are left alone; ``woman's`` -> ``man's``), keeping their case (He -> She, HE -> SHE).

``her`` is possessive (-> ``his``) or an object (-> ``him``); ``his`` is possessive (-> ``her``)
or stands alone (-> ``hers``: "the book is his"). With no tagger, a small rule reads the next
word: a noun-, adjective- or number-like word means possessive ("her 50s"); the end of the
text, punctuation (opening quotes aside) or a closed-class word (preposition, determiner,
pronoun, conjunction, auxiliary, a common adverb, a verb such as "be"/"go"/"feel") means object
/ standing alone. An ``-ly`` adverb counts as possessive only when a noun-like word follows it
("her oddly charming film" vs "kissed her passionately."); "his or her" reads as possessive.
Its limits: double objects without a determiner ("gave her flowers" -> "gave his flowers"),
verbs the list lacks ("made her smile" -> "his smile"), proper nouns ("told her John left" ->
"his John"), an adjective after an object ("found her dead" -> "his dead") and an adverb before
one ("found her utterly charming" -> "his utterly") come out wrong. Names (``swap_names``) are
swapped only when capitalised in the text.
"""

from __future__ import annotations

import re
from typing import Any

from ftlab.data.transforms.base import Applied, Rows, rowwise
from ftlab.errors import FtlabError

#: pronouns with one counterpart; ``her`` and ``his`` depend on the next word (see above)
PRONOUNS = {"he": "she", "she": "he", "him": "her", "hers": "his", "himself": "herself",
            "herself": "himself"}
AMBIGUOUS = {"her": ("his", "him"), "his": ("her", "hers")}  # (possessive, other)

#: words after which her/his is an object / stands alone (not possessive)
FUNCTION_WORDS = frozenset("""
about above across after against along among around as at before behind below beneath beside
besides between beyond by despite down during except for from in inside into like near of off
on onto out outside over past since through throughout till to toward towards under underneath
until unto up upon with within without via per back away again
a an the this that these those some any every each no all both either neither another such what
which whose my your his her its our their
i you he she it we they me him us them myself yourself himself herself itself ourselves
themselves someone something anyone anything everyone everything nobody nothing
and or but nor so yet because if when whenever while whereas although though unless than
whether where why how who whom
am is are was were be been being do does did have has had having will would shall should can
could may might must
also always here there now then today tonight tomorrow yesterday too well enough once twice
home anymore anyway ever never not just still already even
go feel know come become think get see leave understand believe realize realise seem die appear
""".split())
#: words ending in -ly that are adjectives or nouns, not adverbs ("her lovely voice")
LY_NOT_ADVERBS = frozenset("""
lovely lonely only friendly early elderly ugly silly holy family daily weekly monthly yearly
curly lively costly deadly jolly lily ally belly bully homely likely unlikely kindly manly
womanly motherly fatherly sisterly brotherly cuddly bubbly chilly smelly surly burly comely
ghastly ghostly godly heavenly leisurely lowly orderly saintly scholarly sickly stately timely
unruly wily worldly jelly rally reply supply assembly anomaly melancholy monopoly folly
butterfly july italy
""".split())
_WORD = re.compile(r"(\w+)")
#: opening quotes between her/his and the next word do not end the phrase (her "madness")
QUOTES = "\"'\u201c\u2018"


def _noun_like(word: str | None, gap: str) -> bool:
    """A word that can follow a possessive: not the end, not after punctuation (opening
    quotes and a hyphen, "beyond-her-years", aside), not a closed-class word."""
    if word is None or (gap.strip().strip(QUOTES) and gap != "-") or not _WORD.fullmatch(word):
        return False
    return word.lower() not in FUNCTION_WORDS


def _possessive(after: list[tuple[str | None, str]]) -> bool:
    """Is her/his possessive, given the next two words and the text before each?"""
    (word, gap), (word2, gap2) = after
    if not _noun_like(word, gap):
        # "his or her own": a coordinated possessive
        return (word is not None and word.lower() in ("and", "or") and not gap.strip()
                and word2 is not None and word2.lower() in AMBIGUOUS and not gap2.strip())
    w = word.lower()
    if w.endswith("ly") and len(w) > 3 and w not in LY_NOT_ADVERBS:
        # an adverb: of a following adjective ("her oddly charming film") or of the verb
        # ("kissed her passionately.")
        return _noun_like(word2, gap2)
    return True


def _case_like(source: str, word: str) -> str:
    if len(source) > 1 and source.isupper():
        return word.upper()
    return word[:1].upper() + word[1:] if source[:1].isupper() else word


def _pair_map(pairs: list[list[str]], what: str) -> dict[str, str]:
    """Both directions of ``[[male, female], ...]``, lower-cased; a word in two pairs (or a
    pronoun, which the code swaps itself) is refused."""
    out: dict[str, str] = {}
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(w, str) and _WORD.fullmatch(w) for w in pair)):
            raise FtlabError(f"gender_swap {what} entry {pair!r} is not a pair of words.",
                             "write each entry as [male, female], e.g. [king, queen].")
        a, b = (w.lower() for w in pair)
        for src, dst in ((a, b), (b, a)):
            if src in PRONOUNS or src in AMBIGUOUS:
                raise FtlabError(f"gender_swap {what} lists the pronoun '{src}'.",
                                 "remove it: pronouns are swapped by the code (with the her -> "
                                 "his/him rule).")
            if out.get(src, dst) != dst:
                raise FtlabError(f"gender_swap {what}: '{src}' is in two pairs (-> '{out[src]}' "
                                 f"and -> '{dst}').", "keep one pair per word.")
            out[src] = dst
    return out


class GenderSwap:
    """Swap gendered words in the training rows' text columns.

    Args:
        pairs: ``[[male, female], ...]`` word pairs, swapped both ways (besides the pronouns).
        names: ``[[male, female], ...]`` first-name pairs, used with ``swap_names``.
        swap_names: swap first names too (only capitalised occurrences).
        mode: ``add`` (a swapped copy of each row that changed) or ``replace`` (rewrite them).
        columns: the columns to swap; null: the task's text columns (both of a pair).
    """

    name = "gender_swap"

    def __init__(self, pairs: list[list[str]] | None = None, names: list[list[str]] | None = None,
                 swap_names: bool = False, mode: str = "add",
                 columns: list[str] | None = None) -> None:
        self.words = _pair_map(pairs or [], "pairs")
        self.names = _pair_map(names or [], "names") if swap_names else {}
        self.mode, self.columns, self.swap_names = mode, columns, swap_names

    def __call__(self, rows: Rows) -> Applied:
        columns = list(self.columns or rows.text_columns)
        missing = [c for c in columns if c not in rows.train.column_names]
        if missing:
            raise FtlabError(f"gender_swap columns {missing} are not in the training data "
                             f"(columns: {rows.train.column_names}).",
                             "set the transform's columns to text columns, or null for the "
                             "task's text columns.")

        def rewrite(row: dict[str, Any]) -> dict[str, Any] | None:
            new = {c: self.swap_value(row[c]) for c in columns}
            changed = {c: v for c, v in new.items() if v != row[c]}
            return changed or None

        applied = rowwise(rows.train, rewrite, self.mode)
        applied.info = {"mode": self.mode, "columns": columns, "swap_names": self.swap_names}
        return applied

    def swap_value(self, value: Any) -> Any:
        """A string or a list of words (token classification) swapped; anything else as is."""
        if isinstance(value, str):
            return self.swap_text(value)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return self.swap_words(value)
        return value

    def swap_text(self, text: str) -> str:
        pieces = _WORD.split(text)  # [gap, word, gap, word, ..., gap]
        words, gaps = pieces[1::2], pieces[2::2]
        pieces[1::2] = self._swap(words, gaps)
        return "".join(pieces)

    def swap_words(self, words: list[str]) -> list[str]:
        """One word per item (a word list keeps its length: token labels stay aligned)."""
        return self._swap(words, [" "] * len(words))

    def _swap(self, words: list[str], gaps: list[str]) -> list[str]:
        """``gaps[i]``: the text between ``words[i]`` and ``words[i + 1]``."""
        def at(j: int) -> tuple[str | None, str]:
            return (words[j], gaps[j - 1]) if j < len(words) else (None, "")

        return [self._swap_word(w, [at(i + 1), at(i + 2)]) for i, w in enumerate(words)]

    def _swap_word(self, word: str, after: list[tuple[str | None, str]]) -> str:
        low = word.lower()
        if low in AMBIGUOUS:
            possessive, other = AMBIGUOUS[low]
            return _case_like(word, possessive if _possessive(after) else other)
        if word[:1].isupper() and low in self.names:
            return _case_like(word, self.names[low])
        swapped = PRONOUNS.get(low) or self.words.get(low)
        return word if swapped is None else _case_like(word, swapped)
