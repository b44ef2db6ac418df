"""Text augmentation (data.augment.text): EDA operations and back-translation.

EDA (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on
Text Classification Tasks") changes a text by one of four operations: synonym
replacement, random insertion (of a synonym of a word of the text), random swap and
random deletion. Back-translation paraphrases a text through two local translation
models (source -> pivot -> source, greedy).

Each augmented copy is made by ONE technique, drawn among those enabled, as in EDA (one
operation per augmented sentence). Everything random comes from a numpy Generator seeded
by (train.seed, source, row, copy): a row's copies do not depend on which other rows are
prepared with it, on batch boundaries or on data.num_proc.

Words are whitespace-separated tokens. Punctuation stays where it is: a replaced or
swapped word keeps its token's leading and trailing punctuation ("dog," -> "hound,"), a
deleted word's trailing punctuation moves to the word before it ("sat." deleted from
"the cat sat." gives "the cat."), and the whitespace between words (newlines included)
is kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigft.config import TextAugmentConfig
from bigft.data.back_translate import BackTranslator
from bigft.errors import ConfigError

KEY = "data.augment.text"
EDA_OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")
WORDNET_HELP = (
    f"{KEY}.synonyms 'wordnet' needs the nltk package and its WordNet corpus: "
    "pip install 'bigft[nlp]', then python -m nltk.downloader wordnet"
)
# EDA's stop words (a short English list), never replaced by or given WordNet synonyms:
# WordNet has "synonyms" for "a", "in", "it" that only add noise. A user's synonyms file
# is taken as written.
_STOP_WORDS = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his "
    "himself she her hers herself it its itself they them their theirs themselves what "
    "which who whom this that these those am is are was were be been being have has had "
    "having do does did doing a an the and but if or because as until while of at by for "
    "with about against between into through during before after above below to from up "
    "down in out on off over under again further then once here there when where why how "
    "all any both each few more most other some such no nor not only own same so than too "
    "very s t can will just don should now"
)
STOP_WORDS = frozenset(_STOP_WORDS.split())
_TOKEN = re.compile(r"(\S+)(\s*)")
_PARTS = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass
class _Token:
    pre: str  # leading punctuation
    core: str  # the word ("" for a token of punctuation only)
    post: str  # trailing punctuation
    sep: str  # whitespace after the token


def _split(text: str) -> tuple[str, list[_Token]]:
    """(leading whitespace, tokens) of `text`; `_join` puts them back together exactly."""
    lead = text[: len(text) - len(text.lstrip())]
    tokens = []
    for match in _TOKEN.finditer(text, len(lead)):
        parts = _PARTS.match(match[1])
        assert parts is not None  # the pattern matches any string
        tokens.append(_Token(parts[1], parts[2], parts[3], match[2]))
    return lead, tokens


def _join(lead: str, tokens: Sequence[_Token]) -> str:
    return lead + "".join(t.pre + t.core + t.post + t.sep for t in tokens)


def _words(tokens: Sequence[_Token]) -> list[int]:
    return [i for i, t in enumerate(tokens) if t.core]


def _count(rate: float, words: int) -> int:
    """How many words a share `rate` of `words` is: rounded, at least one when on."""
    return max(1, round(rate * words)) if rate > 0 and words else 0


def _match_case(like: str, word: str) -> str:
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def synonym_replacement(
    text: str, rate: float, synonyms: Synonyms, rng: np.random.Generator
) -> str:
    """Replace round(rate * words) words (at least one), picked at random among those with
    a synonym, each by a random synonym of it (case matched, punctuation kept)."""
    lead, tokens = _split(text)
    candidates = [i for i in _words(tokens) if synonyms.of(tokens[i].core)]
    for k in rng.permutation(len(candidates))[: _count(rate, len(_words(tokens)))]:
        token = tokens[candidates[k]]
        options = synonyms.of(token.core)
        token.core = _match_case(token.core, options[rng.integers(len(options))])
    return _join(lead, tokens)


def random_insertion(text: str, rate: float, synonyms: Synonyms, rng: np.random.Generator) -> str:
    """Insert round(rate * words) words (at least one): each a random synonym of a random
    word of the text that has one, placed before a random word (never after the last, so
    the closing punctuation stays last)."""
    lead, tokens = _split(text)
    for _ in range(_count(rate, len(_words(tokens)))):
        candidates = [i for i in _words(tokens) if synonyms.of(tokens[i].core)]
        if not candidates:
            break
        options = synonyms.of(tokens[candidates[rng.integers(len(candidates))]].core)
        word = options[rng.integers(len(options))]
        tokens.insert(int(rng.integers(len(tokens))), _Token("", word, "", " "))
    return _join(lead, tokens)


def random_swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swap two random words, round(rate * words) times (at least once); punctuation and
    whitespace stay in place. A text of fewer than two words is returned as it is."""
    lead, tokens = _split(text)
    words = _words(tokens)
    if len(words) < 2:
        return text
    for _ in range(_count(rate, len(words))):
        a = int(rng.integers(len(words)))
        b = int(rng.integers(len(words) - 1))
        b += b >= a  # another position than a
        i, j = words[a], words[b]
        tokens[i].core, tokens[j].core = tokens[j].core, tokens[i].core
    return _join(lead, tokens)


def random_deletion(text: str, p: float, rng: np.random.Generator) -> str:
    """Delete each word with probability `p`, never every word (one random word stays);
    a deleted word's trailing punctuation moves to the kept token before it, and a newline
    after it is kept. A text of one word is returned as it is."""
    lead, tokens = _split(text)
    words = _words(tokens)
    if len(words) < 2 or p <= 0:
        return text
    delete = rng.random(len(words)) < p
    if delete.all():
        delete[rng.integers(len(words))] = False
    gone = {words[k] for k in np.flatnonzero(delete)}
    kept: list[_Token] = []
    run: list[_Token] = []  # the deleted tokens since the last kept one
    for i, token in enumerate([*tokens, _Token("", "", "", "")]):  # a sentinel ends the text
        if i in gone:
            run.append(token)
            continue
        if kept and run:
            before = kept[-1]
            # The run's last punctuation closes what the kept word now ends ("cat sat,
            # down." less "sat, down." is "cat."); the most newlines between the two kept
            # words stay; at the end of the text its trailing whitespace stays.
            marks = [t.post for t in run if t.post]
            if marks and not before.post:
                before.post = marks[-1]
            seps = [before.sep, *(t.sep for t in run)]
            before.sep = seps[-1] if i == len(tokens) else max(seps, key=lambda s: s.count("\n"))
        run = []
        kept.append(token)
    return _join(lead, kept[:-1])


class Synonyms:
    """Word -> synonyms, from a table (a user's file) or a lookup function (WordNet),
    case-insensitive; a word is never its own synonym."""

    def __init__(
        self,
        table: Mapping[str, Sequence[str]] | None = None,
        lookup: Callable[[str], list[str]] | None = None,
        stop_words: frozenset[str] = frozenset(),
    ) -> None:
        self.lookup = lookup
        self.stop_words = stop_words
        self.table: dict[str, list[str]] = {}
        for word, options in (table or {}).items():
            self._add(word, options)

    def _add(self, word: str, options: Sequence[str]) -> None:
        key = word.strip().lower()
        known = self.table.setdefault(key, [])
        for option in options:
            option = option.strip()
            if option and option.lower() != key and option not in known:
                known.append(option)

    def of(self, word: str) -> list[str]:
        key = word.lower()
        if key in self.stop_words:
            return []
        if key not in self.table and self.lookup is not None:
            self.table[key] = [s for s in self.lookup(key) if s.lower() not in self.stop_words]
        return self.table.get(key, [])


def load_synonyms(spec: str) -> Synonyms:
    """data.augment.text.synonyms: 'wordnet', a .json file {word: [synonym, ...]}, or a
    text file with one group of interchangeable words per line (comma-separated, or
    whitespace-separated when the line has no comma; lines starting with # are comments)."""
    if spec == "wordnet":
        return _wordnet()
    path = Path(spec)
    where = f"{KEY}.synonyms: {spec}"
    if not path.is_file():
        raise ConfigError(f"{where}: synonyms file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot be read as UTF-8 text ({exc})") from None
    synonyms = Synonyms()
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        ok = isinstance(table, dict) and all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in table.values()
        )
        if not ok:
            raise ConfigError(f'{where}: write a JSON object {{"word": ["synonym", ...]}}')
        for word, options in table.items():
            synonyms._add(word, options)
    else:
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            group = [w.strip() for w in (line.split(",") if "," in line else line.split())]
            for word in group:
                synonyms._add(word, group)
    if not any(synonyms.table.values()):
        raise ConfigError(f"{where}: lists no synonyms")
    return synonyms


def _wordnet() -> Synonyms:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()  # LookupError when the corpus is not downloaded
    except (ImportError, LookupError):
        raise ConfigError(WORDNET_HELP) from None

    def lookup(word: str) -> list[str]:
        found = [name for synset in wordnet.synsets(word) for name in _lemmas(synset)]
        return list(dict.fromkeys(n for n in found if n.lower() != word))

    return Synonyms(lookup=lookup, stop_words=STOP_WORDS)


def _lemmas(synset: Any) -> list[str]:
    return [str(lemma.name()).replace("_", " ") for lemma in synset.lemmas()]


class TextAugmenter:
    """The augmented copies of rows' texts (data.augment.text), for train.seed.

    Made before any data is read, so that a missing synonyms file, package or model is
    said at once."""

    def __init__(self, cfg: TextAugmentConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.techniques = [op for op in EDA_OPERATIONS if getattr(cfg, op) > 0]
        if cfg.back_translation is not None:
            self.techniques.append("back_translation")
        needs_synonyms = cfg.synonym_replacement > 0 or cfg.random_insertion > 0
        self.synonyms = load_synonyms(cfg.synonyms) if needs_synonyms and cfg.synonyms else None
        bt = cfg.back_translation
        self.translator = BackTranslator(bt) if bt is not None else None

    def _draw(self, key: tuple[int, int], copy: int) -> tuple[str, np.random.Generator]:
        """The technique of one copy and the generator that makes it."""
        rng = np.random.default_rng([self.seed, key[0], key[1], copy])
        return self.techniques[int(rng.integers(len(self.techniques)))], rng

    def _apply(self, technique: str, text: str, rng: np.random.Generator) -> str:
        cfg = self.cfg
        if not text.strip():
            return text
        if technique == "synonym_replacement":
            assert self.synonyms is not None
            return synonym_replacement(text, cfg.synonym_replacement, self.synonyms, rng)
        if technique == "random_insertion":
            assert self.synonyms is not None
            return random_insertion(text, cfg.random_insertion, self.synonyms, rng)
        if technique == "random_swap":
            return random_swap(text, cfg.random_swap, rng)
        return random_deletion(text, cfg.random_deletion, rng)

    def augment(
        self, rows: Sequence[Sequence[str]], keys: Sequence[tuple[int, int]]
    ) -> list[list[tuple[str, list[str]]]]:
        """For each row (its texts) and key ((source, row index in it)), its copies as
        (technique, texts). A copy equal to the row or to an earlier copy is left out; a
        technique that blanks a text leaves that text as it was."""
        paraphrase: dict[str, str] = {}
        if self.translator is not None:
            wanted = {
                text
                for texts, key in zip(rows, keys, strict=True)
                for copy in range(self.cfg.copies)
                if self._draw(key, copy)[0] == "back_translation"
                for text in texts
                if text.strip()
            }
            ordered = sorted(wanted)  # the same batches whatever the row order
            paraphrase = dict(zip(ordered, self.translator(ordered), strict=True))
        out = []
        for texts, key in zip(rows, keys, strict=True):
            seen = {tuple(texts)}
            copies = []
            for copy in range(self.cfg.copies):
                technique, rng = self._draw(key, copy)
                new = [
                    paraphrase.get(t, t)
                    if technique == "back_translation"
                    else self._apply(technique, t, rng)
                    for t in texts
                ]
                new = [n if n.strip() else t for n, t in zip(new, texts, strict=True)]
                if tuple(new) not in seen:
                    seen.add(tuple(new))
                    copies.append((technique, new))
            out.append(copies)
        return out
