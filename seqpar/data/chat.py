"""The model's own chat template (``data.chat_template: hf``): render a conversation with the Jinja
template a Hugging Face tokenizer ships, and find which characters of it are trained on.

An instruct model was tuned in one exact chat format; fine-tuning it in another (seqpar's generic
per-message format) teaches it a second one. With ``hf`` a record is rendered the way
``transformers``' ``apply_chat_template`` renders it (the same sandboxed Jinja environment and
helpers, the same special-token variables, messages normalised the same way: keys holding null
dropped, reasoning found under ``reasoning_content``, ``thinking`` or ``reasoning`` given as both
``reasoning_content`` and ``thinking``), tokenized as one string, and the loss goes on what the model generates for each assistant
turn: from the end of the generation prompt through its end-of-turn token. Two ways to find that
text, in order:

- ``{% generation %}`` ... ``{% endgeneration %}`` blocks in the template (the convention of
  ``transformers``' ``return_assistant_tokens_mask`` and TRL's training templates): exactly those;
  one rendering per record;
- otherwise by prefixes: assistant turn ``i`` is what ``render(messages[:i+1])`` adds to
  ``render(messages[:i], add_generation_prompt=True)``; both must be prefixes of the whole
  rendering, or the record is refused (templates that render earlier turns differently once later
  ones follow, e.g. Qwen3 dropping earlier reasoning, need a template with generation blocks). Two
  renderings per assistant turn: quadratic in the turns of a record.

A template is untrusted input like any file: it runs in Jinja's immutable sandbox, with
``transformers``' hardening (jinja2 >= 3.1.6, no underscore names on a ``namespace``, a ``dict``
that is only a constructor). Rendering is a pure function of the record: ``strftime_now`` renders
a fixed date, so every rank and every rebuild of the cache produce the same tokens.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import keyword
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seqpar.errors import DataError

# Bump when rendering changes for the same template and record (keys the tokenized-data cache).
RENDER_VERSION = 2
# Unicode noncharacters: never assigned, so no real text holds them; they bracket generation blocks.
_MARK_START, _MARK_END = "\ufdd0", "\ufdd1"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What strftime_now renders: the date Llama 3's own template falls back to (a fixed date keeps
# tokenization a pure function of the data; today's date would differ between ranks and rebuilds).
FIXED_DATE = datetime.datetime(2024, 7, 26)
# The special-token variables transformers gives a template (its special_tokens_map; v5).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A message's reasoning, by the names datasets use; templates read the first (gpt-oss: "thinking").
_REASONING = ("reasoning_content", "thinking", "reasoning")
_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes


@dataclass
class ChatTemplate:
    """A compiled Jinja chat template (and a ``tool_use`` one for records with tools, when the
    tokenizer names one), and the variables it is rendered with."""

    source: str  # the template text
    origin: str  # where it came from, for messages ("<dir>/tokenizer_config.json")
    context: dict[str, Any] = field(default_factory=dict)  # special tokens + data.chat_template_kwargs
    tool_source: str | None = None  # transformers' choice for records with tools, when present

    def __post_init__(self) -> None:
        self._compiled = {False: _compile(self.source, self.origin)}
        if self.tool_source is not None:
            self._compiled[True] = _compile(self.tool_source, f"{self.origin} (tool_use)")

    @property
    def digest(self) -> str:
        """Identifies what rendering depends on (keys the tokenized-data cache and the data fingerprint)."""
        blob = json.dumps({"version": RENDER_VERSION, "source": self.source, "tool_source": self.tool_source,
                           "context": self.context}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None) -> str:
        """The template's text for ``messages`` (normalised; generation blocks still marked)."""
        template = self._compiled[tools is not None and self.tool_source is not None]
        return template.render(messages=normalise(messages), add_generation_prompt=add_generation_prompt,
                               tools=tools, documents=documents, **self.context)

    def marked(self, tools: list[dict[str, Any]] | None) -> bool:
        source = self.tool_source if tools is not None and self.tool_source is not None else self.source
        return bool(_GENERATION_TAG.search(source))

    def trained_spans(self, messages: list[dict[str, Any]], where: str, tools: list[dict[str, Any]] | None = None,
                      documents: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the rendered conversation and the ``[start, end)`` character ranges the
        loss goes on. Template errors and inconsistent renderings raise ``DataError`` naming ``where``."""
        _refuse_marks([messages, tools, documents], where)
        kw = {"tools": tools, "documents": documents}
        if self.marked(tools):
            return _unmark(self._checked_render(where, messages, **kw), where, self.origin)
        full = self._checked_render(where, messages, **kw)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            at = f"{where}: messages[{i}] (assistant)"
            fix = (f"set data.chat_template_file to a template whose assistant text is in {{% generation %}} "
                   f"blocks (TRL ships such templates)")
            try:
                before = self.render(messages[:i], add_generation_prompt=True, **kw)
            except _template_errors() as e:
                if i == 0:  # most templates read messages[0]
                    raise DataError(f"{at}: the chat template ({self.origin}) cannot render the generation prompt "
                                    f"of a conversation that starts with the assistant ({_one_line(e)}): start "
                                    f"the record with a user (or system) message, or {fix}") from None
                raise self._refused(where, e, messages) from None
            upto = self._checked_render(where, messages[: i + 1], **kw)
            if not upto.startswith(before):
                raise DataError(f"{at}: the chat template ({self.origin}) renders this reply without the "
                                f"generation prompt it prompts with (it differs at {_differ(before, upto)}; "
                                f"templates that strip reasoning from replies do this): {fix}")
            if not full.startswith(upto):
                raise DataError(f"{at}: the chat template ({self.origin}) renders this reply differently once "
                                f"later messages follow (it differs at {_differ(upto, full)}; Qwen3's drops "
                                f"earlier reasoning, for one), so its trained text cannot be found by "
                                f"prefixes: {fix}, or give each assistant turn a record of its own")
            if len(upto) == len(before):
                raise DataError(f"{at}: the chat template ({self.origin}) renders nothing for this reply after "
                                f"the generation prompt: there is nothing to train on in it")
            spans.append((len(before), len(upto)))
        return full, spans

    def _checked_render(self, where: str, messages: Sequence[dict[str, Any]], **kw: Any) -> str:
        """``render``; the template's own refusals (``raise_exception``, a missing field) name ``where``."""
        try:
            return self.render(messages, **kw)
        except _template_errors() as e:
            raise self._refused(where, e, messages) from None

    def _refused(self, where: str, e: BaseException, messages: Sequence[dict[str, Any]] = ()) -> DataError:
        bare = [i for i, m in enumerate(normalise(messages)) if "content" not in m]
        hint = (f" (messages[{bare[0]}] has no content: keys holding null are dropped, as transformers drops "
                f"them)" if bare else "")
        return DataError(f"{where}: the chat template ({self.origin}) refused this record: {_one_line(e)}{hint}")


def normalise(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as ``transformers`` hands them to a template: keys holding null dropped (OpenAI
    exports write ``"tool_calls": null``, which templates would render as "None" or fail on), and
    a reasoning text given under each of its names (``thinking`` first, ``reasoning_content``)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


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


def load_chat_template(tokenizer_path: Path, template_file: Path | None, kwargs: dict[str, Any]) -> ChatTemplate:
    """The template of ``data.chat_template_file``, else the one beside ``data.tokenizer``
    (``chat_template.jinja``, then ``tokenizer_config.json``'s ``chat_template``), rendered with the
    special tokens ``transformers`` would load from that folder and ``kwargs``."""
    if template_file is not None:
        source, origin, tool_source = _read_text(template_file, "data.chat_template_file"), str(template_file), None
    else:
        source, origin, tool_source = _template_beside(tokenizer_path)
    context: dict[str, Any] = {**special_tokens(tokenizer_path), **kwargs}
    chat = ChatTemplate(source, origin, context, tool_source)
    # A folder without any tokenizer config says nothing of its special tokens (one that leaves a
    # token unset means it: the template then renders it as empty, as in transformers).
    told = any(tokenizer_path.with_name(n).is_file() for n in ("tokenizer_config.json", "special_tokens_map.json"))
    missing = [] if told else [v for v in _variables(source) if v in SPECIAL_TOKENS and v not in context]
    if missing:
        raise DataError(f"chat template {origin} uses {', '.join(missing)}, but there is no tokenizer_config.json "
                        f"(or special_tokens_map.json) beside data.tokenizer '{tokenizer_path}' to set it: set "
                        f"data.chat_template_kwargs: {{{missing[0]}: '<the token>'}}")
    return chat


def special_tokens(tokenizer_path: Path) -> dict[str, str]:
    """The special-token strings ``transformers`` loads from the tokenizer's folder: those of
    ``tokenizer_config.json``, overridden by a legacy ``special_tokens_map.json`` (read only when the
    config has no ``added_tokens_decoder``, as there); null means unset."""
    config = _read_json(tokenizer_path.with_name("tokenizer_config.json"))
    found: dict[str, Any] = {k: config.get(k) for k in SPECIAL_TOKENS}
    legacy = tokenizer_path.with_name("special_tokens_map.json")
    if "added_tokens_decoder" not in config and legacy.is_file():
        found.update({k: v for k, v in _read_json(legacy).items() if k in SPECIAL_TOKENS})
    out = {}
    for key, value in found.items():
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def template_for_export(tokenizer_path: Path, chat_template: str, template_file: Path | None,
                        sft: bool, kwargs: dict[str, Any] | None = None) -> str | list[dict[str, str]] | None:
    """The chat template a checkpoint's tokenizer carries (so an exported model still renders
    chats): the one an ``hf`` run trained with (with its ``tool_use`` sibling, as named templates),
    with the run's ``data.chat_template_kwargs`` as its defaults; else, for runs that do not train
    on chats, the tokenizer's own (the model's format, untouched). None for the per-message
    format, which a Jinja template of the tokenizer would misdescribe."""
    if chat_template != "hf" and (sft or not tokenizer_has_template(tokenizer_path)):
        return None
    trained = kwargs if chat_template == "hf" else None
    if template_file is not None and chat_template == "hf":
        return with_defaults(_read_text(template_file, "data.chat_template_file"), trained)
    try:
        source, _, tool_source = _template_beside(tokenizer_path)
    except DataError:
        if chat_template == "hf":
            raise
        return None  # the tokenizer's own template is only carried along: a broken one is left behind
    if tool_source is None:
        return with_defaults(source, trained)
    return [{"name": "default", "template": with_defaults(source, trained)},
            {"name": "tool_use", "template": with_defaults(tool_source, trained)}]


def with_defaults(source: str, kwargs: dict[str, Any] | None) -> str:
    """``source`` preceded by one ``{% set %}`` per variable of ``kwargs`` that the caller has not
    passed: an exported model renders chats as it was trained (``enable_thinking: false``) without
    its users knowing the run's settings, and a variable passed to ``apply_chat_template`` still
    wins. Names a template cannot refer to (not identifiers) cannot change its output: left out."""
    lines = []
    for key, value in (kwargs or {}).items():
        if key.isidentifier() and not keyword.iskeyword(key) and key not in _JINJA_WORDS:
            lines.append(f"{{%- if {key} is not defined %}}{{%- set {key} = {_literal(value)} %}}{{%- endif %}}")
    if not lines:
        return source
    return ("{#- seqpar: the data.chat_template_kwargs this model was trained with, as defaults -#}\n"
            + "\n".join(lines) + source)


# Words Jinja's parser reads as literals or operators: not variable names
_JINJA_WORDS = frozenset({"true", "false", "none", "and", "or", "not", "in", "is", "if", "else"})


def _literal(value: Any) -> str:
    """A Jinja literal for a JSON value (``data.chat_template_kwargs`` holds JSON values only)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)  # Jinja reads Python's escapes; a quoted '%}' does not close the tag (tested)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(str(k))}: {_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a JSON value: {value!r}")  # config validation refuses these first


def tokenizer_has_template(tokenizer_path: Path) -> bool:
    """Whether ``data.chat_template: hf`` would find a template beside this tokenizer file (an
    unreadable tokenizer_config.json counts as none: only hf runs need it)."""
    if tokenizer_path.with_name("chat_template.jinja").is_file():
        return True
    try:
        return bool(_read_json(tokenizer_path.with_name("tokenizer_config.json")).get("chat_template"))
    except DataError:
        return False


# -- internals -------------------------------------------------------------------------------------
def _template_errors() -> tuple[type[BaseException], ...]:
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _differ(a: str, b: str) -> str:
    """Where two renderings part: the character offset and a few characters of each."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"character {k}: {a[k:k + 24]!r} vs {b[k:k + 24]!r}"


def _variables(source: str) -> set[str]:
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=[_generation_extension(), "jinja2.ext.loopcontrols"])
    return set(jinja2.meta.find_undeclared_variables(env.parse(source)))


def _generation_extension() -> type:
    import jinja2.ext
    from jinja2 import nodes

    class GenerationMarks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: brackets the block's output with marks."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            return _MARK_START + caller() + _MARK_END

    return GenerationMarks


def _compile(source: str, origin: str) -> Any:
    """The template compiled in the sandboxed environment ``transformers`` renders chat templates in."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.utils
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # torch depends on jinja2, so this is a broken environment
        raise DataError("data.chat_template hf needs the jinja2 package: pip install 'jinja2>=3.1.6'") from None
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise DataError(f"data.chat_template hf needs jinja2 >= 3.1.6 (older versions have known sandbox escapes, "
                        f"and a template is untrusted input); this has {jinja2.__version__}: pip install -U jinja2")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes (<, >, &, '): chat templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names (no path to Python internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class Dict:
        """``dict(...)`` and ``dict.fromkeys(...)`` and nothing else of the type."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = FIXED_DATE.strftime
    env.globals["namespace"] = Namespace
    env.globals["dict"] = Dict()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"chat template {origin}: Jinja syntax error on line {e.lineno}: {e.message} (fix the "
                        f"template, or set data.chat_template_file to a corrected copy)") from None


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
    """The two mark characters may not occur in a record (they would fake a trained span)."""
    if isinstance(value, str):
        if _MARK_START in value or _MARK_END in value:
            raise DataError(f"{where}: the record holds U+FDD0 or U+FDD1 (Unicode noncharacters, reserved "
                            f"by seqpar to mark trained text): remove them from the data")
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_marks(k, where)
            _refuse_marks(v, where)
    elif isinstance(value, list):
        for v in value:
            _refuse_marks(v, where)


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read '{path}' ({getattr(e, 'strerror', None) or e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.chat_template hf: cannot read '{path}' ({_one_line(e)}): it must be the "
                        f"tokenizer's JSON config") from None
    return data if isinstance(data, dict) else {}


def _template_beside(tokenizer_path: Path) -> tuple[str, str, str | None]:
    """(default template, where it is, tool_use template or None) from the tokenizer's folder, found
    as ``transformers`` finds them: ``chat_template.jinja`` (+ ``additional_chat_templates/``)
    first, then ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates)."""
    folder = tokenizer_path.parent
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        tool = folder / "additional_chat_templates" / "tool_use.jinja"
        return (_read_text(jinja_file, "data.chat_template hf"), str(jinja_file),
                _read_text(tool, "data.chat_template hf") if tool.is_file() else None)
    config = folder / "tokenizer_config.json"
    template = _read_json(config).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataError(f"data.chat_template hf: {config} has named chat templates "
                            f"({', '.join(map(str, named))}) but no 'default': save the one to train with "
                            f"as a file and set data.chat_template_file to it")
        return named["default"], str(config), named.get("tool_use")
    if not isinstance(template, str) or not template:
        raise DataError(f"data.chat_template hf: no chat template beside data.tokenizer '{tokenizer_path}' "
                        f"(looked for chat_template.jinja and 'chat_template' in tokenizer_config.json): "
                        f"set data.chat_template_file to the model's Jinja template, or set "
                        f"data.chat_template to a per-message format")
    return template, str(config), None
