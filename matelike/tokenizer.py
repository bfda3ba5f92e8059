"""Byte-level BPE tokenizer: training in bounded memory, ChatML chat template, Hugging Face compatible files.

The saved directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained(DIR)` and gives the same ids and chat text as this module.

Special tokens come first in the vocabulary: `<|endoftext|>` = 0 (document separator in pretraining and the
padding token), `<|im_start|>` = 1, `<|im_end|>` = 2, then `<|reserved_0|>`.. for later use (tool calls,
reasoning markers) so they can be given a meaning without resizing the embedding. They are added tokens: BPE
merges never produce them from plain text. No BOS token and nothing is added by `encode`.

End of sequence: `eos_token` in tokenizer_config.json is `<|endoftext|>`, which ends a pretraining document
and is what `eos_id` returns. A chat turn ends with `<|im_end|>`; generation in chat mode stops on either
(`stop_ids`), and the model directory's generation_config.json lists both as `eos_token_id`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np
    import tokenizers

    from matelike.cli import CommandTable

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
N_RESERVED = 13  # 3 named + 13 reserved = 16 special tokens
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|reserved_{i}|>" for i in range(N_RESERVED))

# Pre-tokenizer split (Qwen2/GPT-4 style): words with one leading non-letter, single digits (numbers are not
# merged into arbitrary chunks), punctuation runs, newlines, spaces. CJK runs split at punctuation, so merges
# learn common Chinese words and phrases without crossing clause boundaries.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. Assistant content and its <|im_end|> sit inside {% generation %} so transformers'
# `return_assistant_tokens_mask` marks exactly the tokens SFT trains on (same as `encode_chat`'s mask).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Default sample size for training. The trainer keeps every distinct pre-token (a Chinese clause is one)
# with per-byte pair tables, so its memory grows with the sample, not the corpus: a fixed sample bounds it
# whatever the corpus size (`matelike bench tokenize` prints the peak). 8M characters are plenty of
# statistics for a 6400-token vocabulary.
DEFAULT_MAX_CHARS = 8_000_000
HELDOUT_MAX_CHARS = 1_000_000
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1


class Tokenizer:
    """Our tokenizer API over a `tokenizers.Tokenizer` (byte-level BPE with the special tokens above)."""

    def __init__(self, tok: "tokenizers.Tokenizer", chat_template: str = CHAT_TEMPLATE) -> None:
        self._tok = tok
        self.chat_template = chat_template
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.eos_id: int = tok.token_to_id(ENDOFTEXT)
        self.pad_id: int = self.eos_id
        self.im_start_id: int = tok.token_to_id(IM_START)
        self.im_end_id: int = tok.token_to_id(IM_END)

    # ---- files ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json here (train one with `matelike tokenizer train`)")
        template = CHAT_TEMPLATE
        config = file.parent / "tokenizer_config.json"
        jinja = file.parent / "chat_template.jinja"  # where transformers' save_pretrained puts it
        # Every failure below is a ValueError naming the file: a damaged model directory gets a one-line answer.
        if config.is_file():
            try:
                settings = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested past the recursion limit
                raise ValueError(f"{config}: not a tokenizer config ({type(e).__name__}: {e})") from e
            if not isinstance(settings, dict):
                raise ValueError(f"{config}: not a tokenizer config (expected a JSON object)")
            template = settings.get("chat_template") or CHAT_TEMPLATE
        if jinja.is_file():
            try:
                template = jinja.read_text(encoding="utf-8")
            except ValueError as e:
                raise ValueError(f"{jinja}: not a UTF-8 chat template ({e})") from e
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception for files that are not JSON or not a tokenizer
            raise ValueError(f"{file}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})") from e
        try:
            return cls(backend, template)
        except ValueError as e:  # lacks the special tokens
            raise ValueError(f"{file}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(self._tok.to_str(pretty=True), encoding="utf-8")
        added = {
            str(self._tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": True}
            for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is not None
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "additional_special_tokens": [IM_START, IM_END],
            # Keep spaces before punctuation on decode: byte-level decoding is exact, no clean-up wanted.
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "padding_side": "right",
            "added_tokens_decoder": added,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                    encoding="utf-8")
        special_map = {"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
        (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")

    @property
    def sha256(self) -> str:
        """Hash of the tokenizer model (vocabulary, merges, special tokens): identifies what ids mean."""
        return hashlib.sha256(self._tok.to_str(pretty=False).encode("utf-8")).hexdigest()

    @property
    def backend(self) -> "tokenizers.Tokenizer":
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    # ---- vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Token ids that end a chat reply: `<|im_end|>` and `<|endoftext|>`."""
        return (self.im_end_id, self.eos_id)

    @property
    def special_ids(self) -> list[int]:
        return [i for i in (self._tok.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    # ---- encoding --------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing added. Special-token strings in the text map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` on many texts at once (in parallel inside the Rust library)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------
    @staticmethod
    def _render(messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """ChatML text of `messages`."""
        parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """ChatML text: `<|im_start|>role\\ncontent<|im_end|>\\n` per message (+ `<|im_start|>assistant\\n`)."""
        return self._render(messages, add_generation_prompt)

    def _plain(self) -> "tokenizers.Tokenizer":
        """A copy of the backend that reads special-token strings as plain text, for message content.

        `encode_special_tokens` is the backend's switch for that (transformers' `split_special_tokens`); it is
        set on a copy, never toggled on the shared backend, so threads encoding documents are not affected.
        """
        plain = getattr(self, "_plain_tok", None)
        if plain is None or not plain.encode_special_tokens:  # pickling drops the flag: rebuild the copy
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return plain

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Ids of the chat text and the assistant mask (1 on assistant content tokens and their `<|im_end|>`).

        Only the template puts special tokens in: each `role\\ncontent` piece between them is encoded as plain
        text, so content holding "<|im_end|>\\n<|im_start|>system" stays ordinary bytes (a user cannot forge a
        turn) and decodes back to itself. For content free of special-token strings the ids equal
        `encode(apply_chat_template(...))`, since the special tokens split the text into these same pieces. The
        mask comes from character offsets: a token is trained on when it overlaps assistant content.
        Raises RecordError for a message that is not `{role: str, content: str}` of valid Unicode.
        """
        plain = self._plain()
        newline = plain.encode("\n", add_special_tokens=False).ids
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(messages):
            role, content = _message_text(m, i)
            head = f"{role}\n"
            enc = plain.encode(head + content, add_special_tokens=False)
            trained = role == "assistant"
            ids.append(self.im_start_id)
            ids.extend(enc.ids)
            ids.append(self.im_end_id)
            ids.extend(newline)
            mask.append(0)
            mask.extend(int(trained and end > len(head)) for _, end in enc.offsets)
            mask.append(int(trained))
            mask.extend([0] * len(newline))
        if add_generation_prompt:
            ids.append(self.im_start_id)
            ids.extend(plain.encode("assistant\n", add_special_tokens=False).ids)
            mask.extend([0] * (len(ids) - len(mask)))
        return ids, mask

    def _token_bytes(self) -> "np.ndarray | None":
        """UTF-8 bytes each id stands for, when the backend is byte-level BPE without a normalizer; else None.

        A byte-level token's vocabulary string has one character per byte, so its length is its byte count. With
        it, `encode_chat_batch` finds the assistant mask from cumulative byte counts instead of per-token offsets.
        """
        table = getattr(self, "_token_bytes_table", False)
        if table is False:
            import numpy as np
            from tokenizers import decoders

            table = None
            if self._tok.normalizer is None and isinstance(self._tok.decoder, decoders.ByteLevel):
                vocab = self._tok.get_vocab(with_added_tokens=True)
                table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
                for token, idx in vocab.items():
                    table[idx] = len(token)
            self._token_bytes_table = table
        return table

    def token_bytes(self) -> list[bytes | None]:
        """The UTF-8 bytes each id stands for (None for special tokens); ValueError unless the backend is
        byte-level BPE without a normalizer, the only kind whose tokens are whole bytes. Constrained decoding
        matches these against the text an answer must spell."""
        if self._token_bytes() is None:
            raise ValueError("token bytes need a byte-level BPE tokenizer without a normalizer")
        # GPT-2's byte-to-character table, which tokenizers' ByteLevel uses: printable bytes stand for
        # themselves, the others for the characters from U+0100 on, in byte order.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        extra = [b for b in range(256) if b not in printable]
        char_to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
        special = set(self.special_ids)
        out: list[bytes | None] = [None] * self.vocab_size
        for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
            if idx not in special and all(c in char_to_byte for c in token):
                out[idx] = bytes(char_to_byte[c] for c in token)
        return out

    def encode_chat_batch(self, conversations: Sequence[Sequence[dict]],
                          add_generation_prompt: bool = False) -> "ChatBatch":
        """`encode_chat` of many conversations in one `encode_batch` call, as flat arrays (see `ChatBatch`).

        Every conversation's ids and mask equal `encode_chat`'s. One batch call and numpy assembly instead of a
        call and a Python loop over tokens per message: packing SFT data runs near the encoder's own speed
        (`matelike bench sft-data`). A batch whose text holds no special-token string but the template's is
        encoded as one ChatML text per conversation (`_encode_chat_texts`); any other batch, or a tokenizer
        that is not plain byte-level BPE, as one `role\\ncontent` piece per message (`_encode_chat_pieces`).
        """
        batch = self._encode_chat_texts(conversations, add_generation_prompt)
        return batch if batch is not None else self._encode_chat_pieces(conversations, add_generation_prompt)

    def _whole_text_safe(self) -> bool:
        """Whether every special token starts with `<|`: then a text whose only `<|` are the template's can hold
        no special token but the template's, and encoding it whole splits it into `encode_chat`'s pieces."""
        safe = getattr(self, "_whole_text_ok", None)
        if safe is None:
            specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
            safe = self._whole_text_ok = all(t.startswith("<|") for t in specials)
        return safe

    def _encode_chat_texts(self, conversations: Sequence[Sequence[dict]],
                           add_generation_prompt: bool) -> "ChatBatch | None":
        """`encode_chat_batch` with one ChatML text per conversation: the library splits a text at its special
        tokens and encodes the parts between them on their own, so when the content holds no special-token
        string the ids are `encode_chat`'s, with a quarter of the encode calls and no reassembly. The mask comes
        from cumulative byte counts, as in `_encode_chat_pieces`. None (use the pieces) when a text holds `<|`
        beyond the template's, when a string is not valid Unicode, or when the ids do not have the template's
        layout (a special token that strips the spaces around it, say): the checks make the result never
        differ from `_encode_chat_pieces`'s.
        """
        import numpy as np

        table = self._token_bytes()
        if table is None or not self._whole_text_safe():
            return None
        texts: list[str] = []
        text_bytes: list[int] = []
        trained: list[bool] = []  # per piece: an assistant message
        conv_pieces = [0]
        gen = f"{IM_START}assistant\n" if add_generation_prompt else ""
        for conv in conversations:
            parts: list[str] = []
            for i, m in enumerate(conv):
                # The usual message is a dict of two str: checked inline; anything else by `_message_text`.
                role = m.get("role") if type(m) is dict else None
                content = m.get("content") if type(m) is dict else None
                if type(role) is not str or type(content) is not str:
                    role, content = _message_text(m, i)
                parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
                trained.append(role == "assistant")
            if gen:
                parts.append(gen)
                trained.append(False)
            text = "".join(parts)
            if text.count("<|") != 2 * len(conv) + bool(gen):
                return None  # content that spells a special token is encoded piece by piece, as plain text
            try:
                text_bytes.append(len(text.encode("utf-8")))
            except UnicodeEncodeError:  # a lone surrogate: the pieces path names the message
                return None
            texts.append(text)
            conv_pieces.append(len(trained))
        newline = self._tok.encode("\n", add_special_tokens=False).ids
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        # Each conversation's id list is freed as soon as it is copied: the next one reuses its memory.
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=int(lens.sum()))
        del encodings
        conv_start = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lens, out=conv_start[1:])
        conv = np.asarray(conv_pieces, dtype=np.int64)
        # The template's layout: each piece starts at an <|im_start|> (a conversation's first at its first token),
        # each message's <|im_end|> and newline end it, no other <|im_start|> or <|im_end|>, and every byte of
        # the text comes from a token.
        opened = np.flatnonzero(ids == self.im_start_id)
        if opened.size != len(trained):
            return None
        starts = np.append(opened, ids.size)
        nonempty = conv[1:] > conv[:-1]
        if not np.array_equal(starts[conv[:-1][nonempty]], conv_start[:-1][nonempty]):
            return None
        suffix = np.ones(len(trained), dtype=bool)
        if gen:
            suffix[conv[1:][nonempty] - 1] = False
        end_at = starts[1:][suffix] - 1 - len(newline)
        if not np.array_equal(np.flatnonzero(ids == self.im_end_id), end_at):
            return None
        for k, t in enumerate(newline):
            if not (ids[end_at + 1 + k] == t).all():
                return None
        ends = np.zeros(ids.size + 1, dtype=np.int64)  # bytes of the chunk up to the end of each token
        np.cumsum(table[ids], out=ends[1:])
        if not np.array_equal(np.diff(ends[conv_start]), np.asarray(text_bytes, dtype=np.int64)):
            return None
        # A token of an assistant piece is trained on when it reaches past `assistant\n` (the piece starts after
        # its <|im_start|>), as in `_encode_chat_pieces`: all of the piece but its <|im_start|>, the tokens
        # within `assistant\n` (a few, found a position at a time; bytes only grow, and <|im_end|> reaches past)
        # and the newline after <|im_end|>.
        is_trained = np.asarray(trained, dtype=bool)
        mask = np.repeat(is_trained.view(np.uint8), np.diff(starts))
        mask[opened] = 0
        for k in range(len(newline)):
            mask[end_at + 1 + k] = 0
        head = opened[is_trained]
        at = head + 1
        while at.size:
            within = ends[at + 1] - ends[head + 1] <= len("assistant\n")
            at, head = at[within], head[within]
            mask[at] = 0
            at += 1
        return ChatBatch(ids, mask, starts, conv, len(newline))

    def _encode_chat_pieces(self, conversations: Sequence[Sequence[dict]],
                            add_generation_prompt: bool = False) -> "ChatBatch":
        """`encode_chat_batch` with one `role\\ncontent` piece per message, encoded as plain text: the pieces
        `encode_chat` encodes one call at a time, so any content (special-token strings included) gives its ids.
        """
        import numpy as np

        pieces: list[str] = []
        piece_bytes: list[int] = []  # UTF-8 bytes of each piece
        head_bytes: list[int] = []  # bytes of `role\\n` (ASCII for the assistant role, whose mask matters)
        trained: list[bool] = []
        suffix: list[bool] = []  # the piece is a message (<|im_end|> and newline follow), not a generation prompt
        conv_pieces = [0]
        for conv in conversations:
            for i, m in enumerate(conv):
                # The usual message is a dict of two str: checked inline; anything else by `_message_text`.
                role = m.get("role") if type(m) is dict else None
                content = m.get("content") if type(m) is dict else None
                if type(role) is not str or type(content) is not str:
                    role, content = _message_text(m, i)
                piece = f"{role}\n{content}"
                try:
                    piece_bytes.append(len(piece.encode("utf-8")))
                except UnicodeEncodeError:  # a lone surrogate: `_message_text` names the message
                    _message_text(m, i)
                    raise
                pieces.append(piece)
                head_bytes.append(len(role.encode("utf-8")) + 1)
                trained.append(role == "assistant")
                suffix.append(True)
            if add_generation_prompt:
                pieces.append("assistant\n")
                piece_bytes.append(len(pieces[-1]))
                head_bytes.append(len(pieces[-1]))
                trained.append(False)
                suffix.append(False)
            conv_pieces.append(len(pieces))
        plain = self._plain()
        newline = plain.encode("\n", add_special_tokens=False).ids
        table = self._token_bytes()
        encs = (plain.encode_batch_fast if table is not None else plain.encode_batch)(pieces, add_special_tokens=False)
        id_lists = [e.ids for e in encs]
        lens = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        tokens = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lens.sum()))
        piece_of = np.repeat(np.arange(len(pieces)), lens)
        tok_start = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lens, out=tok_start[1:])
        heads = np.asarray(head_bytes, dtype=np.int64)
        if table is not None:
            # Bytes up to the end of each token, counted from its piece's start: a token is trained on when it
            # reaches past `role\\n`, the test `encode_chat` makes on character offsets (the head is ASCII).
            ends = np.cumsum(table[tokens])
            before = np.concatenate([[0], ends])[tok_start[:-1]]
            ends -= before[piece_of]
            total = np.zeros(len(pieces), dtype=np.int64)
            nonempty = lens > 0
            total[nonempty] = ends[tok_start[1:][nonempty] - 1]
            if not np.array_equal(total, np.asarray(piece_bytes, dtype=np.int64)):  # not a plain byte-level BPE after all: use offsets
                self._token_bytes_table = None
                return self._encode_chat_pieces(conversations, add_generation_prompt)
        else:
            # Character offsets; `role\\n` of the assistant is ASCII, so its length in characters is `heads`.
            ends = np.fromiter((end for e in encs for _, end in e.offsets), dtype=np.int64, count=tokens.size)
        content_mask = (ends > heads[piece_of]) & np.asarray(trained, dtype=bool)[piece_of]
        has_suffix = np.asarray(suffix, dtype=np.int64)
        out_lens = 1 + lens + has_suffix * (1 + len(newline))
        starts = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(out_lens, out=starts[1:])
        ids = np.empty(int(starts[-1]), dtype=np.int64)
        mask = np.zeros(ids.size, dtype=np.uint8)
        ids[starts[:-1]] = self.im_start_id
        at = starts[:-1][piece_of] + 1 + (np.arange(tokens.size) - tok_start[:-1][piece_of])
        ids[at] = tokens
        mask[at] = content_mask
        closed = np.flatnonzero(has_suffix)
        end_at = starts[closed] + 1 + lens[closed]
        ids[end_at] = self.im_end_id
        mask[end_at] = np.asarray(trained, dtype=np.uint8)[closed]
        for k, t in enumerate(newline):
            ids[end_at + 1 + k] = t
        return ChatBatch(ids, mask, starts, np.asarray(conv_pieces, dtype=np.int64), len(newline))


@dataclass
class ChatBatch:
    """Conversations rendered by `Tokenizer.encode_chat_batch`, flat.

    Message (or generation prompt) j of the batch is `ids[starts[j]:starts[j+1]]` (its `<|im_start|>`, `role\\n`
    and content, `<|im_end|>` and newline); conversation c is messages `conv[c]` to `conv[c+1]`, so its ids are
    `ids[starts[conv[c]]:starts[conv[c+1]]]`, the same as `encode_chat` gives.
    """

    ids: "np.ndarray"  # int64
    mask: "np.ndarray"  # uint8, 1 on assistant content and its <|im_end|>
    starts: "np.ndarray"  # int64, messages + 1
    conv: "np.ndarray"  # int64, conversations + 1: index of each conversation's first message in `starts`
    closing: int = 1  # tokens after a message's <|im_end|> (the newline)

    def __len__(self) -> int:
        return len(self.conv) - 1

    def conversation(self, c: int) -> tuple["np.ndarray", "np.ndarray"]:
        a, b = int(self.starts[self.conv[c]]), int(self.starts[self.conv[c + 1]])
        return self.ids[a:b], self.mask[a:b]


def _message_text(message: object, index: int) -> tuple[str, str]:
    """(role, content) of one chat message; RecordError when either is not a string of valid Unicode."""
    from matelike.data.formats import RecordError

    if not isinstance(message, Mapping):
        raise RecordError(f"wrong type: message {index} is not an object")
    out = []
    for key in ("role", "content"):
        value = message.get(key)
        if not isinstance(value, str):
            raise RecordError(f"wrong type: message {index} has no string {key!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the tokenizer would fail on it with a bare TypeError
            raise RecordError(f"invalid Unicode: message {index} {key} holds a lone surrogate") from None
        out.append(value)
    return out[0], out[1]


# ---- training -------------------------------------------------------------------------------------------
def new_bpe() -> "tokenizers.Tokenizer":
    """An untrained byte-level BPE with our pre-tokenizer and decoder."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _count_chars(paths: list[Path], field: str, progress: bool, max_record_bytes: int) -> int:
    from tqdm import tqdm

    from matelike.data.formats import iter_pretrain_texts
    from matelike.data.records import BadRecordReport

    quiet = BadRecordReport(max_shown=0)  # the sampling pass reports them
    total = 0
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, disable=not progress,
              desc="counting", file=sys.stderr) as bar:
        for p in paths:
            for t in iter_pretrain_texts(p, field, quiet, max_record_bytes=max_record_bytes):
                total += len(t)
            bar.update(p.stat().st_size)
    return total


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 6400,
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    field: str = "text",
    heldout: Sequence[str | Path] = (),
    min_frequency: int = 2,
    seed: int = 0,
    progress: bool = True,
    log=None,
    max_record_bytes: int | None = None,
) -> Tokenizer:
    """Train the byte-level BPE on `inputs` and save it to `out_dir`.

    Memory is bounded by `max_chars`: when the corpus is larger, each document is kept with probability
    max_chars / total_chars (a seeded draw), so the sample is uniform over the whole input; the texts stream
    into the trainer and are never held at once. Without `heldout` files, about 1% of documents (at most 1M
    characters) are withheld from training to measure compression; the figures are printed to `log`
    (stderr by default) and saved in `out_dir/tokenizer_train.json`. A record over `max_record_bytes` (default
    `records.MAX_RECORD_BYTES`) is reported bad unparsed; ValueError when no usable text is left.
    """
    import numpy as np
    from tokenizers import pre_tokenizers, trainers
    from tqdm import tqdm

    from matelike.data.formats import iter_pretrain_texts
    from matelike.data.records import MAX_RECORD_BYTES, BadRecordReport, expand_inputs

    log = log if log is not None else sys.stderr
    max_record_bytes = max_record_bytes or MAX_RECORD_BYTES
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + special tokens + 1 merge)")
    paths = expand_inputs(inputs)
    heldout_paths = expand_inputs(heldout) if heldout else []
    total_bytes = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    # Characters never exceed bytes, so when the files are small enough no counting pass is needed.
    total_chars = total_bytes if total_bytes <= max_chars else _count_chars(paths, field, progress, max_record_bytes)
    keep_p = min(1.0, max_chars / max(total_chars, 1))
    hold_p = 0.0 if heldout_paths else min(0.01, HELDOUT_MAX_CHARS / max(total_chars, 1))
    rng = np.random.default_rng(seed)
    report = BadRecordReport(stream=log)
    held: list[str] = []
    held_chars = 0
    stats = {"docs": 0, "train_docs": 0, "train_chars": 0, "records": 0}

    def sample() -> Iterator[list[str]]:
        nonlocal held_chars
        batch: list[str] = []
        with tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, desc="sampling",
                  file=sys.stderr) as bar:
            for p in paths:
                counts: dict[str, int] = {}
                for text in iter_pretrain_texts(p, field, report, counts, max_record_bytes=max_record_bytes):
                    stats["docs"] += 1
                    r = rng.random()
                    if r < hold_p and held_chars < HELDOUT_MAX_CHARS:
                        held.append(text)
                        held_chars += len(text)
                    elif keep_p >= 1.0 or rng.random() < keep_p:
                        stats["train_docs"] += 1
                        stats["train_chars"] += len(text)
                        batch.append(text)
                        if len(batch) >= 1000:
                            yield batch
                            batch = []
                bar.update(p.stat().st_size)
                stats["records"] += counts.get("records", 0)
        if batch:
            yield batch

    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    if not stats["train_docs"]:
        raise ValueError(f"no usable text in {', '.join(map(str, paths))}: {stats['records']} records read, "
                         f"{stats['docs']} usable ({report.summary()}); nothing written")
    result = Tokenizer(tok)
    result.save(out_dir)

    if heldout_paths:
        quiet = BadRecordReport(max_shown=0)
        for p in heldout_paths:
            for text in iter_pretrain_texts(p, field, quiet, max_record_bytes=max_record_bytes):
                if held_chars >= HELDOUT_MAX_CHARS:
                    break
                held.append(text)
                held_chars += len(text)
    summary = {
        "vocab_size": result.vocab_size,
        "files": [str(p) for p in paths],
        "docs": stats["docs"],
        "train_docs": stats["train_docs"],
        "train_chars": stats["train_chars"],
        "sample_fraction": round(keep_p, 6),
        "max_chars": max_chars,
        "bad_records": report.total,
        "seconds": round(time.perf_counter() - t0, 2),
        "sha256": result.sha256,
    }
    if held:
        n_tokens = sum(len(ids) for ids in result.encode_batch(held))
        summary.update({
            "heldout_docs": len(held),
            "heldout_chars": held_chars,
            "chars_per_token": round(held_chars / max(n_tokens, 1), 4),
            "bytes_per_token": round(sum(len(t.encode("utf-8")) for t in held) / max(n_tokens, 1), 4),
        })
    Path(out_dir, "tokenizer_train.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n",
                                                     encoding="utf-8")
    if report.total:
        print(report.summary(), file=log)
    return result


def _cmd_train(args: argparse.Namespace) -> int:
    from matelike.data.records import DataFileError

    if args.vocab_size < MIN_VOCAB or args.max_chars < 1 or args.max_record_bytes < 1:
        print(f"error: --vocab-size must be at least {MIN_VOCAB}, --max-chars and --max-record-bytes positive",
              file=sys.stderr)
        return 2
    try:
        tok = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size, max_chars=args.max_chars,
                              field=args.field, heldout=args.heldout or (), seed=args.seed,
                              progress=not args.quiet, max_record_bytes=args.max_record_bytes)
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = json.loads(Path(args.out, "tokenizer_train.json").read_text(encoding="utf-8"))
    sampled = f", a {info['sample_fraction']:.2%} sample" if info["sample_fraction"] < 1 else ""
    print(f"trained vocab {tok.vocab_size} on {info['train_docs']} of {info['docs']} documents "
          f"({info['train_chars']} chars{sampled}) in {info['seconds']} s -> {args.out}")
    if "chars_per_token" in info:
        print(f"held-out ({info['heldout_docs']} docs): {info['chars_per_token']} chars/token, "
              f"{info['bytes_per_token']} bytes/token")
    return 0


def add_cli(table: "CommandTable") -> None:
    from matelike.data.records import MAX_RECORD_BYTES

    p = table.group_command("tokenizer", "train", "train the byte-level BPE tokenizer", _cmd_train,
                            group_help="tokenizer commands")
    p.add_argument("--input", nargs="+", required=True, help="jsonl/parquet/txt files or directories")
    p.add_argument("--out", required=True, help="output directory (Hugging Face tokenizer files)")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help="train on a uniform sample of at most about this many characters (bounds memory)")
    p.add_argument("--field", default="text", help="text field of jsonl/parquet records")
    p.add_argument("--heldout", nargs="+", help="files to measure compression on (default: 1%% withheld)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="a record (line, row) larger than this is reported bad and skipped unparsed (bounds memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
