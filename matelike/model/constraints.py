"""Constrained decoding: answers that must have a given shape, enforced by masking the logits at each step.

A constraint is immutable and may be shared by many requests (a group of samples of one prompt); the state of
one answer (how far it got) lives with its request in the engine: `start()` gives the first state, `allowed`
the token ids that may come next in a state, `advance` the state after a token. The stop ids are allowed
exactly where the answer may end, so a constrained answer is complete unless its token budget runs out.

`SpacedCopy` is word segmentation's shape, the way a grammar (llama.cpp's GBNF, outlines) would state it: the
given text, character for character, with single spaces allowed between characters. The model then decides
only where the word boundaries go; it cannot drop, repeat or change a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

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
    # Tokens whose bytes without spaces spell the path to this node: (id, offsets of their spaces in those bytes).
    tokens: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)


class TokenTrie:
    """The vocabulary's byte strings with spaces removed, in a trie: which tokens can spell the next bytes of a
    text, with spaces placed anywhere. Built once per tokenizer (`for_tokenizer`) and shared by constraints."""

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.bytes_of = [raw or b"" for raw in token_bytes]
        self.root = _Node()
        self.spaces: list[tuple[int, tuple[int, ...]]] = []  # tokens made of spaces only
        for idx, raw in enumerate(token_bytes):
            if not raw:  # special tokens and ids without bytes never spell text
                continue
            key = raw.replace(b" ", b"")
            offsets, k = [], 0
            for b in raw:
                if b == SPACE:
                    offsets.append(k)
                else:
                    k += 1
            entry = (idx, tuple(offsets))
            if not key:
                self.spaces.append(entry)
                continue
            node = self.root
            for b in key:
                node = node.children.setdefault(b, _Node())
            node.tokens.append(entry)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> TokenTrie:
        """The tokenizer's trie, built on first use and kept on the tokenizer object."""
        trie = getattr(tokenizer, "_token_trie", None)
        if trie is None:
            trie = cls(tokenizer.token_bytes())
            tokenizer._token_trie = trie  # type: ignore[attr-defined]
        return trie


def _char_starts(data: bytes) -> frozenset[int]:
    """Byte offsets where a UTF-8 character starts, and the end: the only places a space may go."""
    return frozenset([i for i, b in enumerate(data) if b & 0xC0 != 0x80] + [len(data)])


@dataclass(frozen=True)
class SpacedCopy:
    """`text` (its whitespace dropped) spelled exactly, with single spaces allowed between characters only.

    State: (bytes of the text spelled so far, whether the answer ends with a space now).
    """

    trie: TokenTrie
    text: str
    target: bytes = field(init=False)
    starts: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        target = "".join(self.text.split()).encode("utf-8")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "starts", _char_starts(target))

    def start(self) -> tuple[int, bool]:
        return (0, False)

    def _spaces_fit(self, at: int, offsets: tuple[int, ...], after_space: bool) -> bool:
        """A token's spaces at `at` + offset: between two characters of the text, never two in a row."""
        last = None
        for off in offsets:
            pos = at + off
            if pos <= 0 or pos >= len(self.target) or pos not in self.starts or pos == last:
                return False
            if off == 0 and after_space:
                return False
            last = pos
        return True

    def allowed(self, state: object, stop_ids: Sequence[int]) -> list[int]:
        at, after_space = state  # type: ignore[misc]
        if at >= len(self.target):
            return list(stop_ids)
        out = [idx for idx, offsets in self.trie.spaces if self._spaces_fit(at, offsets, after_space)]
        node = self.trie.root
        for i in range(at, len(self.target)):
            node = node.children.get(self.target[i])
            if node is None:
                break
            # A token may end inside a multi-byte character (byte-level BPE splits some): the next token
            # continues its bytes, and only the spaces' positions need checking.
            out += [idx for idx, offsets in node.tokens if self._spaces_fit(at, offsets, after_space)]
        return out

    def advance(self, state: object, token: int) -> tuple[int, bool]:
        at, _ = state  # type: ignore[misc]
        raw = self.trie.bytes_of[token]
        return (at + len(raw) - raw.count(b" "), raw.endswith(b" "))
