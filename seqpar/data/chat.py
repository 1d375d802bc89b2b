"""The model's own chat template (``data.chat_template: hf``): render a conversation with the Jinja
template a Hugging Face tokenizer ships, and find which characters of it are trained on.

An instruct model was tuned in one exact chat format; fine-tuning it in another (seqpar's generic
per-message format) teaches it a second one. With ``hf`` a record's ``messages`` are rendered the way
``transformers``' ``apply_chat_template`` renders them (same sandboxed Jinja environment and
helpers), tokenized as one string, and the loss goes on what the model generates for each assistant
turn: from the end of the generation prompt through its end-of-turn token. Two ways to find that
text, in order:

- ``{% generation %}`` ... ``{% endgeneration %}`` blocks in the template (the convention of
  ``transformers``' ``return_assistant_tokens_mask`` and TRL's training templates): exactly those;
- otherwise by prefixes: assistant turn ``i`` is what ``render(messages[:i+1])`` adds to
  ``render(messages[:i], add_generation_prompt=True)``; both must be prefixes of the whole
  rendering, or the record is refused (templates that render earlier turns differently once later
  ones follow, e.g. Qwen3 dropping earlier reasoning, need a template with generation blocks).

A template is untrusted input like any file: it runs in Jinja's immutable sandbox. Rendering is a
pure function of the record: ``strftime_now`` renders a fixed date (so every rank and every rebuild
of the cache produce the same tokens); set it through ``data.chat_template_kwargs`` where the template
takes one (Llama 3's ``date_string``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seqpar.errors import DataError

# Unicode noncharacters: never assigned, so no real text holds them; they bracket generation blocks.
_MARK_START, _MARK_END = "\ufdd0", "\ufdd1"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What strftime_now renders: the date Llama 3's own template falls back to (a fixed date keeps
# tokenization a pure function of the data; today's date would differ between ranks and rebuilds).
FIXED_DATE = datetime.datetime(2024, 7, 26)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class ChatTemplate:
    """A compiled Jinja chat template and the variables it is rendered with."""

    source: str  # the template text
    origin: str  # where it came from, for messages ("<dir>/tokenizer_config.json")
    context: dict[str, Any] = field(default_factory=dict)  # special tokens + data.chat_template_kwargs

    def __post_init__(self) -> None:
        self.marked = bool(_GENERATION_TAG.search(self.source))
        self._template = _compile(self.source, self.origin)

    @property
    def digest(self) -> str:
        """Identifies what rendering depends on (keys the tokenized-data cache)."""
        blob = json.dumps({"source": self.source, "context": self.context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               tools: Any = None) -> str:
        """The template's text for ``messages`` (generation blocks still marked)."""
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     tools=tools, **self.context)

    def trained_spans(self, messages: list[dict[str, Any]], where: str,
                      tools: Any = None) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the rendered conversation and the ``[start, end)`` character ranges the
        loss goes on. Template errors and inconsistent renderings raise ``DataError`` naming ``where``."""
        _refuse_marks(messages, where)
        if self.marked:
            return _unmark(self._checked_render(where, messages, tools=tools), where, self.origin)
        full = self._checked_render(where, messages, tools=tools)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self._checked_render(where, messages[:i], add_generation_prompt=True, tools=tools)
            upto = self._checked_render(where, messages[: i + 1], tools=tools)
            if not (upto.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                raise DataError(
                    f"{where}: the chat template ({self.origin}) renders messages[{i}] (assistant) "
                    f"differently once later messages follow (Qwen3's drops earlier reasoning, for one), "
                    f"so its trained text cannot be found by prefixes: set data.chat_template_file to a "
                    f"template whose assistant text is in {{% generation %}} blocks (TRL ships such "
                    f"templates), or give each assistant turn a record of its own")
            spans.append((len(before), len(upto)))
        return full, spans

    def _checked_render(self, where: str, messages: Sequence[dict[str, Any]], **kw: Any) -> str:
        """``render``; the template's own refusals (``raise_exception``, a missing field) name ``where``."""
        try:
            return self.render(messages, **kw)
        except DataError:
            raise
        except _template_errors() as e:
            raise DataError(f"{where}: the chat template ({self.origin}) refused this record: "
                            f"{' '.join(str(e).split())}") from None


def token_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose characters ``offsets[k] = [start, end)`` overlap a trained span (a token
    straddling a span's edge is trained, as ``transformers``' assistant mask counts it)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        mask |= ((starts < b) & (ends > a)).astype(np.uint8)
    return mask


def load_chat_template(tokenizer_path: Path, template_file: Path | None,
                       kwargs: dict[str, Any], found_specials: dict[str, str | None]) -> ChatTemplate:
    """The template of ``data.chat_template_file``, else the one beside ``data.tokenizer``
    (``chat_template.jinja``, then ``tokenizer_config.json``'s ``chat_template``), with the special
    tokens of ``tokenizer_config.json`` (falling back to ``found_specials``) and ``kwargs``."""
    side = _read_side_config(tokenizer_path.with_name("tokenizer_config.json"))
    if template_file is not None:
        source, origin = _read_text(template_file, "data.chat_template_file"), str(template_file)
    else:
        source, origin = _template_beside(tokenizer_path, side)
    context: dict[str, Any] = {}
    for key in _SPECIAL_KEYS:
        value = side.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if not isinstance(value, str):
            value = found_specials.get(key)
        if value is not None:
            context[key] = value
    context.update(kwargs)
    return ChatTemplate(source, origin, context)


def tokenizer_has_template(tokenizer_path: Path) -> bool:
    """Whether ``data.chat_template: hf`` would find a template beside this tokenizer file."""
    if tokenizer_path.with_name("chat_template.jinja").is_file():
        return True
    side = _read_side_config(tokenizer_path.with_name("tokenizer_config.json"))
    return bool(side.get("chat_template"))


# -- internals -------------------------------------------------------------------------------------
def _template_errors() -> tuple[type[BaseException], ...]:
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def _compile(source: str, origin: str) -> Any:
    """The template compiled in the sandboxed environment ``transformers`` renders chat templates in."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # torch depends on jinja2, so this is a broken environment
        raise DataError("data.chat_template hf needs the jinja2 package: pip install jinja2") from None

    class GenerationMarks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: brackets the block's output with marks."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            return _MARK_START + caller() + _MARK_END

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes (<, >, &, '): chat templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationMarks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = FIXED_DATE.strftime
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"chat template {origin}: Jinja syntax error on line {e.lineno}: {e.message}") from None


def _unmark(text: str, where: str, origin: str) -> tuple[str, list[tuple[int, int]]]:
    """Removes generation marks; returns the clean text and the marked spans."""
    parts = re.split(f"([{_MARK_START}{_MARK_END}])", text)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, None
    for part in parts:
        if part == _MARK_START:
            if start is not None:
                raise DataError(f"chat template {origin}: a {{% generation %}} block inside another one")
            start = pos
        elif part == _MARK_END:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            out.append(part)
            pos += len(part)
    if not spans:
        raise DataError(f"{where}: the chat template ({origin}) put no text of this record in a "
                        f"{{% generation %}} block: it has nothing to train on (is there an assistant message?)")
    return "".join(out), spans


def _refuse_marks(value: Any, where: str) -> None:
    """The two mark characters may not occur in the data (they would fake a trained span)."""
    if isinstance(value, str):
        if _MARK_START in value or _MARK_END in value:
            raise DataError(f"{where}: the record holds U+FDD0 or U+FDD1 (Unicode noncharacters, reserved "
                            f"by seqpar to mark trained text): remove them from the data")
    elif isinstance(value, dict):
        for v in value.values():
            _refuse_marks(v, where)
    elif isinstance(value, list):
        for v in value:
            _refuse_marks(v, where)


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read '{path}' ({getattr(e, 'strerror', None) or e})") from None


def _read_side_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.chat_template hf: cannot read '{path}' ({' '.join(str(e).split())}): "
                        f"it must be the tokenizer's JSON config") from None
    return data if isinstance(data, dict) else {}


def _template_beside(tokenizer_path: Path, side: dict[str, Any]) -> tuple[str, str]:
    jinja_file = tokenizer_path.with_name("chat_template.jinja")
    if jinja_file.is_file():  # newer transformers save it on its own; it wins, as there
        return _read_text(jinja_file, "data.chat_template hf"), str(jinja_file)
    config = tokenizer_path.with_name("tokenizer_config.json")
    template = side.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataError(f"data.chat_template hf: {config} has named chat templates "
                            f"({', '.join(map(str, named))}) but no 'default': save the one to train with "
                            f"as a file and set data.chat_template_file to it")
        template = named["default"]
    if not isinstance(template, str) or not template:
        raise DataError(f"data.chat_template hf: no chat template beside data.tokenizer '{tokenizer_path}' "
                        f"(looked for chat_template.jinja and 'chat_template' in tokenizer_config.json): "
                        f"set data.chat_template_file to the model's Jinja template, or set "
                        f"data.chat_template to a per-message format")
    return template, str(config)
