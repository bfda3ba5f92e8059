"""Record layouts: pretraining text, SFT conversations and preference pairs, normalised to one shape each.

SFT records become a list of `{"role", "content"}` messages (optional system turn, then user/assistant
turns alternating, ending with an assistant turn). Preference records become `Preference(prompt, chosen,
rejected)` message lists, TRL's conversational layout. Any problem raises `RecordError(reason)`; the caller
turns it into a `PATH:LINE: reason` bad record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from matelike.data.records import BadRecordReport

ROLES = ("system", "user", "assistant")
# ShareGPT's `from` values mapped to our roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bot": "assistant"}
SFT_FORMATS = ("prompt_response", "alpaca", "messages")


class RecordError(ValueError):
    """A record that does not fit its layout; `reason` is the text after `PATH:LINE: `."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Preference:
    """One preference pair: shared prompt messages, then the chosen and the rejected continuation."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {"str": "string", "int": "number", "float": "number", "bool": "boolean", "list": "array",
            "dict": "object"}.get(type(v).__name__, type(v).__name__)


def _a_type(v: object) -> str:
    """'a string', 'an array', 'null', ... for error messages."""
    name = _type_name(v)
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _string(obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError(f"missing field: {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise RecordError(f"wrong type: field {key!r} is {_a_type(v)}, expected a string")
    if not allow_empty and not v.strip():
        raise RecordError(f"empty text: field {key!r}")
    return v


def pretrain_text(obj: dict, field: str = "text") -> str:
    """The document text of a pretraining record; raises RecordError when missing, not a string or empty."""
    return _string(obj, field)


def detect_sft_format(obj: dict) -> str:
    """Which SFT layout `obj` uses: 'messages', 'alpaca' or 'prompt_response'."""
    if "messages" in obj or "conversations" in obj:
        return "messages"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj or "response" in obj:
        return "prompt_response"
    raise RecordError("missing field: expected 'prompt'+'response', 'instruction'+'output', "
                      "or 'messages'/'conversations'")


def _system(obj: dict) -> list[dict[str, str]]:
    if obj.get("system") is None:
        return []
    s = obj["system"]
    if not isinstance(s, str):
        raise RecordError(f"wrong type: field 'system' is {_a_type(s)}, expected a string")
    return [{"role": "system", "content": s}] if s.strip() else []


def _history(obj: dict) -> list[dict[str, str]]:
    """BELLE/alpaca `history: [[user, assistant], ...]` earlier turns."""
    h = obj.get("history")
    if h is None:
        return []
    if not isinstance(h, list):
        raise RecordError(f"wrong type: field 'history' is {_a_type(h)}, expected an array of pairs")
    out: list[dict[str, str]] = []
    for i, pair in enumerate(h):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordError(f"wrong type: history[{i}] is not a pair of non-empty strings")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _message_list(value: object, key: str) -> list[dict[str, str]]:
    """Validate and normalise a list of {role, content} (or ShareGPT {from, value}) messages."""
    if not isinstance(value, list):
        raise RecordError(f"wrong type: field {key!r} is {_a_type(value)}, expected an array of messages")
    if not value:
        raise RecordError(f"empty text: field {key!r} has no messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"wrong type: {key}[{i}] is {_a_type(m)}, expected an object")
        if "role" in m:
            role, content = m["role"], m.get("content")
        elif "from" in m:
            role, content = SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"]), m.get("value")
        else:
            raise RecordError(f"missing field: {key}[{i}] has no 'role'")
        if role not in ROLES:
            raise RecordError(f"bad role: {key}[{i}] has role {role!r}, expected system, user or assistant")
        if content is None:
            raise RecordError(f"missing field: {key}[{i}] has no 'content'")
        if not isinstance(content, str):
            raise RecordError(f"wrong type: {key}[{i}].content is {_a_type(content)}, expected a string")
        if not content.strip():
            raise RecordError(f"empty text: {key}[{i}].content is empty")
        out.append({"role": role, "content": content})
    return out


def check_conversation(messages: list[dict[str, str]], *, need_final_assistant: bool = True) -> None:
    """Optional system first, then user/assistant alternating from a user turn (ending on assistant)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("empty text: conversation has no user turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError(f"bad turn order: turn {i + 1} is {m['role']!r}, expected {want!r}")
    if need_final_assistant and body[-1]["role"] != "assistant":
        raise RecordError("bad turn order: conversation does not end with an assistant turn")


def to_messages(obj: dict, fmt: str | None = None) -> list[dict[str, str]]:
    """Normalise an SFT record (`{prompt, response}`, alpaca, or messages/conversations) to chat messages."""
    fmt = fmt or detect_sft_format(obj)
    if fmt == "messages":
        key = "messages" if "messages" in obj else "conversations"
        if key not in obj:  # a forced format on a record of another layout
            raise RecordError("missing field: 'messages' or 'conversations'")
        msgs = _message_list(obj[key], key)
        if msgs[0]["role"] != "system":
            msgs = _system(obj) + msgs
    elif fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError(f"wrong type: field 'input' is {_a_type(extra)}, expected a string")
        user = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
        msgs = _system(obj) + _history(obj) + [{"role": "user", "content": user},
                                               {"role": "assistant", "content": _string(obj, "output")}]
    elif fmt == "prompt_response":
        msgs = _system(obj) + _history(obj) + [{"role": "user", "content": _string(obj, "prompt")},
                                               {"role": "assistant", "content": _string(obj, "response")}]
    else:
        raise ValueError(f"unknown SFT format {fmt!r}; expected one of {SFT_FORMATS}")
    check_conversation(msgs)
    return msgs


def _side(obj: dict, key: str) -> list[dict[str, str]]:
    if key not in obj or obj[key] is None:
        raise RecordError(f"missing field: {key!r}")
    v = obj[key]
    if isinstance(v, str):
        if not v.strip():
            raise RecordError(f"empty text: field {key!r}")
        return [{"role": "assistant", "content": v}]
    return _message_list(v, key)


def to_preference(obj: dict) -> Preference:
    """Normalise `{prompt, chosen, rejected}` (strings or message lists) to a Preference.

    Without a `prompt` field, chosen and rejected are whole conversations and the prompt is their common
    prefix (TRL's implicit-prompt layout).
    """
    chosen, rejected = _side(obj, "chosen"), _side(obj, "rejected")
    if obj.get("prompt") is None:
        if "prompt" in obj or not (isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list)):
            raise RecordError("missing field: 'prompt'")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise RecordError("missing field: 'prompt' (chosen and rejected share no prompt turns)")
    elif isinstance(obj["prompt"], str):
        prompt = _system(obj) + [{"role": "user", "content": _string(obj, "prompt")}]
    else:
        prompt = _message_list(obj["prompt"], "prompt")
    check_conversation(prompt, need_final_assistant=False)
    if prompt[-1]["role"] != "user":
        raise RecordError("bad turn order: prompt does not end with a user turn")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in side) or len(side) != 1:
            raise RecordError(f"bad turn order: {key!r} must be one assistant turn")
    if chosen == rejected:
        raise RecordError("identical pair: 'chosen' equals 'rejected'")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected)


def record_chars(obj: dict, kind: str, field: str = "text") -> int:
    """Validate `obj` as a `kind` ('pretrain', 'sft', 'dpo') record; returns its number of text characters."""
    if kind == "pretrain":
        return len(pretrain_text(obj, field))
    if kind == "sft":
        return sum(len(m["content"]) for m in to_messages(obj))
    if kind == "dpo":
        p = to_preference(obj)
        return sum(len(m["content"]) for m in p.prompt + p.chosen + p.rejected)
    raise ValueError(f"unknown record kind {kind!r}")


def guess_kind(obj: dict, field: str = "text") -> str:
    """Best guess of a record's kind from its keys: 'dpo', 'sft' or 'pretrain'."""
    if "chosen" in obj or "rejected" in obj:
        return "dpo"
    if field in obj:
        return "pretrain"
    try:
        detect_sft_format(obj)
        return "sft"
    except RecordError:
        return "pretrain"


def iter_pretrain_texts(path: str | Path, text_field: str, report: "BadRecordReport",
                        stats: dict[str, int] | None = None, *, max_record_bytes: int | None = None) -> Iterator[str]:
    """Document texts of one pretraining file, in order; bad records go to `report`.

    `stats`, when given, is updated with `records`, `documents` and `bad` counts. `max_record_bytes` caps one
    record (default `records.MAX_RECORD_BYTES`).
    """
    from matelike.data.records import MAX_RECORD_BYTES, ReadCounts, read_converted

    stats = stats if stats is not None else {}
    for key in ("records", "documents", "bad"):
        stats.setdefault(key, 0)
    counts = ReadCounts()
    base = {key: stats[key] for key in ("records", "documents", "bad")}

    def sync() -> None:  # per record, so a caller that stops reading early still gets true counts
        stats["records"] = base["records"] + counts.records
        stats["documents"] = base["documents"] + counts.good
        stats["bad"] = base["bad"] + counts.bad

    for _, _, text in read_converted(path, lambda rec: pretrain_text(rec, text_field), report, counts=counts,
                                     columns=[text_field], max_record_bytes=max_record_bytes or MAX_RECORD_BYTES):
        sync()
        yield text
    sync()
