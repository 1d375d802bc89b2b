"""data.chat_template: hf (seqpar/data/chat.py): conversations rendered by the model's own Jinja
template, token for token as ``transformers``' ``apply_chat_template``, the loss on exactly the
assistant text ``transformers``' assistant mask marks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_data import check_invariants, make_hf_tokenizer, split_docs, write_jsonl

from seqpar.config import ConfigError, DataConfig
from seqpar.data import build_dataset
from seqpar.data.chat import load_chat_template, token_mask
from seqpar.data.packing import IGNORE_INDEX
from seqpar.data.sources import SFTDataset
from seqpar.data.tokenizer import ByteTokenizer, HFTokenizer
from seqpar.engine.resume import check_data_unchanged
from seqpar.errors import DataError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

# Qwen2.5's ChatML layout (default system message), without tools.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>\\n' }}{% endgeneration %}\n"
    "{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
# Llama 3.1's layout: bos, a dated system header (strftime_now when defined), trimmed contents.
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '1 Jan 1999' %}{%- endif %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + 'Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role not in ['user', 'assistant'] %}{{- raise_exception('roles are user and assistant') }}{%- endif %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.role == 'assistant' %}{% generation %}{{- message['content']|trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content']|trim + '<|eot_id|>' }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)
# Qwen3's layout: the assistant turns after the last user message carry a <think> block, earlier
# ones lose theirs (so prefixes cannot find the trained text of a multi-turn conversation).
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if loop.index0 > ns.last_query %}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}{% endgeneration %}\n"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}\n"
)


def unmarked(template: str) -> str:
    """The same template without generation blocks (as most shipped templates are)."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hello world"},
     {"role": "assistant", "content": " Hello tokens! "}, {"role": "user", "content": "And labels?"},
     {"role": "assistant", "content": "Hello labels."}],
    [{"role": "user", "content": "Quick?"}, {"role": "assistant", "content": "The quick brown fox."},
     {"role": "user", "content": "Lazy?"}, {"role": "assistant", "content": "The lazy dog, é ü 日本."},
     {"role": "user", "content": "Done?"}, {"role": "assistant", "content": "Done."}],
]


def model_dir(tmp_path: Path, template: str | None, name: str = "model", **config) -> Path:
    """A HF tokenizer folder: tokenizer.json and a tokenizer_config.json holding ``template``."""
    d = tmp_path / name
    d.mkdir()
    make_hf_tokenizer(d / "tokenizer.json", SPECIALS)
    side = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>", **config}
    if template is not None:
        side["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(side))
    return d


def hf_reference(d: Path, template: str | None, messages: list[dict], **kwargs) -> tuple[list[int], list[int]]:
    """transformers' ids and assistant mask for ``messages``, with the tokenizer folder loaded as
    transformers loads it (its special tokens and, for ``template`` None, its own template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=template is not None, **kwargs)
    return list(out["input_ids"]), list(out.get("assistant_masks", []))


def examples(ds: SFTDataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, target-mask) of every packed example, in file order."""
    out = []
    for i in range(len(ds)):
        s = ds[i]
        check_invariants(s, ds.seq_len)
        for d in split_docs(s):
            ids, labels = s["input_ids"][d], s["labels"][d]
            if np.all(ids == ds.pad_id) and np.all(labels == IGNORE_INDEX):
                continue  # padding
            # labels[k] is the target of position k, i.e. token k+1: shift back into a per-token mask
            mask = np.concatenate([[0], labels[:-1] != IGNORE_INDEX]).astype(int)
            out.append((ids, mask))
    return out


@pytest.mark.parametrize("template,kwargs", [(CHATML, {}), (LLAMA3, {"date_string": "3 Mar 2025"}),
                                             (QWEN3, {})])
@pytest.mark.parametrize("marked", [True, False])
def test_equals_transformers(tmp_path: Path, template: str, kwargs: dict, marked: bool):
    """Ids equal apply_chat_template's; the loss mask equals transformers' assistant mask (computed
    from generation blocks), whether seqpar reads the blocks or finds the turns by prefixes."""
    shipped = template if marked else unmarked(template)
    d = model_dir(tmp_path, shipped)
    convs = CONVERSATIONS if template is not QWEN3 or marked else CONVERSATIONS[:1]  # see test_qwen3
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    cfg = DataConfig(type="sft", paths=[path], seq_len=512, tokenizer=d / "tokenizer.json",
                     chat_template="hf", chat_template_kwargs=kwargs)
    ds = build_dataset(cfg, tmp_path / "cache")
    assert isinstance(ds, SFTDataset) and ds.truncated == 0
    got = examples(ds)
    assert len(got) == len(convs)
    for messages, (ids, mask) in zip(convs, got):
        ref_ids, ref_mask = hf_reference(d, template, messages, **kwargs)
        assert ids.tolist() == ref_ids
        assert sum(ref_mask) > 0
        # a document's first token is never a target (nothing precedes it); it is never assistant text
        assert mask.tolist() == [0] + ref_mask[1:] and ref_mask[0] == 0


def test_trained_text(tmp_path: Path):
    """What is trained, in words: each assistant reply and its end-of-turn token, never a header,
    a user turn or the system prompt; bos written by the template once; no eos appended."""
    d = model_dir(tmp_path, unmarked(LLAMA3))
    tok = HFTokenizer(d / "tokenizer.json")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}])
    cfg = DataConfig(type="sft", paths=[path], seq_len=512, tokenizer=d / "tokenizer.json", chat_template="hf")
    (ids, mask), = examples(SFTDataset(cfg, tok, tmp_path / "cache"))
    assert tok.decode(ids[mask == 1].tolist()) == "Hello tokens!<|eot_id|>Hello labels.<|eot_id|>"
    text = tok.decode(ids.tolist())
    # strftime_now renders a fixed date: a cache built on any day (or rank) has the same tokens
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>")
    assert text.count("<|begin_of_text|>") == 1 and ids[-1] == tok._tok.token_to_id("<|eot_id|>")


def test_pairs_become_user_assistant(tmp_path: Path):
    d = model_dir(tmp_path, unmarked(CHATML))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello world", "response": "Hello tokens."}])
    cfg = DataConfig(type="sft", paths=[path], seq_len=128, tokenizer=d / "tokenizer.json", chat_template="hf")
    tok = HFTokenizer(d / "tokenizer.json")
    (ids, mask), = examples(SFTDataset(cfg, tok, tmp_path / "cache"))
    ref, _ = hf_reference(d, CHATML, [{"role": "user", "content": "Hello world"},
                                      {"role": "assistant", "content": "Hello tokens."}])
    assert ids.tolist() == ref and tok.decode(ids[mask == 1].tolist()) == "Hello tokens.<|im_end|>\n"


def test_qwen3_multi_turn_needs_generation_blocks(tmp_path: Path):
    """Qwen3's template renders an earlier reply without its think block once a later user turn
    follows: prefixes cannot find it, so the record is refused with the way out; a template with
    generation blocks (data.chat_template_file) trains it, on both replies as the full rendering
    shows them."""
    d = model_dir(tmp_path, unmarked(QWEN3))
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[2]}])
    cfg = dict(type="sft", paths=[path], seq_len=512, tokenizer=d / "tokenizer.json", chat_template="hf")
    with pytest.raises(DataError, match=r"q\.jsonl:2: messages\[1\] \(assistant\): the chat template \(.*"
                                        r"tokenizer_config\.json\) renders this reply differently once later messages "
                                        r"follow \(it differs at character 56: '<think>.*data\.chat_template_file"):
        build_dataset(DataConfig(**cfg), tmp_path / "cache")
    marked = tmp_path / "qwen3_training.jinja"
    marked.write_text(QWEN3)
    ds = build_dataset(DataConfig(**cfg, chat_template_file=marked), tmp_path / "cache")
    tok = HFTokenizer(d / "tokenizer.json")
    got = examples(ds)
    ids, mask = got[1]
    assert ids.tolist() == hf_reference(d, QWEN3, CONVERSATIONS[2])[0]
    assert tok.decode(ids[mask == 1].tolist()) == (
        "The quick brown fox.<|im_end|>\nThe lazy dog, é ü 日本.<|im_end|>\n"
        "<think>\n\n</think>\n\nDone.<|im_end|>\n")
    # data.chat_template_kwargs reach the template: with thinking off the generation prompt holds the
    # empty think block, so the reply alone is trained (found by prefixes)
    one = write_jsonl(tmp_path / "one.jsonl", [{"messages": CONVERSATIONS[0]}])
    ds = build_dataset(DataConfig(**{**cfg, "paths": [one]}, chat_template_kwargs={"enable_thinking": False}),
                       tmp_path / "cache")
    (ids, mask), = examples(ds)
    assert tok.decode(ids[mask == 1].tolist()) == "Paris.<|im_end|>\n"
    assert tok.decode(ids.tolist()).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nParis.<|im_end|>\n")
    # what a checkpoint carries renders as trained: the run's kwargs are the exported template's
    # defaults (transformers on the exported folder gives the ids trained on), and a variable passed
    # at inference still wins
    from transformers import AutoTokenizer

    from seqpar.engine.snapshot import tokenizer_files

    trained = {"enable_thinking": False, "note": "a '\"}} %} #} {{x}} \\ é 😀", "my-var": 1}
    out = tmp_path / "exported"
    out.mkdir()
    for name, blob in tokenizer_files(DataConfig(**{**cfg, "paths": [one]}, chat_template_kwargs=trained),
                                      tok).items():
        (out / Path(name).name).write_bytes(blob)
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=True)["input_ids"] == ids.tolist()
    ask = CONVERSATIONS[0][:1]
    prompt = exported.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off, as trained
    assert exported.apply_chat_template(ask, tokenize=False, add_generation_prompt=True, enable_thinking=True) == \
        AutoTokenizer.from_pretrained(d).apply_chat_template(ask, tokenize=False, add_generation_prompt=True) != prompt
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # any JSON value survives as a Jinja literal (nothing in a string closes the tag); a name no
    # template can refer to is left out
    assert _compile_jinja_template(exported.chat_template + "|{{ note }}").render(messages=[]).endswith(
        "|" + trained["note"])
    assert "my-var" not in exported.chat_template


def test_template_sources_and_cache(tmp_path: Path, caplog):
    """chat_template.jinja beside the tokenizer wins over tokenizer_config.json (as in transformers);
    named templates use 'default'; the template keys the cache (an edited template re-tokenizes);
    the generic format warns when the tokenizer ships a template of its own."""
    d = model_dir(tmp_path, unmarked(CHATML))
    tok = HFTokenizer(d / "tokenizer.json")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    cfg = DataConfig(type="sft", paths=[path], seq_len=256, tokenizer=d / "tokenizer.json", chat_template="hf")
    first = examples(SFTDataset(cfg, tok, tmp_path / "cache"))[0][0]
    assert tok.decode(first.tolist()).startswith("<|im_start|>system\nYou are a helpful assistant.")
    (d / "chat_template.jinja").write_text(unmarked(CHATML).replace("a helpful", "an exact"))
    second = examples(SFTDataset(cfg, tok, tmp_path / "cache"))[0][0]
    assert tok.decode(second.tolist()).startswith("<|im_start|>system\nYou are an exact assistant.")
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 2
    # the checkpoint's data fingerprint holds the template: a resume on an edited one is refused
    fp_first = SFTDataset(cfg, tok, tmp_path / "cache").content_fingerprint()
    (d / "chat_template.jinja").write_text(unmarked(CHATML))
    fp_edited = SFTDataset(cfg, tok, tmp_path / "cache").content_fingerprint()
    assert fp_first["chat_template"] != fp_edited["chat_template"]
    with pytest.raises(ConfigError, match=r"the data changed since the checkpoint \(the chat template: "):
        check_data_unchanged(fp_first, fp_edited, [])
    (d / "chat_template.jinja").unlink()
    side = json.loads((d / "tokenizer_config.json").read_text())
    side["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": unmarked(CHATML)}]
    (d / "tokenizer_config.json").write_text(json.dumps(side))
    assert examples(SFTDataset(cfg, tok, tmp_path / "cache"))[0][0].tolist() == first.tolist()

    caplog.set_level(logging.WARNING)
    SFTDataset(DataConfig(type="sft", paths=[path], seq_len=256, tokenizer=d / "tokenizer.json"), tok,
               tmp_path / "cache")
    assert "ships the model's own chat template: set data.chat_template: hf" in caplog.text
    caplog.clear()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}])
    SFTDataset(DataConfig(type="sft", paths=[pairs], seq_len=64, tokenizer=d / "tokenizer.json"), tok,
               tmp_path / "cache")
    assert "chat template" not in caplog.text  # pairs were never in a chat format


def test_errors(tmp_path: Path):
    d = model_dir(tmp_path, None)
    tok = HFTokenizer(d / "tokenizer.json")
    good = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    hf = dict(type="sft", paths=[good], seq_len=256, tokenizer=d / "tokenizer.json", chat_template="hf")
    with pytest.raises(DataError, match=r"no chat template beside data\.tokenizer .*chat_template\.jinja.*"
                                        r"set data\.chat_template_file"):
        SFTDataset(DataConfig(**hf), tok, tmp_path / "cache")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(DataError, match=r"chat template .*bad\.jinja: Jinja syntax error on line 1"):
        SFTDataset(DataConfig(**hf, chat_template_file=bad), tok, tmp_path / "cache")
    llama = tmp_path / "llama.jinja"
    llama.write_text(unmarked(LLAMA3))
    tool = write_jsonl(tmp_path / "t.jsonl", [{"messages": CONVERSATIONS[0]},
                                              {"messages": [{"role": "tool", "content": "{}"},
                                                            {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: the chat template \(.*llama\.jinja\) refused this record: "
                                        r"roles are user and assistant"):
        SFTDataset(DataConfig(**{**hf, "paths": [tool]}, chat_template_file=llama), tok, tmp_path / "cache")
    odd = write_jsonl(tmp_path / "o.jsonl", [{"messages": [{"role": "user", "content": "a\ufdd0"},
                                                           {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"o\.jsonl:1: the record holds U\+FDD0"):
        SFTDataset(DataConfig(**{**hf, "paths": [odd]}, chat_template_file=llama), tok, tmp_path / "cache")
    none = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match=r"n\.jsonl:1: 'messages' has no 'assistant' message"):
        SFTDataset(DataConfig(**{**hf, "paths": [none]}, chat_template_file=llama), tok, tmp_path / "cache")

    # config: hf needs a tokenizer; the file and kwargs need hf; the file must exist
    with pytest.raises(ValidationError, match=r"data\.chat_template hf .*set data\.tokenizer"):
        DataConfig(type="sft", paths=[good], chat_template="hf")
    with pytest.raises(ValidationError, match=r"data\.chat_template_file is used with data\.chat_template hf"):
        DataConfig(type="sft", paths=[good], tokenizer=d / "tokenizer.json", chat_template_file=llama)
    with pytest.raises(ValidationError, match=r"data\.chat_template_kwargs is used with"):
        DataConfig(type="sft", paths=[good], chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(ValidationError, match=r"data\.chat_template_file"):
        DataConfig(**hf, chat_template_file=tmp_path / "missing.jinja")


def test_token_mask_overlap():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 10]])
    assert token_mask(offsets, [(4, 9)]).tolist() == [0, 1, 1, 0]  # straddling the start counts
    assert token_mask(offsets, [(0, 3), (9, 10)]).tolist() == [1, 0, 0, 1]
    assert token_mask(np.zeros((0, 2), dtype=np.int64), [(0, 1)]).tolist() == []


def test_sandboxed(tmp_path: Path):
    """A template is untrusted input: Jinja's immutable sandbox refuses attribute escapes."""
    d = model_dir(tmp_path, "{{ messages.__class__.__mro__ }}{% generation %}x{% endgeneration %}")
    chat = load_chat_template(d / "tokenizer.json", None, {})
    with pytest.raises(DataError, match="refused this record"):
        chat.trained_spans([{"role": "assistant", "content": "x"}], "r:1")
    d2 = model_dir(tmp_path, "{{ messages.append(1) }}", name="m2")
    with pytest.raises(DataError, match="refused this record"):
        load_chat_template(d2 / "tokenizer.json", None, {}).trained_spans(
            [{"role": "assistant", "content": "x"}], "r:1")
    shutil.rmtree(d2)


def test_tools_reach_the_template(tmp_path: Path):
    """A record's ``tools`` list is given to the template, and ``tojson`` writes plain JSON (Jinja's
    own filter would HTML-escape '<' and '&'), as transformers renders it."""
    template = ("{%- if tools %}{{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
                + unmarked(CHATML).split("\n", 1)[1])
    d = model_dir(tmp_path, template)
    tools = [{"type": "function", "function": {"name": "lt", "description": "a < b & c", "parameters": {}}}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CONVERSATIONS[0], "tools": tools}])
    cfg = DataConfig(type="sft", paths=[path], seq_len=256, tokenizer=d / "tokenizer.json", chat_template="hf")
    tok = HFTokenizer(d / "tokenizer.json")
    (ids, mask), = examples(SFTDataset(cfg, tok, tmp_path / "cache"))
    assert '"description": "a < b & c"' in tok.decode(ids.tolist())
    assert ids.tolist() == hf_reference(d, template, CONVERSATIONS[0], tools=tools)[0]


def render_ids(d: Path, tmp_path: Path, records: list[dict], **cfg) -> list[tuple[np.ndarray, np.ndarray]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "r.jsonl", records)
    conf = DataConfig(type="sft", paths=[path], seq_len=1024, tokenizer=d / "tokenizer.json", chat_template="hf", **cfg)
    return examples(SFTDataset(conf, HFTokenizer(d / "tokenizer.json"), tmp_path / "cache"))


# Hermes / Llama-style tool calls and Qwen3-style reasoning in one template: content may be null,
# tool_calls null (OpenAI exports), reasoning under any of its names.
TOOLS_AND_REASONING = (
    "{{- bos_token }}{%- if documents %}{{- '<|im_start|>system\\n' + (documents | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content is defined %}{{- '<think>' + m.reasoning_content + '</think>' }}{%- endif %}"
    "{%- if m.content is defined %}{{- m.content }}{%- endif %}"
    "{%- if m.tool_calls is defined %}{%- for c in m.tool_calls %}{{- '<tool_call>' + (c | tojson) + '</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_records_normalised_as_transformers_does(tmp_path: Path):
    """Keys holding null are dropped (no literal 'None', no template failing on a null), reasoning
    under 'reasoning' or 'thinking' reaches reasoning_content, documents reach the template."""
    d = model_dir(tmp_path, TOOLS_AND_REASONING)
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [
        {"role": "user", "content": "Hello world", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "Hello tokens.", "reasoning": "think hard", "tool_calls": None},
    ]
    documents = [{"title": "t", "text": "a < b"}]
    (ids, mask), = render_ids(d, tmp_path, [{"messages": messages, "documents": documents}])
    ref, _ = hf_reference(d, None, messages, documents=documents)
    assert ids.tolist() == ref
    tok = HFTokenizer(d / "tokenizer.json")
    text = tok.decode(ids.tolist())
    assert "None" not in text and "<think>think hard</think>Hello tokens." in text and '"a < b"' in text
    assert tok.decode(ids[mask == 1].tolist()) == (
        '<tool_call>{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}</tool_call><|im_end|>\n'
        "<think>think hard</think>Hello tokens.<|im_end|>\n")


def test_special_tokens_as_transformers_loads_them(tmp_path: Path):
    """The template's bos_token/eos_token/... are what transformers loads from the folder: a null is
    unset (no bos rendered), a legacy special_tokens_map.json overrides; a template using a token
    nobody sets is refused naming data.chat_template_kwargs."""
    records = [{"messages": CONVERSATIONS[0]}]
    d = model_dir(tmp_path, unmarked(LLAMA3), name="nobos", bos_token=None)
    (ids, _), = render_ids(d, tmp_path / "a", records, chat_template_kwargs={"date_string": "1 May 2025"})
    assert ids.tolist() == hf_reference(d, None, CONVERSATIONS[0], date_string="1 May 2025")[0]
    assert "<|begin_of_text|>" not in HFTokenizer(d / "tokenizer.json").decode(ids.tolist())

    d = model_dir(tmp_path, unmarked(LLAMA3), name="legacy")
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<|im_start|>"}}))
    (ids, _), = render_ids(d, tmp_path / "b", records)
    assert ids.tolist() == hf_reference(d, None, CONVERSATIONS[0], date_string="26 Jul 2024")[0]
    assert HFTokenizer(d / "tokenizer.json").decode(ids[:1].tolist()) == "<|im_start|>"

    d = model_dir(tmp_path, unmarked(LLAMA3), name="bare")
    (d / "tokenizer_config.json").unlink()
    template = tmp_path / "llama.jinja"
    template.write_text(unmarked(LLAMA3))
    with pytest.raises(DataError, match=r"uses bos_token, but there is no tokenizer_config\.json .* set "
                                        r"data\.chat_template_kwargs: \{bos_token: '<the token>'\}"):
        render_ids(d, tmp_path / "c", records, chat_template_file=template)
    (ids, _), = render_ids(d, tmp_path / "d", records, chat_template_file=template,
                           chat_template_kwargs={"bos_token": "<|begin_of_text|>"})
    assert HFTokenizer(d / "tokenizer.json").decode(ids[:1].tolist()) == "<|begin_of_text|>"


def test_named_tool_use_template(tmp_path: Path):
    """Named templates: records with tools use 'tool_use' (as transformers picks), others 'default';
    chat_template.jinja's sibling additional_chat_templates/tool_use.jinja likewise."""
    tool_tpl = "{{- 'TOOLS ' + (tools | tojson) + '\\n' }}" + unmarked(CHATML)
    d = model_dir(tmp_path, None)
    side = json.loads((d / "tokenizer_config.json").read_text())
    side["chat_template"] = [{"name": "default", "template": unmarked(CHATML)}, {"name": "tool_use", "template": tool_tpl}]
    (d / "tokenizer_config.json").write_text(json.dumps(side))
    tools = [{"type": "function", "function": {"name": "f"}}]
    records = [{"messages": CONVERSATIONS[0], "tools": tools}, {"messages": CONVERSATIONS[0]}]
    got = render_ids(d, tmp_path / "a", records)
    assert got[0][0].tolist() == hf_reference(d, None, CONVERSATIONS[0], tools=tools)[0]
    assert got[1][0].tolist() == hf_reference(d, None, CONVERSATIONS[0])[0]
    tok = HFTokenizer(d / "tokenizer.json")
    assert tok.decode(got[0][0].tolist()).startswith("TOOLS ") and not tok.decode(got[1][0].tolist()).startswith("TOOLS")

    (d / "chat_template.jinja").write_text(unmarked(CHATML))
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text(tool_tpl.replace("TOOLS", "TOOLSET"))
    got = render_ids(d, tmp_path / "b", records)
    assert tok.decode(got[0][0].tolist()).startswith("TOOLSET ")


def test_record_and_config_mistakes(tmp_path: Path):
    d = model_dir(tmp_path, unmarked(CHATML))
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'tools' must be a list of objects .*got str"):
        render_ids(d, tmp_path / "a", [{"messages": CONVERSATIONS[0], "tools": "[{}]"}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: the record holds U\+FDD0"):
        render_ids(d, tmp_path / "b", [{"messages": CONVERSATIONS[0], "tools": [{"description": "a\ufdd0b"}]}])
    # a reply first: most templates read messages[0] to render its generation prompt
    first = [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hello"},
             {"role": "assistant", "content": "Hello tokens."}]
    with pytest.raises(DataError, match=r"r\.jsonl:1: messages\[0\] \(assistant\): the chat template .* cannot "
                                        r"render the generation prompt of a conversation that starts with the assistant"):
        render_ids(d, tmp_path / "c", [{"messages": first}])
    # DeepSeek-R1-like: the generation prompt opens <think>, replies are rendered without it
    r1 = unmarked(CHATML).replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                                  "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    d1 = model_dir(tmp_path, r1, name="r1")
    with pytest.raises(DataError, match=r"messages\[1\] \(assistant\): .* renders this reply without the generation "
                                        r"prompt it prompts with \(it differs at character \d+: '<think>"):
        render_ids(d1, tmp_path / "d", [{"messages": CONVERSATIONS[0]}])
    for kwargs, match in [({"tools": []}, r"chat_template_kwargs\.tools: seqpar sets 'tools' itself"),
                          ({"date_string": __import__("datetime").date(2025, 3, 1)},
                           r"chat_template_kwargs\.date_string: .* is a date, not a JSON value: quote it")]:
        with pytest.raises(ValidationError, match=match):
            DataConfig(type="sft", paths=[tmp_path / "a" / "r.jsonl"], tokenizer=d / "tokenizer.json", chat_template="hf",
                       chat_template_kwargs=kwargs)


def test_sandbox_hardening(tmp_path: Path, monkeypatch):
    """transformers' hardening: namespace() refuses underscore names, dict is only a constructor, and
    jinja2 older than 3.1.6 (known sandbox escapes) is refused."""
    import jinja2

    ok = "{%- set ns = namespace(n=dict(a=1)) %}{% generation %}{{ ns.n.a }}{% endgeneration %}"
    d = model_dir(tmp_path, ok)
    assert load_chat_template(d / "tokenizer.json", None, {}).trained_spans(
        [{"role": "assistant", "content": "x"}], "r:1") == ("1", [(0, 1)])
    d2 = model_dir(tmp_path, "{%- set ns = namespace(_x=1) %}{% generation %}x{% endgeneration %}", name="m2")
    with pytest.raises(DataError, match=r"r:1: the chat template .* refused this record: .*may not set '_x'"):
        load_chat_template(d2 / "tokenizer.json", None, {}).trained_spans([{"role": "assistant", "content": "x"}], "r:1")
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    with pytest.raises(DataError, match=r"needs jinja2 >= 3\.1\.6 .* this has 3\.1\.5"):
        load_chat_template(d / "tokenizer.json", None, {})


@pytest.mark.slow
def test_export_carries_the_chat_template(tmp_path: Path):
    """A run trained in the model's chat template exports a tokenizer that renders chats the same
    way (transformers' apply_chat_template on the exported folder gives the tokens trained on)."""
    import subprocess
    import sys

    import yaml
    from transformers import AutoTokenizer

    # Qwen2.5-Instruct's layout: the vocabulary has <|endoftext|>, the config names <|im_end|> (the
    # end of a turn, where generation must stop) and lists its added tokens
    added = {"1": {"content": "<|im_start|>", "special": True}, "2": {"content": "<|im_end|>", "special": True}}
    d = model_dir(tmp_path, unmarked(CHATML), eos_token="<|im_end|>", bos_token=None, model_max_length=32768,
                  added_tokens_decoder=added)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS * 4])
    # the tokenizer's folder is the model's: a Qwen2 config.json, trained from random weights
    (d / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 32768,
        "rope_theta": 10000.0, "tie_word_embeddings": True}))
    cfg = {"model": {"hf_path": str(d), "load_weights": False},
           "data": {"type": "sft", "paths": [str(path)], "tokenizer": str(d / "tokenizer.json"), "seq_len": 256,
                    "chat_template": "hf"},
           "train": {"max_steps": 1, "global_batch_size": 1, "warmup_steps": 0},
           "logging": {"run_dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "seqpar" / "train.py"), "--config", str(tmp_path / "run.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the summary says how many passes over the data max_steps makes (1 step of 1 sequence here)
    import re

    n = len(build_dataset(DataConfig(**cfg["data"]), tmp_path / "run" / "cache"))
    assert re.search(rf"optim   1 steps \({1 / n:.2f} epochs of {n} sequences\)", r.stdout), r.stdout
    assert "model   qwen2: 1 layers" in r.stdout and f"architecture of {d} (random weights: model.load_weights false)" in r.stdout
    tag = tmp_path / "run" / "checkpoints" / "step00000001-seq000000"
    assert f"saved {tag} (a Hugging Face model from it: python -m seqpar.ckpt export {tag} <dir>)" in r.stdout
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "seqpar.ckpt", "export", str(tmp_path / "run"), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = AutoTokenizer.from_pretrained(out)
    im_end = exported.convert_tokens_to_ids("<|im_end|>")
    assert exported.eos_token == "<|im_end|>" and exported.model_max_length == 32768
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == im_end
    (ids, _), *_ = render_ids(d, tmp_path / "x", [{"messages": CONVERSATIONS[1]}])
    assert exported.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True)["input_ids"] == ids.tolist()


def test_render_version_keys_the_cache(tmp_path: Path, monkeypatch):
    """A change to how seqpar renders (RENDER_VERSION) re-tokenizes old hf caches and refuses
    resuming their checkpoints, like an edited template."""
    import seqpar.data.chat as chat_mod

    d = model_dir(tmp_path, unmarked(CHATML))
    before = load_chat_template(d / "tokenizer.json", None, {}).digest
    assert load_chat_template(d / "tokenizer.json", None, {}).digest == before
    monkeypatch.setattr(chat_mod, "RENDER_VERSION", chat_mod.RENDER_VERSION + 1)
    assert load_chat_template(d / "tokenizer.json", None, {}).digest != before


def test_show_marks_the_trained_text(tmp_path: Path):
    """python -m seqpar.data --show N: the first documents as text, the trained tokens marked (what a
    newcomer checks before a long job); long stretches are clipped in the middle."""
    import subprocess
    import sys

    import yaml

    from seqpar.data.preview import preview

    d = model_dir(tmp_path, unmarked(CHATML))
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}])
    data = {"type": "sft", "paths": [str(path)], "tokenizer": str(d / "tokenizer.json"), "seq_len": 512,
            "chat_template": "hf"}
    cfg = {"model": {"vocab_size": 512}, "data": data, "logging": {"run_dir": str(tmp_path / "run")},
           "train": {"global_batch_size": 4, "max_steps": 10}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "seqpar.data", "--config", str(tmp_path / "run.yaml"), "--show", "2"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "trained-on tokens between ⟦ and ⟧" in out
    assert "seqpar.data: train.max_steps 10 x 4 sequences per step = 40.00 epochs of this data" in out  # 1 sequence
    assert "--- document 0 (in sequence 0): " in out and "--- document 1 (in sequence 0): " in out
    assert "<|im_start|>assistant\n⟦ Hello tokens! <|im_end|>\n⟧<|im_start|>user\nAnd labels?" in out
    assert "<|im_start|>assistant\n⟦Paris.<|im_end|>\n⟧" in out
    assert "⟦" not in out.split("--- document 1")[1].split("<|im_start|>assistant")[0]  # system/user untrained

    ds = SFTDataset(DataConfig(**data), HFTokenizer(d / "tokenizer.json"), tmp_path / "cache")
    tok = HFTokenizer(d / "tokenizer.json")
    colored = preview(ds, tok, 1, color=True)
    assert "\033[32m Hello tokens! <|im_end|>\n\033[0m" in colored and "⟦" not in colored
    clipped = preview(ds, tok, 1, max_chars=20)
    assert "characters ...]" in clipped and len(clipped) < len(preview(ds, tok, 1))


def test_weights_roles_and_tool_arguments(tmp_path: Path, capsys):
    """OpenAI's fine-tuning format: an assistant message with weight 0 is rendered but not trained
    on, in both formats and both ways of finding turns; unknown roles are refused with the template
    too (a template silently drops a role it does not know); tool calls with string arguments (double
    JSON) are warned about once, naming the first record."""
    from seqpar.data.prepare import progress_printer

    convo = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello tokens.", "weight": 0},
             {"role": "user", "content": "And labels?"}, {"role": "assistant", "content": "Hello labels."}]
    tok_path = model_dir(tmp_path, unmarked(CHATML)) / "tokenizer.json"
    tok = HFTokenizer(tok_path)
    for name, template_file in (("prefix", None), ("blocks", tmp_path / "marked.jinja")):
        (tmp_path / "marked.jinja").write_text(CHATML)
        (ids, mask), = render_ids(tok_path.parent, tmp_path / name, [{"messages": convo}],
                                  **({"chat_template_file": template_file} if template_file else {}))
        assert tok.decode(ids[mask == 1].tolist()) == "Hello labels.<|im_end|>\n", name
        assert "Hello tokens." in tok.decode(ids.tolist())
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": convo}])
    ds = SFTDataset(DataConfig(type="sft", paths=[path], seq_len=256), ByteTokenizer(), tmp_path / "cb")
    (ids, mask), = examples(ds)
    trained = ByteTokenizer().decode(ids[mask == 1].tolist())
    assert "Hello labels." in trained and "Hello tokens." not in trained
    # a checkpoint from before weights were honoured trained those messages: its fingerprint differs
    assert ds.content_fingerprint()["records"] == "message weights honoured"
    plain = write_jsonl(tmp_path / "p.jsonl", [{"messages": CONVERSATIONS[0]}])
    assert "records" not in SFTDataset(DataConfig(type="sft", paths=[plain], seq_len=256), ByteTokenizer(),
                                       tmp_path / "cb").content_fingerprint()

    with pytest.raises(DataError, match=r"r\.jsonl:1: messages\[0\] has role 'human'; known roles: .*ShareGPT"):
        render_ids(tok_path.parent, tmp_path / "roles", [{"messages": [{"role": "human", "content": "hi"},
                                                                        {"role": "assistant", "content": "yo"}]}])

    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    records = [{"messages": CONVERSATIONS[0]},
               {"messages": [{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": None, "tool_calls": [call]}]}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    tools_tok = model_dir(tmp_path, TOOLS_AND_REASONING, name="tools") / "tokenizer.json"
    cfg = DataConfig(type="sft", paths=[path], seq_len=512, tokenizer=tools_tok, chat_template="hf")
    SFTDataset(cfg, HFTokenizer(tools_tok), tmp_path / "ct", progress_printer(0))
    out = capsys.readouterr().out
    assert (f"seqpar: warning: 1 records have tool calls whose 'arguments' is a JSON string (first: {path}:2)"
            in out and "json.loads" in out)
    SFTDataset(cfg, HFTokenizer(tools_tok), tmp_path / "ct", progress_printer(0))  # from the cache: said again
    assert "whose 'arguments' is a JSON string" in capsys.readouterr().out


def test_conversations_need_sft_and_hf_needs_sft(tmp_path: Path):
    """Chat records given to data.type text are named with the fix (data.type sft); chat_template hf
    with another data.type is refused in the config; a template failing on a message without
    content says that null keys are dropped."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: this record is a conversation .* set data\.type: sft"):
        build_dataset(DataConfig(type="text", paths=[path], seq_len=64), tmp_path / "cache")
    d = model_dir(tmp_path, "{% for m in messages %}{{ m.content.strip() }}{% generation %}x{% endgeneration %}"
                            "{% endfor %}")
    with pytest.raises(ValidationError, match=r"data\.chat_template hf renders chat records, which data\.type sft "
                                              r"reads \(this is data\.type 'text'\)"):
        DataConfig(type="text", paths=[path], tokenizer=d / "tokenizer.json", chat_template="hf")
    with pytest.raises(DataError, match=r"refused this record: .*\(messages\[0\] has no content: keys holding null "
                                        r"are dropped"):
        render_ids(d, tmp_path / "n", [{"messages": [{"role": "user", "content": None},
                                                     {"role": "assistant", "content": "a"}]}])


def test_checkpoint_tokenizer_config_drops_custom_code(tmp_path: Path):
    """A checkpoint keeps the tokenizer's own config, except a custom-code tokenizer class (auto_map),
    which the checkpoint does not carry: the exported tokenizer would not load."""
    from seqpar.engine.snapshot import _own_config

    d = model_dir(tmp_path, None, tokenizer_class="Qwen2Tokenizer", model_max_length=4096)
    assert _own_config(d / "tokenizer.json")["tokenizer_class"] == "Qwen2Tokenizer"
    d2 = model_dir(tmp_path, None, name="custom", tokenizer_class="ChatGLM4Tokenizer",
                   auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]})
    conf = _own_config(d2 / "tokenizer.json")
    assert "auto_map" not in conf and conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    (d2 / "tokenizer_config.json").write_text("{not json")
    assert _own_config(d2 / "tokenizer.json") == {}


def test_broken_tokenizer_config_does_not_stop_other_runs(tmp_path: Path):
    """Only an hf run needs the tokenizer's template: a text run or a per-message SFT run beside a
    tokenizer_config.json that is not JSON, or has named templates without 'default', exports no
    template instead of failing at its first checkpoint."""
    from seqpar.data.chat import template_for_export

    d = model_dir(tmp_path, None)
    side = json.loads((d / "tokenizer_config.json").read_text())
    side["chat_template"] = [{"name": "tool_use", "template": "x"}]
    (d / "tokenizer_config.json").write_text(json.dumps(side))
    assert template_for_export(d / "tokenizer.json", "<|{role}|>\n{content}\n", None, sft=False) is None
    with pytest.raises(DataError, match="no 'default'"):
        template_for_export(d / "tokenizer.json", "hf", None, sft=True)
    (d / "tokenizer_config.json").write_text("{not json")
    assert template_for_export(d / "tokenizer.json", "<|{role}|>\n{content}\n", None, sft=False) is None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    SFTDataset(DataConfig(type="sft", paths=[path], seq_len=256, tokenizer=d / "tokenizer.json"),
               HFTokenizer(d / "tokenizer.json"), tmp_path / "cache")  # per-message: starts


def test_all_left_out_and_malformed_tool_calls(tmp_path: Path):
    """Every example cut to nothing trainable is one line naming the first; malformed tool calls
    reach the template (its own refusal names the record) instead of a traceback."""
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p " * 100, "response": "r"}])
    with pytest.raises(DataError, match=r"data\.paths: every example is longer than data\.seq_len=32 with no trained "
                                        r"token in its first 32 \(first: .*long\.jsonl:1\)"):
        SFTDataset(DataConfig(type="sft", paths=[path], seq_len=32), ByteTokenizer(), tmp_path / "cache")
    d = model_dir(tmp_path, TOOLS_AND_REASONING)
    for calls in (3, [{"function": None}], [{"function": "f"}]):
        rec = {"messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a", "tool_calls": calls}]}
        try:
            render_ids(d, tmp_path / f"t{abs(hash(str(calls)))}", [rec])
        except DataError as e:
            assert "r.jsonl:1" in str(e)
