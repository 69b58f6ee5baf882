"""Turn one raw row of a known format into the conversations or pairs schema, or say why not.

Conversations: `id, origin, messages[{role, content, tool_calls}], tools` with roles system, user,
assistant, tool; tool calls in the OpenAI shape `{type: function, function: {name, arguments}}` with
`arguments` a JSON string, `tools` a JSON string of the tool schemas.
Pairs: `id, origin, src_lang, tgt_lang, src, tgt`.

A normalizer returns a dict, or raises Reject(reason, detail): the row goes to the quarantine with it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hala.kit import languages
from stages.prepare.config import PrepareConfig

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
    "function_call": "tool_call",
}


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _text(value: Any, where: str) -> str:
    if value is None:
        raise Reject("missing_field", f"{where} is missing")
    if not isinstance(value, str):
        raise Reject("invalid_type", f"{where} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Reject("invalid_utf8", f"{where}: bytes that are not UTF-8 at character {e.start}") from None
    return value


def _get(row: dict[str, Any], key: str | int | None, where: str, required: bool = True) -> Any:
    if key is None:
        return None
    if key not in row:
        if required:
            raise Reject(
                "missing_field", f"no field {key!r} ({where}); the row has {sorted(map(str, row))[:12]}"
            )
        return None
    return row[key]


def _msg(role: str, content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": tool_calls}


def _tool_call(value: Any, where: str) -> dict[str, Any]:
    """A ShareGPT function_call value or an OpenAI tool call, as {type, function: {name, arguments: JSON
    text}}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Reject("invalid_tool_call", f"{where}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise Reject("invalid_tool_call", f"{where}: a tool call is an object with name and arguments")
    fn = value.get("function", value)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise Reject("invalid_tool_call", f"{where}: the tool call has no name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError as e:
            raise Reject("invalid_tool_call", f"{where}: arguments are not JSON ({e.msg})") from None
        args_text = args
    else:
        args_text = json.dumps(args, ensure_ascii=False)
    return {"type": "function", "function": {"name": name, "arguments": args_text}}


def _tools(value: Any) -> str | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            raise Reject("invalid_tool_call", f"tools: not JSON ({e.msg})") from None
        return value
    return json.dumps(value, ensure_ascii=False)


def _check_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise Reject("no_turns", "the conversation has no turns")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise Reject("misplaced_system", f"turn {i} is a system turn; only the first may be")
        if not m["content"].strip() and not m["tool_calls"]:
            raise Reject("empty_turn", f"turn {i} ({m['role']}) is empty")
    roles = {m["role"] for m in messages}
    for needed in ("user", "assistant"):
        if needed not in roles:
            raise Reject("missing_turn", f"no {needed} turn")
    return messages


def _system(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    """The optional system turn; an empty system prompt (common in OpenOrca) is left out, not an error."""
    system = _get(row, cfg.field("system"), "system", required=False)
    if system is not None and _text(system, "system").strip():
        return [_msg("system", system)]
    return []


def _single_turn(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    """Formats with one user and one assistant turn in fixed fields: openorca, qa, columns."""
    messages = _system(row, cfg)
    user = _text(_get(row, cfg.field("user"), "user"), f"field {cfg.field('user')!r}")
    extra = _get(row, cfg.field("input"), "input", required=False)
    if extra is not None and _text(extra, f"field {cfg.field('input')!r}").strip():
        user = f"{user}\n\n{extra}"
    messages.append(_msg("user", user))
    messages.append(
        _msg(
            "assistant",
            _text(_get(row, cfg.field("assistant"), "assistant"), f"field {cfg.field('assistant')!r}"),
        )
    )
    return messages


def _alpaca(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    """instruction (+ input) -> output; LLaMA-Factory's `history` of [user, assistant] pairs comes first."""
    messages = _system(row, cfg)
    history = _get(row, cfg.field("history"), "history", required=False) or []
    if not isinstance(history, list):
        raise Reject("invalid_type", "history is not a list of [user, assistant] pairs")
    for i, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise Reject("invalid_type", f"history[{i}] is not a [user, assistant] pair")
        messages.append(_msg("user", _text(turn[0], f"history[{i}][0]")))
        messages.append(_msg("assistant", _text(turn[1], f"history[{i}][1]")))
    instruction = _text(_get(row, cfg.field("instruction"), "instruction"), "instruction")
    extra = _get(row, cfg.field("input"), "input", required=False)
    if extra is not None and _text(extra, "input").strip():
        instruction = f"{instruction}\n\n{extra}"
    messages.append(_msg("user", instruction))
    messages.append(_msg("assistant", _text(_get(row, cfg.field("output"), "output"), "output")))
    return messages


def _sharegpt(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    turns = _get(row, cfg.field("conversations"), "conversations")
    if not isinstance(turns, list):
        raise Reject("invalid_type", "conversations is not a list of turns")
    roles = {**ROLES, **cfg.roles}
    messages = _system(row, cfg)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Reject("invalid_type", f"turn {i} is not an object with from and value")
        who = turn.get("from", turn.get("role"))
        role = roles.get(who) if isinstance(who, str) else None
        if role is None:
            raise Reject(
                "unknown_role", f"turn {i}: from={who!r}; map it with config roles, e.g. {{{who}: assistant}}"
            )
        value = turn.get("value", turn.get("content"))
        if role == "tool_call":
            messages.append(_msg("assistant", "", [_tool_call(value, f"turn {i}")]))
        else:
            messages.append(_msg(role, _text(value, f"turn {i} value")))
    return messages


def _content(value: Any, where: str) -> str:
    """OpenAI content: text, or a list of parts of which only text parts are kept (and must be all)."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Reject(
                    "unsupported_content", f"{where}: a {kind!r} part; only text is translated and trained on"
                )
            texts.append(_text(part.get("text"), where))
        return "".join(texts)
    if value is None:
        return ""
    return _text(value, where)


def _messages(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    turns = _get(row, cfg.field("messages"), "messages")
    if not isinstance(turns, list):
        raise Reject("invalid_type", "messages is not a list")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise Reject("invalid_type", f"message {i} is not an object with role and content")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise Reject(
                "unknown_role", f"message {i}: role={role!r}; expected system, user, assistant or tool"
            )
        calls = m.get("tool_calls") or None
        if calls is not None:
            if not isinstance(calls, list):
                raise Reject("invalid_tool_call", f"message {i}: tool_calls is not a list")
            calls = [_tool_call(c, f"message {i} tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(_msg(role, _content(m.get("content"), f"message {i} content"), calls))
    return out


def _lima(row: dict[str, Any], cfg: PrepareConfig) -> list[dict[str, Any]]:
    """GAIR/lima: `conversations` is a list of strings, alternating user and assistant."""
    turns = _get(row, cfg.field("conversations"), "conversations")
    if not isinstance(turns, list):
        raise Reject("invalid_type", "conversations is not a list of strings")
    return [_msg("user" if i % 2 == 0 else "assistant", _text(t, f"turn {i}")) for i, t in enumerate(turns)]


CONVERSATION_FORMATS = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "openorca": _single_turn,
    "qa": _single_turn,
    "columns": _single_turn,
    "lima": _lima,
}


def conversation(row: Any, cfg: PrepareConfig) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(row, dict):
        raise Reject("not_a_record", f"a {type(row).__name__}, not an object")
    messages = _check_turns(CONVERSATION_FORMATS[cfg.format](row, cfg))
    tools = _tools(_get(row, cfg.field("tools"), "tools", required=False)) if cfg.field("tools") else None
    return messages, tools


# --- pairs ---------------------------------------------------------------------------------------------


def script_ok(text: str, lang: str, other: str) -> bool:
    """Is `text` written in the script of `lang` rather than `other`'s? Text with no letters (numbers,
    symbols) passes, and so does any text when the two share a script; a side in a non-Latin script may carry
    Latin names and terms (at least a fifth of its letters its own), a Latin side mostly not the other's."""
    share = languages.script_share(text, lang, other)
    if share is None:
        return True
    return share >= 0.5 if "Latin" in languages.get(lang).scripts else share >= 0.2


def pair(row: Any, cfg: PrepareConfig) -> tuple[str, str]:
    """(src, tgt) of one pair row, in the config's direction."""
    first, second = cfg.input_langs
    if cfg.format == "aligned_text":
        a, b = row  # (source side, target side): text lines or table rows
        if isinstance(a, dict):
            a = _get(a, cfg.field("src"), "src")
        if isinstance(b, dict):
            b = _get(b, cfg.field("tgt"), "tgt")
        sides = {first: _text(a, "source side"), second: _text(b, "target side")}
    elif cfg.format == "translation":
        if not isinstance(row, dict):
            raise Reject("not_a_record", f"a {type(row).__name__}, not an object")
        tr = _get(row, cfg.field("translation"), "translation")
        if not isinstance(tr, dict):
            raise Reject("invalid_type", "translation is not an object keyed by language")
        sides = {
            lang: _text(_get(tr, lang, f"translation.{lang}"), f"translation.{lang}")
            for lang in (cfg.src_lang, cfg.tgt_lang)
        }
    else:  # pairs: a table
        if not isinstance(row, dict):
            raise Reject("not_a_record", f"a {type(row).__name__}, not an object")
        if cfg.field("src") is not None or cfg.field("tgt") is not None:
            sides = {
                cfg.src_lang: _text(_get(row, cfg.field("src"), "src"), f"field {cfg.field('src')!r}"),
                cfg.tgt_lang: _text(_get(row, cfg.field("tgt"), "tgt"), f"field {cfg.field('tgt')!r}"),
            }
        elif cfg.src_lang in row and cfg.tgt_lang in row:
            sides = {lang: _text(row[lang], f"field {lang!r}") for lang in (cfg.src_lang, cfg.tgt_lang)}
        elif 0 in row and 1 in row:
            sides = {first: _text(row[0], "column 0"), second: _text(row[1], "column 1")}
        else:
            raise Reject(
                "missing_field",
                f"no {cfg.src_lang!r}/{cfg.tgt_lang!r} columns; name them with config columns {{src: ..., "
                f"tgt: ...}}",
            )
    if cfg.src_lang not in sides or cfg.tgt_lang not in sides:
        raise Reject(
            "missing_field", f"the input holds {sorted(sides)}, not {cfg.src_lang} and {cfg.tgt_lang}"
        )
    src, tgt = sides[cfg.src_lang].strip(), sides[cfg.tgt_lang].strip()
    if not src or not tgt:
        raise Reject("empty_text", "src is empty" if not src else "tgt is empty")
    if cfg.check_script:
        for text, lang, other, side in (
            (src, cfg.src_lang, cfg.tgt_lang, "src"),
            (tgt, cfg.tgt_lang, cfg.src_lang, "tgt"),
        ):
            if not script_ok(text, lang, other):
                raise Reject("wrong_script", f"{side} is not written in the script of {lang!r}")
    return src, tgt


# --- filters --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```|~~~|<code>|<pre>", re.IGNORECASE)
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|public |private |static |function |var |let |const |"
    r"return\b|if\s*\(|for\s*\(|while\s*\(|SELECT |CREATE TABLE|<\?php|\$ |>>> )|[;{}]\s*$"
)


def has_code(messages: list[dict[str, Any]]) -> bool:
    """Heuristic: a fenced block, an HTML code tag, or three or more code-like lines in one turn."""
    for m in messages:
        text = m["content"]
        if _FENCE.search(text):
            return True
        if sum(1 for line in text.splitlines() if _CODE_LINE.search(line)) >= 3:
            return True
    return False
