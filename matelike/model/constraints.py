"""Constrained decoding: answers that must have a given shape, enforced by masking the logits at each step.

A constraint is immutable and may be shared by many requests (a group of samples of one prompt); the state of
one answer (how far it got) lives with its request in the engine: `start()` gives the first state, `allowed`
the token ids that may come next in a state, `advance` the state after a token. The stop ids are allowed
exactly where the answer may end, so a constrained answer is complete unless its token budget runs out.

The shapes are small grammars over the answer's UTF-8 bytes (`ByteGrammar`), the way llama.cpp's GBNF or
outlines state them, so a token may cross any boundary of the grammar (byte-level BPE merges freely):
- `SpacedCopy` (word segmentation): the given text, character for character, with single spaces allowed
  between characters. The model decides only where words end; it cannot drop, repeat or change a character.
- `EntityList` (named entities): `无`, or `人名：A、B；地名：C；机构名：D` with the types in that order, each
  at most once, and every name a span of the given text. The model decides which spans are which entities; it
  cannot name something the text does not contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

if TYPE_CHECKING:
    from matelike.tokenizer import Tokenizer

SPACE = 0x20


class Constraint(Protocol):
    """What the engine calls for a constrained request (see the module docstring)."""

    def start(self) -> object: ...

    def allowed(self, state: object, stop_ids: Sequence[int]) -> list[int]: ...

    def advance(self, state: object, token: int) -> object: ...


@dataclass(eq=False)
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # tokens whose bytes spell the path to this node


class TokenTrie:
    """The vocabulary's byte strings in a trie, to find every token a grammar accepts from a state by walking
    only the bytes it can take. Built once per tokenizer (`for_tokenizer`) and shared by constraints."""

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.bytes_of = [raw or b"" for raw in token_bytes]
        self.root = _Node()
        for idx, raw in enumerate(token_bytes):
            if not raw:  # special tokens and ids without bytes never spell text
                continue
            node = self.root
            for b in raw:
                node = node.children.setdefault(b, _Node())
            node.ids.append(idx)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> TokenTrie:
        """The tokenizer's trie, built on first use and kept on the tokenizer object."""
        trie = getattr(tokenizer, "_token_trie", None)
        if trie is None:
            trie = cls(tokenizer.token_bytes())
            tokenizer._token_trie = trie  # type: ignore[attr-defined]
        return trie


# A grammar state is a tuple of alternatives (the grammar may be ambiguous for a while: a byte can continue a
# name or start a separator); an alternative is a small tuple, meaningful to its grammar only.
State = tuple[tuple, ...]


class ByteGrammar:
    """A grammar over bytes: `initial` alternatives, `step(alt, byte)` the alternatives after a byte (none: the
    byte is refused), `accepts(alt)` whether the answer may end there. Tokens are matched through `trie`."""

    trie: TokenTrie

    def initial(self) -> Iterable[tuple]:
        raise NotImplementedError

    def step(self, alt: tuple, byte: int) -> Iterable[tuple]:
        raise NotImplementedError

    def accepts(self, alt: tuple) -> bool:
        raise NotImplementedError

    def _next(self, state: State, byte: int) -> State:
        return tuple(dict.fromkeys(nxt for alt in state for nxt in self.step(alt, byte)))

    def start(self) -> State:
        return tuple(dict.fromkeys(self.initial()))

    def allowed(self, state: object, stop_ids: Sequence[int]) -> list[int]:
        st: State = state  # type: ignore[assignment]
        out = list(stop_ids) if any(self.accepts(alt) for alt in st) else []
        stack = [(self.trie.root, st)]
        while stack:
            node, here = stack.pop()
            for byte, child in node.children.items():
                nxt = self._next(here, byte)
                if nxt:
                    out += child.ids
                    stack.append((child, nxt))
        return out

    def advance(self, state: object, token: int) -> State:
        st: State = state  # type: ignore[assignment]
        for byte in self.trie.bytes_of[token]:
            st = self._next(st, byte)
        return st


def _char_starts(data: bytes) -> frozenset[int]:
    """Byte offsets where a UTF-8 character starts, and the end."""
    return frozenset([i for i, b in enumerate(data) if b & 0xC0 != 0x80] + [len(data)])


class SpacedCopy(ByteGrammar):
    """`text` (its whitespace dropped) spelled exactly, with single spaces between characters only.
    Alternative: ("copy", bytes spelled so far, whether the answer ends with a space)."""

    def __init__(self, trie: TokenTrie, text: str) -> None:
        self.trie = trie
        self.target = "".join(text.split()).encode("utf-8")
        self.starts = _char_starts(self.target)

    def initial(self) -> Iterable[tuple]:
        return [("copy", 0, False)]

    def step(self, alt: tuple, byte: int) -> Iterable[tuple]:
        _, at, after_space = alt
        if byte == SPACE:
            return [("copy", at, True)] if 0 < at < len(self.target) and at in self.starts and not after_space else []
        return [("copy", at + 1, False)] if at < len(self.target) and self.target[at] == byte else []

    def accepts(self, alt: tuple) -> bool:
        return alt[1] == len(self.target) and not alt[2]


class EntityList(ByteGrammar):
    """`无`, or the entity types present, in ENTITY_TYPES order, each `TYPE：name、name`, parts joined by `；`,
    every name a non-empty span of `text` made of whole characters, named once. Alternatives: ("lit", bytes
    still to match, the alternative after them), ("name", type index, start offsets in the text where the name
    so far occurs, its length in bytes, the names given before), ("end",)."""

    def __init__(self, trie: TokenTrie, text: str) -> None:
        from matelike.eval import scoring

        self.trie = trie
        self.text = text.encode("utf-8")
        self.starts = _char_starts(self.text)
        self.none = scoring.NO_ENTITY.encode()
        self.types = [name.encode() + scoring.TYPE_SEP.encode() for name in scoring.ENTITY_TYPES.values()]
        self.name_sep, self.part_sep = scoring.NAME_SEP.encode(), scoring.PART_SEP.encode()
        # limit[p]: where a name starting at byte p must end by, the next character the answer's parser would
        # split or strip at (`scoring.NOT_IN_NAMES`, whitespace).
        stops = [i for i, ch in zip(sorted(self.starts), text) if ch in scoring.NOT_IN_NAMES or ch.isspace()]
        self.limit = {p: min([q for q in stops if q >= p], default=len(self.text)) for p in self.starts}
        self.anywhere = tuple(p for p in sorted(self.starts) if p < self.limit[p])

    def _parts_from(self, k: int, used: frozenset[bytes]) -> list[tuple]:
        if not self.anywhere:  # a text with nothing a name could be: only `无`
            return []
        return [("lit", self.types[j], ("name", j, self.anywhere, 0, used)) for j in range(k, len(self.types))]

    def initial(self) -> Iterable[tuple]:
        return [("lit", self.none, ("end",)), *self._parts_from(0, frozenset())]

    def _after_name(self, k: int, used: frozenset[bytes]) -> list[tuple]:
        """What may follow a complete name of type k: another name, the next type's part (the end: `accepts`)."""
        return [("lit", self.name_sep, ("name", k, self.anywhere, 0, used)),
                *[("lit", self.part_sep, part) for part in self._parts_from(k + 1, used)]]

    def _name(self, p: int, end: int, used: frozenset[bytes]) -> bytes | None:
        """text[p:end] when it may be a name: whole characters, not `无`, not named before."""
        name = self.text[p:end]
        return name if end > p and end in self.starts and name != self.none and name not in used else None

    def _complete(self, alt: tuple) -> bytes | None:
        """The name of a ("name", ...) alternative when it may end here."""
        _, _, where, length, used = alt
        return self._name(where[0], where[0] + length, used) if length else None

    def _viable(self, where: tuple[int, ...], length: int, used: frozenset[bytes]) -> bool:
        """Whether a name begun at one of `where` with `length` bytes can still end as a name (so that decoding
        never enters a state with no way out)."""
        return any(self._name(p, end, used) is not None
                   for p in where for end in range(p + length, self.limit[p] + 1))

    def step(self, alt: tuple, byte: int) -> Iterable[tuple]:
        kind = alt[0]
        if kind == "lit":
            rest, then = alt[1], alt[2]
            if rest[0] != byte:
                return []
            return [("lit", rest[1:], then)] if len(rest) > 1 else [then]
        if kind == "name":
            _, k, where, length, used = alt
            out: list[tuple] = []
            grown = tuple(p for p in where if p + length < self.limit[p] and self.text[p + length] == byte)
            if grown and self._viable(grown, length + 1, used):
                out.append(("name", k, grown, length + 1, used))
            name = self._complete(alt)
            if name is not None:
                out += [nxt for a in self._after_name(k, used | {name}) for nxt in self.step(a, byte)]
            return out
        return []  # ("end",) takes no more bytes

    def accepts(self, alt: tuple) -> bool:
        return alt[0] == "end" or (alt[0] == "name" and self._complete(alt) is not None)
