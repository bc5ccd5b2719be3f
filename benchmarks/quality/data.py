"""The quality benchmark's tasks: human-labelled binary classification data shipped inside installable
packages (nothing is downloaded at run time), each balanced and split into train / validation / test by
a fixed seed.

| task | package (file) | positive class | negative class |
|---|---|---|---|
| sentiment | vaderSentiment (vader_lexicon.txt) | mean valence ≥ 1 (10 raters, −4 … 4) | ≤ −1 |
| intensity | afinn (AFINN-en-165.txt) | strong words, abs(valence) ≥ 3 (−5 … 5) | mild words, abs(valence) = 1 |
| subjectivity | textblob (en/en-sentiment.xml, pattern's adjectives) | subjectivity ≥ 0.6 | ≤ 0.2 |
| topic | chatterbot-corpus (data/english/*.yml) | a line (question or answer) of a tech-support, coding, computers or AI conversation | a line of any other conversation (trivia, emotion, psychology, …) |
| fear, joy, anger, trust | nrclex (data/nrc_en.json, the NRC Emotion Lexicon) | words associated with the emotion | lexicon words that are not |

Every task is balanced (chance 0.5): at most ``per_class`` examples of each class, shuffled by the
task's seed, and split by class so that each split is balanced too.
"""
from __future__ import annotations

import importlib.util
import json
import random
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

Example = Tuple[str, int]
#: the packages each task reads, for a clear error when one is missing
PACKAGES = {"sentiment": "vaderSentiment", "intensity": "afinn", "subjectivity": "textblob",
            "topic": "chatterbot_corpus", "fear": "nrclex", "joy": "nrclex", "anger": "nrclex", "trust": "nrclex"}
INSTALL = {"vaderSentiment": "vaderSentiment", "afinn": "afinn", "textblob": "textblob",
           "chatterbot_corpus": "chatterbot-corpus", "nrclex": "nrclex"}
TASK_NAMES = tuple(PACKAGES)
TECH_TOPICS = {"tech support", "coding", "computers", "AI"}


@dataclass(frozen=True)
class Task:
    name: str
    train: List[Example]
    validation: List[Example]
    test: List[Example]
    chance: float
    source: str

    def sizes(self) -> Dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def package_dir(module: str) -> Path:
    """The folder of an installed package, without importing it (textblob imports nltk)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the quality benchmark needs the package {INSTALL.get(module, module)!r}: "
                                  'pip install -e ".[quality]"')
    return Path(list(spec.submodule_search_locations)[0])


def balanced_split(positive: Iterable[str], negative: Iterable[str], per_class: int, seed: int,
                   validation_share: float = 0.15, test_share: float = 0.3) -> Tuple[List[Example], ...]:
    """(train, validation, test): ``min(len(positive), len(negative), per_class)`` examples of each class
    (duplicates and texts in both classes dropped), each split balanced, shuffled by ``seed``."""
    rng = random.Random(seed)
    pos, neg = set(positive), set(negative)
    both = pos & neg
    pos, neg = sorted(pos - both), sorted(neg - both)
    rng.shuffle(pos)
    rng.shuffle(neg)
    k = min(len(pos), len(neg), per_class)
    n_test, n_val = int(round(k * test_share)), int(round(k * validation_share))
    splits = []
    for start, stop in ((n_test + n_val, k), (n_test, n_test + n_val), (0, n_test)):
        part = [(text, 1) for text in pos[start:stop]] + [(text, 0) for text in neg[start:stop]]
        rng.shuffle(part)
        splits.append(part)
    return tuple(splits)


# ----------------------------------------------------------------------------- the lexicons and corpora
def vader_lexicon() -> Dict[str, float]:
    text = (package_dir("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = (line.split("\t") for line in text.splitlines() if line.strip())
    return {row[0]: float(row[1]) for row in rows if row[0].isalpha() and row[0].islower()}


def afinn_lexicon() -> Dict[str, int]:
    text = (package_dir("afinn") / "data" / "AFINN-en-165.txt").read_text(encoding="utf-8")
    rows = (line.rsplit("\t", 1) for line in text.splitlines() if line.strip())
    return {word: int(value) for word, value in rows if word.isalpha()}


def pattern_subjectivity() -> Dict[str, float]:
    """Mean subjectivity of each adjective over its senses, from pattern's lexicon shipped in textblob."""
    root = ElementTree.parse(package_dir("textblob") / "en" / "en-sentiment.xml").getroot()
    senses: Dict[str, List[float]] = {}
    for word in root.iter("word"):
        form = word.get("form", "")
        if form.isalpha():
            senses.setdefault(form.lower(), []).append(float(word.get("subjectivity", "nan")))
    return {form: sum(values) / len(values) for form, values in senses.items()}


def nrc_lexicon() -> Dict[str, List[str]]:
    data = json.loads((package_dir("nrclex") / "data" / "nrc_en.json").read_text(encoding="utf-8"))
    return {word: emotions for word, emotions in data.items() if word.isalpha()}


def chatterbot_lines() -> Dict[str, List[str]]:
    """{category: every line of its conversations (questions and answers), lower-cased} from
    chatterbot-corpus's English files."""
    import yaml

    openings: Dict[str, List[str]] = {}
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in data.get("conversations") or []:
            for line in conversation:
                if isinstance(line, str) and line.strip():
                    openings.setdefault(data["categories"][0], []).append(" ".join(line.lower().split()))
    return openings


# ----------------------------------------------------------------------------- the tasks
def _sentiment() -> Tuple[List[str], List[str]]:
    lexicon = vader_lexicon()
    return [w for w, v in lexicon.items() if v >= 1.0], [w for w, v in lexicon.items() if v <= -1.0]


def _intensity() -> Tuple[List[str], List[str]]:
    lexicon = afinn_lexicon()
    return [w for w, v in lexicon.items() if abs(v) >= 3], [w for w, v in lexicon.items() if abs(v) == 1]


def _subjectivity() -> Tuple[List[str], List[str]]:
    lexicon = pattern_subjectivity()
    return [w for w, v in lexicon.items() if v >= 0.6], [w for w, v in lexicon.items() if v <= 0.2]


def _topic() -> Tuple[List[str], List[str]]:
    openings = chatterbot_lines()
    tech = [s for c, lines in openings.items() if c in TECH_TOPICS for s in lines]
    other = [s for c, lines in openings.items() if c not in TECH_TOPICS for s in lines]
    return tech, other


def _emotion(emotion: str) -> Callable[[], Tuple[List[str], List[str]]]:
    def make() -> Tuple[List[str], List[str]]:
        lexicon = nrc_lexicon()
        return [w for w, e in lexicon.items() if emotion in e], [w for w, e in lexicon.items() if emotion not in e]
    return make


SOURCES = {
    "sentiment": ("VADER lexicon (vaderSentiment): valence ≥ 1 vs ≤ −1", _sentiment),
    "intensity": ("AFINN-165 (afinn): abs(valence) ≥ 3 vs = 1", _intensity),
    "subjectivity": ("pattern's adjective lexicon (textblob): subjectivity ≥ 0.6 vs ≤ 0.2", _subjectivity),
    "topic": ("chatterbot-corpus: lines of tech/coding/computers/AI conversations vs of the others", _topic),
    "fear": ("NRC Emotion Lexicon (nrclex): fear vs not", _emotion("fear")),
    "joy": ("NRC Emotion Lexicon (nrclex): joy vs not", _emotion("joy")),
    "anger": ("NRC Emotion Lexicon (nrclex): anger vs not", _emotion("anger")),
    "trust": ("NRC Emotion Lexicon (nrclex): trust vs not", _emotion("trust")),
}


def load_tasks(names: Optional[Sequence[str]] = None, per_class: int = 500, seed: int = 0,
               validation_share: float = 0.15, test_share: float = 0.3) -> Dict[str, Task]:
    """The tasks ``names`` (default: all of TASK_NAMES), each balanced with at most ``per_class`` examples
    of a class; task i is shuffled and split with seed ``seed + i`` (its index in TASK_NAMES)."""
    names = list(TASK_NAMES if names is None else names)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {list(TASK_NAMES)}")
    tasks = {}
    for name in names:
        source, make = SOURCES[name]
        positive, negative = make()
        train, validation, test = balanced_split(positive, negative, per_class, seed + TASK_NAMES.index(name),
                                                   validation_share, test_share)
        tasks[name] = Task(name, train, validation, test, chance=0.5, source=source)
    return tasks
