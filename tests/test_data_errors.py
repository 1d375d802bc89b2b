"""User mistakes in data files, tokenizers and data settings: each is one ``DataError`` line that
names the file (and line, or token position) and the fix, raised while the dataset is built, i.e.
before the model or the DeepSpeed engine exists. Also: the SFT prompt/response separator, and the
special token ids an HF export carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from test_data import SENTENCES, make_hf_tokenizer, write_jsonl

from seqpar.config import DataConfig, ModelConfig
from seqpar.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataError,
    GlobalSampler,
    HFTokenizer,
    SFTDataset,
    TextDataset,
    TokenDataset,
    build_dataset,
    build_tokenizer,
)
from seqpar.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(fn, *match: str) -> str:
    """``fn()`` raises a one-line ``DataError`` (a ``UserError``) containing every ``match``."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in msg and msg == msg.strip(), msg
    for m in match:
        assert m in msg, (m, msg)
    return msg


def text_ds(tmp: Path, path: Path, **kw) -> TextDataset:
    cfg = DataConfig(type="text", paths=[path], seq_len=kw.pop("seq_len", 8), **kw)
    return build_dataset(cfg, tmp / "cache")


def sft_ds(tmp: Path, path: Path, **kw) -> SFTDataset:
    return build_dataset(DataConfig(type="sft", paths=[path], seq_len=64, **kw), tmp / "cache")


def tok_ds(paths: list[Path], **kw) -> TokenDataset:
    return TokenDataset(DataConfig(type="tokens", paths=paths, seq_len=8, **kw))


# ----------------------------------------------------------------------------------------------
# jsonl (text and sft share the reader)
# ----------------------------------------------------------------------------------------------
def test_broken_jsonl_line_names_file_line_and_column(tmp_path: Path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "also ok"}\n{"text": \n')
    msg = one_line_error(lambda: text_ds(tmp_path, p), f"{p}:4: not valid JSON", "column 9", "JSON Lines")
    assert "line 2" not in msg  # json's own position would count the newline as a second line
    # the same reader serves SFT
    q = tmp_path / "broken_sft.jsonl"
    q.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b",}\n')
    one_line_error(lambda: sft_ds(tmp_path, q), f"{q}:2: not valid JSON", "column 33")


def test_json_array_or_pretty_printed_file(tmp_path: Path):
    arr = tmp_path / "data.json"
    arr.write_text(json.dumps([{"text": t} for t in SENTENCES], indent=1))
    one_line_error(lambda: text_ds(tmp_path, arr), f"{arr}:1: this looks like one JSON document", "jq -c")
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps({"text": "x"}, indent=2))
    one_line_error(lambda: text_ds(tmp_path, pretty), f"{pretty}:1: this looks like one JSON document")


def test_not_utf8_and_not_an_object(tmp_path: Path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    one_line_error(lambda: text_ds(tmp_path, p), f"{p}:2: not valid UTF-8", "byte 14")
    q = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["a", "b"]])
    one_line_error(lambda: text_ds(tmp_path, q), f"{q}:2: expected a JSON object, got list")


def test_missing_or_wrong_text_field_names_the_key(tmp_path: Path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"content": "x", "id": 3}])
    one_line_error(lambda: text_ds(tmp_path, p), f"{p}:2: missing field 'text'", "content, id",
                   "set data.text_field: content if that field holds it")  # the one string field
    r = write_jsonl(tmp_path / "r.jsonl", [{"body": "x", "title": "y"}])
    one_line_error(lambda: text_ds(tmp_path, r), "set data.text_field to the field that holds it")
    one_line_error(lambda: text_ds(tmp_path, p, text_field="content"), f"{p}:1: missing field 'content'")
    q = write_jsonl(tmp_path / "b.jsonl", [{"text": ["not", "a", "string"]}])
    one_line_error(lambda: text_ds(tmp_path, q), f"{q}:1: field 'text' must be a string, got list")
    # keys holding newlines still give one line
    r = write_jsonl(tmp_path / "c.jsonl", [{"te\nxt": "x"}])
    one_line_error(lambda: text_ds(tmp_path, r), "te xt")


def test_empty_files_and_files_without_usable_documents(tmp_path: Path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in SENTENCES])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    for bad in (empty, blank):
        # alone, or after a good file: the message names the file at fault
        cfg = DataConfig(type="text", paths=[good, bad], seq_len=8)
        one_line_error(lambda cfg=cfg: build_dataset(cfg, tmp_path / "cache"), f"'{bad}' holds no records",
                       "remove it from data.paths")
        one_line_error(lambda bad=bad: sft_ds(tmp_path, bad), f"'{bad}' holds no records")
    hollow = write_jsonl(tmp_path / "hollow.jsonl", [{"text": ""}, {"text": ""}])
    one_line_error(lambda: text_ds(tmp_path, hollow), f"{hollow}: all 2 records have an empty 'text'")
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "hi"}])
    one_line_error(lambda: text_ds(tmp_path, small, seq_len=64), str(small), "4 tokens", "data.seq_len")


# ----------------------------------------------------------------------------------------------
# sft records
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record, match",
    [
        ({"question": "?"}, ["missing field 'messages' or 'prompt'/'response'", "question",
                             "data.prompt_field/data.response_field"]),
        ({"prompt": "a"}, ["missing field 'response'", "set data.response_field"]),
        ({"response": "a"}, ["missing field 'prompt'", "set data.prompt_field"]),
        ({"prompt": "a", "response": 3}, ["field 'response' must be a string, got int"]),
        ({"messages": []}, ["field 'messages' must be a non-empty list", "an empty list"]),
        ({"messages": "hi"}, ["field 'messages' must be a non-empty list", "got str"]),
        ({"messages": ["hi"]}, ["messages[0] must be a {role, content} object, got str"]),
        ({"messages": [{"role": "user"}]}, ["messages[0]: missing field 'content'"]),
        ({"messages": [{"role": "assistant", "content": None}]},
         ["messages[0]: field 'content' must be a string, got NoneType"]),
        ({"messages": [{"from": "human", "value": "hi"}]}, ["messages[0] has ShareGPT keys"]),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
         ["messages[0] is a tool call without text 'content'", "data.chat_template: hf renders tool calls"]),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
         ["this is a ShareGPT record ('conversations' holds from/value turns): convert it to 'messages'",
          "human -> user, gpt -> assistant"]),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
         ["every assistant message in 'messages' has weight 0: nothing to train on"]),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
         ["messages[1] has weight 0.5: a message's weight is 0 (not trained on) or 1"]),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]},
         ["messages[1] has role 'gpt'", "known roles: system", "rename it"]),
        ({"messages": [{"role": "user", "content": "q"}]}, ["has no 'assistant' message"]),
    ],
)
def test_sft_record_mistakes(tmp_path: Path, record: dict, match: list[str]):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, record])
    one_line_error(lambda: sft_ds(tmp_path, p), f"{p}:2", *match)


def test_chat_template_checked_with_the_config():
    with pytest.raises(ValidationError, match=r"data.chat_template cannot be formatted.*\{\{"):
        DataConfig(chat_template="{role}: {content} {system}")


# ----------------------------------------------------------------------------------------------
# token files
# ----------------------------------------------------------------------------------------------
def test_npy_wrong_shape_dtype_header(tmp_path: Path):
    twod = tmp_path / "twod.npy"
    np.save(twod, np.zeros((4, 4), np.int32))
    one_line_error(lambda: tok_ds([twod]), str(twod), "2-D int32 array of shape (4, 4)", "reshape(-1)")
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(64, np.float32))
    one_line_error(lambda: tok_ds([floats]), str(floats), "float32", "astype(numpy.uint32)")
    text = tmp_path / "text.npy"
    text.write_text("1 2 3 4\n")
    one_line_error(lambda: tok_ds([text]), str(text), "not a .npy file", ".bin")
    full = tmp_path / "full.npy"
    np.save(full, np.arange(1000, dtype=np.int32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(full.read_bytes()[:300])
    one_line_error(lambda: tok_ds([cut]), str(cut), "cannot read as .npy", "truncated")
    none = tmp_path / "none.npy"
    np.save(none, np.zeros(0, np.int32))
    one_line_error(lambda: tok_ds([full, none]), f"'{none}' holds no tokens")


def test_bin_wrong_dtype_or_size(tmp_path: Path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 7)
    one_line_error(lambda: tok_ds([odd], token_dtype="uint32"), str(odd), "not a multiple of 4", "uint32")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    one_line_error(lambda: tok_ds([empty]), f"'{empty}' is empty")
    ids = np.random.default_rng(0).integers(1, 50_000, size=1000)
    wide = tmp_path / "wide.bin"
    ids.astype(np.uint32).tofile(wide)
    one_line_error(lambda: tok_ds([wide]), str(wide), "looks like uint32", "data.token_dtype: uint32")
    assert len(tok_ds([wide], token_dtype="uint32")) > 0
    narrow = tmp_path / "narrow.bin"
    ids.astype(np.uint16).tofile(narrow)
    one_line_error(lambda: tok_ds([narrow], token_dtype="uint32"), str(narrow), "larger than any vocabulary",
                   "data.token_dtype: uint16")
    assert len(tok_ds([narrow])) > 0
    txt = tmp_path / "a.txt"
    txt.write_text("x" * 64)
    one_line_error(lambda: tok_ds([txt]), str(txt), "unknown type '.txt'")


def test_token_scan_negative_ids_and_vocab_source(tmp_path: Path):
    a = tmp_path / "a.npy"
    np.save(a, np.arange(100, dtype=np.int32))
    b = tmp_path / "b.npy"
    t = np.arange(100, dtype=np.int32)
    t[37] = 250
    np.save(b, t)
    ds = tok_ds([a, b])
    assert ds.vocab_size_needed == 251 and ds.vocab_source == f"token file '{b}' (id 250 at token 37)"
    neg = tmp_path / "neg.npy"
    t[60] = -1
    np.save(neg, t)
    ds = tok_ds([a, neg])  # construction reads no file in full ...
    # ... the one full pass (the trainer asks for vocab_size_needed before building the model) does
    one_line_error(lambda: ds.vocab_size_needed, str(neg), "token 60 is -1", ">= 0")


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
def test_tokenizer_file_that_does_not_load(tmp_path: Path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    one_line_error(lambda: HFTokenizer(bad), f"data.tokenizer: cannot load '{bad}'", "tokenizer.json")
    sp = tmp_path / "tokenizer.model"
    sp.write_bytes(b"\x0a\x0b\x00\xff" * 10)
    one_line_error(lambda: HFTokenizer(sp), str(sp), "sentencepiece")
    # through build_dataset, as the trainer calls it
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    one_line_error(lambda: text_ds(tmp_path, data, tokenizer=bad), str(bad))


def test_tokenizer_without_eos_says_how_to_set_it(tmp_path: Path):
    path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<unk>", "<|im_end|>"])
    msg = one_line_error(lambda: HFTokenizer(path), str(path), "no end-of-sequence token",
                         "<|endoftext|>", "</s>", "set data.eos_token", "tokenizer_config.json")
    assert "no eos_token in a tokenizer_config.json" in msg
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in SENTENCES])
    one_line_error(lambda: text_ds(tmp_path, data, tokenizer=path), "set data.eos_token")
    one_line_error(lambda: sft_ds(tmp_path, data, tokenizer=path), "set data.eos_token")

    # data.eos_token picks it (and is part of the cache key)
    ds = text_ds(tmp_path, data, tokenizer=path, eos_token="<|im_end|>")
    tok = HFTokenizer(path, eos_token="<|im_end|>")
    assert tok.eos_id == tok._tok.token_to_id("<|im_end|>") and tok.eos_token == "<|im_end|>"
    assert ds.tokens[ds.doc_ends[0]] == tok.eos_id and tok.cache_key.endswith(f"-eos{tok.eos_id}-bosNone")
    one_line_error(lambda: HFTokenizer(path, eos_token="</s>"), "data.eos_token '</s>' is not in the vocabulary",
                   str(path))
    with pytest.raises(ValidationError, match="data.eos_token needs data.tokenizer"):
        DataConfig(eos_token="</s>")

    # a tokenizer_config.json next to the file is the last place looked at
    side = tmp_path / "tokenizer_config.json"
    side.write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}, "bos_token": None}))
    tok = HFTokenizer(path)
    assert tok.eos_token == "<|im_end|>" and tok.bos_id is None and tok.pad_id == tok.eos_id
    side.write_text(json.dumps({"eos_token": "<eot>"}))
    one_line_error(lambda: HFTokenizer(path), "names eos_token '<eot>', which is not in the vocabulary")


def test_tokenizer_that_cannot_encode_names_the_records(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"hello": 0, "<|endoftext|>": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wordlevel.json"
    wl.save(str(path))
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "hello bye"}])
    one_line_error(lambda: text_ds(tmp_path, data, tokenizer=path), f"{data}:1-2: tokenizer '{path}'",
                   "cannot encode", "[UNK]")


@pytest.mark.parametrize("kind", ["text", "sft"])
def test_vocab_size_needed_counts_every_emitted_id(tmp_path: Path, kind: str):
    # a pad id above every text id and the eos: SFT emits padding, text windows never do
    from tokenizers import Tokenizer

    path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<s>"])
    raw = Tokenizer.from_file(str(path))
    raw.add_special_tokens(["<pad>"])  # the last id, above every token a text encodes to
    raw.save(str(path))
    tok = HFTokenizer(path)
    assert tok.pad_id == tok.vocab_size - 1
    if kind == "text":
        data = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in SENTENCES])
        ds = text_ds(tmp_path, data, tokenizer=path)
        assert ds.vocab_size_needed == int(np.max(ds.tokens)) + 1 <= tok.pad_id
    else:
        data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q", "response": t} for t in SENTENCES])
        ds = sft_ds(tmp_path, data, tokenizer=path)
        assert ds.vocab_size_needed == tok.pad_id + 1 == tok.vocab_size
    assert ds.vocab_source == f"tokenizer '{path}' (vocabulary of {tok.vocab_size})"


# ----------------------------------------------------------------------------------------------
# cache and sampler
# ----------------------------------------------------------------------------------------------
def test_cache_problems(tmp_path: Path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in SENTENCES])
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cfg = DataConfig(type="text", paths=[data], seq_len=8)
    one_line_error(lambda: build_dataset(cfg, blocker / "cache"), "tokenized-data cache", "data.cache_dir")
    build_dataset(cfg, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    tokens = (entry / "tokens.bin").read_bytes()
    (entry / "tokens.bin").write_bytes(tokens[:-2])  # cut short (a full disk, a copy interrupted)
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache"), f"'{entry}' is unreadable",
                   "delete that directory")
    (entry / "tokens.bin").unlink()
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache"), f"'{entry}' is unreadable",
                   "delete that directory")


def test_sampler_changed_data_is_a_data_error():
    s = GlobalSampler(37, seed=5)
    one_line_error(lambda: GlobalSampler(38, seed=5).load_state_dict(s.state_dict()),
                   "num_samples: checkpoint 37 != now 38", "data.paths")


# ----------------------------------------------------------------------------------------------
# sft separator
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_hf", [False, True])
@pytest.mark.parametrize("sep", [None, "", "\n\nAnswer: "])  # None: the default
def test_sft_separator_placement_and_loss(tmp_path: Path, use_hf: bool, sep: str | None):
    recs = [{"prompt": "What is up?", "response": "The sky."}, {"prompt": "Q", "response": "A b c"}]
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    tok_path = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<s>"]) if use_hf else None
    kw = {} if sep is None else {"sft_separator": sep}
    cfg = DataConfig(type="sft", paths=[path], seq_len=128, tokenizer=tok_path, **kw)
    assert cfg.sft_separator == ("\n" if sep is None else sep)
    tok = build_tokenizer(cfg)
    ds = build_dataset(cfg, tmp_path / "cache")
    s = ds[0]
    pos = 0
    for rec in recs:
        prompt = tok.encode(rec["prompt"] + cfg.sft_separator)  # the separator is tokenized with the prompt
        response = tok.encode(rec["response"])
        want = [tok.bos_id, *prompt, *response, tok.eos_id]
        n = len(want)
        assert s["input_ids"][pos : pos + n].tolist() == want
        # targets: the response tokens and the eos only, never the prompt or the separator
        labels = s["labels"][pos : pos + n]
        trained = [int(t) for t in labels if t != IGNORE_INDEX]
        assert trained == [*response, tok.eos_id]
        assert np.all(labels[: len(prompt)] == IGNORE_INDEX)  # predicting prompt/separator: no loss
        pos += n
        if sep == "":  # today's behaviour: prompt and response joined as is
            assert tok.decode([*prompt, *response]) == rec["prompt"] + rec["response"]


def test_sft_separator_is_part_of_the_cache_key(tmp_path: Path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "response": "A"}])
    a = build_dataset(DataConfig(type="sft", paths=[path], seq_len=32), tmp_path / "cache")
    b = build_dataset(DataConfig(type="sft", paths=[path], seq_len=32, sft_separator=""), tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert a.tokens.tolist() == [257, *b"Q\nA", 258] and b.tokens.tolist() == [257, *b"QA", 258]


# ----------------------------------------------------------------------------------------------
# HF export: special token ids
# ----------------------------------------------------------------------------------------------
def test_save_hf_checkpoint_writes_special_token_ids(tmp_path: Path):
    import transformers

    from seqpar.models.hf import fields_to_hf_config, save_hf_checkpoint
    from seqpar.models.transformer import Transformer

    cfg = ModelConfig(arch="llama", vocab_size=320, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2)
    sd = Transformer(cfg).state_dict()
    tok = ByteTokenizer()
    out = save_hf_checkpoint(sd, cfg, tmp_path / "hf", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id)
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (257, 258, 256)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    g = model.generation_config  # what generate() stops at
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (257, 258, 256)

    # a list of eos ids (chat models stop at several); without ids nothing changes
    hf = fields_to_hf_config(cfg, eos_token_id=[258, 7], pad_token_id=np.int64(256))
    assert hf["eos_token_id"] == [258, 7] and hf["pad_token_id"] == 256 and "bos_token_id" not in hf
    json.dumps(hf)  # numpy ids come out as plain ints
    plain = save_hf_checkpoint(sd, cfg, tmp_path / "plain")
    assert not (plain / "generation_config.json").exists()
    assert "eos_token_id" not in json.loads((plain / "config.json").read_text())
    for bad in ({"eos_token_id": 320}, {"bos_token_id": -1}, {"eos_token_id": []}, {"pad_token_id": True},
                {"bos_token_id": [1, 2]}, {"eos_token_id": 2.0}):
        with pytest.raises(ValueError, match=r"not a token id.*model.vocab_size=320"):
            save_hf_checkpoint(sd, cfg, tmp_path / "bad", **bad)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------
# command line: one line on stderr, exit status 2, before the engine
# ----------------------------------------------------------------------------------------------
def run_train(tmp: Path, data: dict, vocab_size: int = 320) -> subprocess.CompletedProcess:
    path = write_train_config(tmp, data, vocab_size)
    return subprocess.run(
        [sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(path)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )


def write_train_config(tmp: Path, data: dict, vocab_size: int = 320, **train) -> Path:
    """A one-step tiny config over ``data``, run dir ``tmp/run``, written to ``tmp/tmp.yaml``."""
    cfg = {
        "model": {"arch": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 1, "num_attention_heads": 2},
        "data": {"seq_len": 16, **data},
        "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "warmup_steps": 0,
                  "device": "cpu", **train},
        "logging": {"run_dir": str(tmp / "run"), "progress_bar": False, "tensorboard": "off"},
    }
    path = tmp / "tmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_usage_error(r: subprocess.CompletedProcess, *match: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(err.splitlines()) == 1 and err.startswith("seqpar: "), err
    assert "Traceback" not in r.stderr + r.stdout
    for m in match:
        assert m in err, (m, err)


@pytest.mark.slow
def test_cli_broken_jsonl_line(tmp_path: Path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "hello"}\n{"text": "hello\n')
    r = run_train(tmp_path, {"type": "text", "paths": [str(p)]})
    assert_usage_error(r, f"{p}:2: not valid JSON")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_vocabulary_too_small(tmp_path: Path):
    """A tokenizer with more ids than the model's vocabulary is refused before any tokenizing."""
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES * 4])
    r = run_train(tmp_path, {"type": "text", "paths": [str(p)]}, vocab_size=200)
    assert_usage_error(r, "data.tokenizer: the byte tokenizer (vocabulary of 259) has more ids than "
                          "model.vocab_size=200: raise model.vocab_size to at least 259")
    assert not (tmp_path / "run" / "cache").exists()  # refused before tokenizing
    tok = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])  # 397 ids (BPE stops early), eos 0
    r = run_train(tmp_path, {"type": "text", "paths": [str(p)], "tokenizer": str(tok)}, vocab_size=300)
    assert_usage_error(r, f"tokenizer '{tok}' (vocabulary of 397) has more ids than model.vocab_size=300")
    assert not (tmp_path / "run" / "cache").exists()
    r = run_train(tmp_path, {"type": "text", "paths": [str(p)], "tokenizer": str(tok)}, vocab_size=397)
    assert r.returncode == 0 and "seqpar: tokenizing data.paths (1 file" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_cli_tokenizer_without_eos(tmp_path: Path):
    tok = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<unk>"])
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "response": "A"}])
    r = run_train(tmp_path, {"type": "sft", "paths": [str(p)], "tokenizer": str(tok)})
    assert_usage_error(r, f"tokenizer '{tok}' has no end-of-sequence token", "data.eos_token")


@pytest.mark.slow
def test_cli_resume_on_edited_data_is_refused(tmp_path: Path):
    """A data file edited under the same name (same number of sequences) between runs: the resume
    is refused with one line naming it; checkpoint.allow_changes [data.content] accepts it."""
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES * 4])
    assert run_train(tmp_path, {"type": "text", "paths": [str(p)]}).returncode == 0
    write_jsonl(p, [{"text": s.upper()} for s in SENTENCES * 4])
    r = run_train(tmp_path, {"type": "text", "paths": [str(p)]})
    assert_usage_error(r, f"the data changed since the checkpoint ('{p}': other content under the same names)",
                       "--checkpoint.allow_changes '[data.content]'")
    config = write_train_config(tmp_path, {"type": "text", "paths": [str(p)]})
    r = subprocess.run([sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(config),
                        "--checkpoint.allow_changes", "[data.content]"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "already complete at step 1" in r.stdout, r.stderr[-2000:]


def test_held_out_file_past_the_vocabulary_is_named(tmp_path: Path):
    """With data.eval_per_file the vocabulary error names the held-out set whose tokens do not fit."""
    from seqpar.config import validate_config
    from seqpar.data.prepare import prepare_data

    ok, wide = tmp_path / "train.npy", tmp_path / "web.npy"
    np.save(ok, np.arange(300, dtype=np.int32) % 200)
    t = np.arange(300, dtype=np.int32) % 200
    t[5] = 400
    np.save(wide, t)
    cfg = validate_config({"model": {"vocab_size": 320}, "train": {"eval_every": 5},
                           "data": {"type": "tokens", "paths": [str(ok)], "eval_paths": [str(ok), str(wide)],
                                    "eval_per_file": True, "seq_len": 16},
                           "logging": {"run_dir": str(tmp_path / "run")}})
    one_line_error(lambda: prepare_data(cfg), "data.eval_paths (web): the data emits token ids up to 400",
                   f"token file '{wide}'", "model.vocab_size=320")
