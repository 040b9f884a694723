"""Word matching for AMBER's generative metrics: official (NLTK + spaCy) or offline fallback.

Official (AMBER `inference.py`): nouns are the NLTK `word_tokenize` tokens whose `pos_tag` starts
with "NN", WordNet-lemmatised; two words are similar when spaCy `en_core_web_lg` similarity > 0.8.
It needs `nltk` with its data (punkt(_tab), averaged_perceptron_tagger(_eng), wordnet), `spacy`
and the `en_core_web_lg` model, none of which can be installed offline.

Offline fallback (approximate, documented in docs/benchmarks.md):
- tokens are runs of letters (hyphens inside kept, as "e-book"), case kept like NLTK's;
- no POS tagger: a token counts as a noun when its lemma is in AMBER's closed 418-word vocabulary,
  except words often used as verbs / adjectives / modals ("can", "orange", "light", ...), which
  count only right after a determiner or number ("a light", "two watches");
- lemmas come from WordNet's noun rules (morphy) with the vocabulary as dictionary (less the
  words WordNet lacks, whose plurals it leaves alone: "bedsheets"), plus the few WordNet results
  that differ for it ("leaves" -> "leaf"; "men" stays "men" and "vases" becomes "vas", so
  neither counts, while "women" -> "woman" does);
- similarity is equality (spaCy gives exactly 1.0 for identical words, so exact matches agree).
"""

import re
from collections.abc import Collection
from functools import lru_cache
from typing import Protocol

OFFICIAL = "official"
OFFLINE = "offline-fallback"

_TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")

# WordNet's noun detachment rules (nltk.corpus.wordnet morphy), in its order.
_NOUN_SUFFIX_RULES = (
    ("s", ""),
    ("ses", "s"),
    ("ves", "f"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)
# What WordNet's lemmatiser returns where its exception list or dictionary disagrees with the
# rules above applied over AMBER's vocabulary (some vocabulary entries are plurals WordNet never
# returns: "earrings" -> "earring", so those entries never match officially). WordNet keeps
# "men" ("men" is a noun there too, and the shortest form wins, the first on a tie) and reads
# "vases" as "vas", so neither counts officially.
_WORDNET_LEMMAS = {
    "men": "men",
    "vases": "vas",
    "busses": "bus",
    "camerae": "camera",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "leaves": "leaf",
    "knives": "knife",
    "potatoes": "potato",
    "tomatoes": "tomato",
    "earrings": "earring",
    "sunglasses": "sunglass",
    "slippers": "slipper",
    "chopsticks": "chopstick",
}
# Vocabulary words WordNet 3.0 has no noun for: WordNet does not lemmatise their plurals to them
# ("bedsheets" stays "bedsheets" and so is no vocabulary noun), the word itself stays as it is.
_NOT_IN_WORDNET = frozenset(
    [
        "TV",
        "air-conditioning",
        "baconic",
        "bedsheet",
        "cann",
        "cathole",
        "chopsticks",
        "closestool",
        "cooktop",
        "doghole",
        "e-book",
        "earing",
        "earrings",
        "ebook",
        "electrombile",
        "hot",
        "kiwifruit",
        "paraglider",
        "pissoir",
        "rpoe",
        "sanitizer",
        "scoon",
        "seegull",
        "showerpuff",
        "slippers",
        "streetlamp",
        "waterfont",
    ]
)
_OFTEN_NOT_NOUNS = frozenset(
    [
        "can",
        "orange",
        "light",
        "hot",
        "watch",
        "sound",
        "support",
        "note",
        "range",
        "sign",
        "drink",
        "tie",
        "line",
        "pack",
        "lounge",
        "skate",
        "spray",
        "file",
        "lock",
        "switch",
        "plug",
        "tap",
        "sliver",
        "warp",
        "bail",
    ]
)
_DETERMINERS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "some",
        "any",
        "each",
        "every",
        "another",
        "no",
        "his",
        "her",
        "its",
        "their",
        "my",
        "your",
        "our",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "several",
        "many",
        "few",
    ]
)


class Lexicon(Protocol):
    mode: str

    def nouns(self, text: str) -> list[str]:
        """Lemmatised nouns of a caption, in order, repeats kept."""
        ...

    def similar(self, word1: str, word2: str) -> bool:
        """Whether two words count as the same object."""
        ...


class OfflineLexicon:
    mode = OFFLINE

    def __init__(self, vocabulary: Collection[str]):
        self.vocabulary = frozenset(vocabulary)

    def lemma(self, word: str) -> str:
        """WordNet-style noun lemma, with AMBER's vocabulary standing in for WordNet."""
        if word in _WORDNET_LEMMAS:
            return _WORDNET_LEMMAS[word]
        forms = [word] if word in self.vocabulary else []
        for suffix, replacement in _NOUN_SUFFIX_RULES:
            if word.endswith(suffix):
                form = word[: -len(suffix)] + replacement
                if form in self.vocabulary and form not in _NOT_IN_WORDNET:
                    forms.append(form)
        return min(forms, key=len) if forms else word

    def nouns(self, text: str) -> list[str]:
        tokens = _TOKEN.findall(text)
        nouns = []
        for i, token in enumerate(tokens):
            lemma = self.lemma(token)
            if lemma not in self.vocabulary:
                continue
            after_determiner = i > 0 and tokens[i - 1].lower() in _DETERMINERS
            if lemma in _OFTEN_NOT_NOUNS and not after_determiner:
                continue
            nouns.append(lemma)
        return nouns

    def similar(self, word1: str, word2: str) -> bool:
        return word1 == word2


class OfficialLexicon:
    mode = OFFICIAL

    def __init__(self, threshold: float = 0.8):
        import nltk
        import spacy
        from nltk.stem import WordNetLemmatizer

        self.threshold = threshold
        self._nltk = nltk
        self._lemmatizer = WordNetLemmatizer()
        # Caching the parsed words gives the same similarities as re-parsing them each call.
        self._doc = lru_cache(maxsize=None)(spacy.load("en_core_web_lg"))

    def nouns(self, text: str) -> list[str]:
        tagged = self._nltk.pos_tag(self._nltk.word_tokenize(text))
        return [self._lemmatizer.lemmatize(word) for word, pos in tagged if pos.startswith("NN")]

    def similar(self, word1: str, word2: str) -> bool:
        return self._doc(word1).similarity(self._doc(word2)) > self.threshold


def _try_official(threshold: float) -> tuple[OfficialLexicon | None, str]:
    try:
        lexicon = OfficialLexicon(threshold)
        lexicon.nouns("Two dogs sit on a bench.")
    except (ImportError, OSError, LookupError) as err:
        return None, f"{type(err).__name__}: {str(err).strip()[:200]}"
    return lexicon, ""


def load_lexicon(mode: str, vocabulary: Collection[str], threshold: float = 0.8) -> Lexicon:
    """`auto` picks official when NLTK, its data, spaCy and en_core_web_lg are all installed."""
    match mode:
        case "offline":
            return OfflineLexicon(vocabulary)
        case "auto" | "official":
            lexicon, reason = _try_official(threshold)
            if lexicon is not None:
                return lexicon
            if mode == "auto":
                return OfflineLexicon(vocabulary)
            raise RuntimeError(
                "official AMBER matching needs nltk with its punkt_tab, "
                "averaged_perceptron_tagger_eng and wordnet data, spacy and en_core_web_lg "
                f"({reason}); install them or match offline (score --mode offline, classify "
                "--word-matching offline)"
            )
        case other:
            raise ValueError(f"Unknown matching mode '{other}'; known: auto, official, offline")
