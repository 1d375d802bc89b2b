"""Data pipeline: packed-sample invariants for every dataset type, caching, errors, sampler, loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pydantic import ValidationError

from seqpar.config import DataConfig
from seqpar.data import (
    IGNORE_INDEX,
    Batch,
    ByteTokenizer,
    GlobalSampler,
    HFTokenizer,
    MicroBatchLoader,
    PackedDataset,
    PasskeyDataset,
    SFTDataset,
    TextDataset,
    TokenDataset,
    build_dataset,
    build_tokenizer,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Long context training needs careful data packing.",
    "Sequence parallelism splits one sequence across devices.",
    "Tokenizers turn text into integer ids and back again.",
    "Hello world, hello tokens, hello labels.",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_hf_tokenizer(path: Path, specials: list[str]) -> Path:
    """A small byte-level BPE (exact decode round trip) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    tok.save(str(path))
    return path


@pytest.fixture
def hf_path(tmp_path: Path) -> Path:
    return make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])


def check_invariants(sample: dict, seq_len: int) -> np.ndarray:
    """The packed-sample contract; returns the document start positions."""
    assert set(sample) == {"input_ids", "labels", "position_ids"}
    for v in sample.values():
        assert isinstance(v, np.ndarray) and v.dtype == np.int64 and v.shape == (seq_len,)
    ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
    assert pos[0] == 0
    # positions either restart at 0 or count up by one: restarts are the only boundaries
    assert np.all((pos[1:] == 0) | (pos[1:] == pos[:-1] + 1))
    last_of_doc = np.flatnonzero(pos[1:] == 0)
    assert np.all(labels[last_of_doc] == IGNORE_INDEX), "a label crosses a document boundary"
    # every label inside the window is the next input token
    inside = labels[:-1] != IGNORE_INDEX
    assert np.array_equal(labels[:-1][inside], ids[1:][inside])
    return np.flatnonzero(pos == 0)


def expected_starts(doc_starts: np.ndarray, lo: int, seq_len: int) -> np.ndarray:
    """Document starts inside stream window [lo, lo + seq_len): the window start plus real starts."""
    inside = doc_starts[(doc_starts > lo) & (doc_starts < lo + seq_len)] - lo
    return np.concatenate([[0], inside])


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    text = "héllo ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_hf_tokenizer_specials(hf_path: Path, tmp_path: Path):
    tok = HFTokenizer(hf_path)
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None and tok.pad_id == tok.eos_id  # GPT-style: no bos, pad falls back
    assert tok.decode(tok.encode(SENTENCES[1])) == SENTENCES[1]
    assert tok.eos_id not in tok.encode(SENTENCES[0])  # no specials added

    llama = HFTokenizer(make_hf_tokenizer(tmp_path / "llama.json", ["<s>", "</s>", "<pad>"]))
    assert llama.bos_id == 0 and llama.eos_id == 1 and llama.pad_id == 2


def test_hf_tokenizer_without_eos_names_file_and_tokens(tmp_path: Path):
    path = make_hf_tokenizer(tmp_path / "noeos.json", ["<unk>"])
    with pytest.raises(ValueError, match=r"noeos\.json.*<\|endoftext\|>.*</s>"):
        HFTokenizer(path)


def test_build_tokenizer(tmp_path: Path, hf_path: Path):
    assert isinstance(build_tokenizer(DataConfig()), ByteTokenizer)
    assert isinstance(build_tokenizer(DataConfig(tokenizer=hf_path)), HFTokenizer)


# ----------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------
def text_docs(n: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(SENTENCES, size=rng.integers(0, 4))) for _ in range(n)]


def test_text_dataset_windows_and_boundaries(tmp_path: Path):
    docs = text_docs()
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": k} for k, t in enumerate(docs)])
    cfg = DataConfig(type="text", paths=[path], seq_len=32)
    ds = TextDataset(cfg, ByteTokenizer(), tmp_path / "cache")

    # reference stream: <bos> bytes <eos> per document
    per_doc = [[257, *t.encode(), 258] for t in docs]
    stream = np.concatenate(per_doc)
    doc_starts = np.cumsum([0] + [len(d) for d in per_doc])[:-1]
    assert len(ds) == (len(stream) - 1) // 32 > 3
    assert ds.vocab_size_needed == 259
    for i in range(len(ds)):
        s = ds[i]
        starts = check_invariants(s, 32)
        lo = i * 32
        assert np.array_equal(s["input_ids"], stream[lo : lo + 32])
        assert np.array_equal(starts, expected_starts(doc_starts, lo, 32))
        # every position is trained on except document ends (eos), whose next token is a new doc
        is_eos = stream[lo : lo + 32] == 258
        assert np.array_equal(s["labels"] == IGNORE_INDEX, is_eos)
        assert np.array_equal(s["labels"][~is_eos], stream[lo + 1 : lo + 33][~is_eos])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_text_dataset_hf_boundaries_come_from_documents(tmp_path: Path, hf_path: Path):
    # A literal "<|endoftext|>" inside a text is tokenized as the eos id but is not a boundary.
    docs = ["hello world <|endoftext|> still the same document", *SENTENCES] * 3
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in docs])
    tok = HFTokenizer(hf_path)
    ds = TextDataset(DataConfig(type="text", paths=[path], seq_len=16, text_field="body"), tok, tmp_path)
    per_doc = [tok.encode(t) + [tok.eos_id] for t in docs]
    stream = np.concatenate(per_doc)
    doc_starts = np.cumsum([0] + [len(d) for d in per_doc])[:-1]
    assert tok.encode(docs[0]).count(tok.eos_id) == 1
    assert ds.vocab_size_needed == stream.max() + 1
    for i in range(len(ds)):
        s = ds[i]
        starts = check_invariants(s, 16)
        assert np.array_equal(s["input_ids"], stream[i * 16 : i * 16 + 16])
        assert np.array_equal(starts, expected_starts(doc_starts, i * 16, 16))


def test_text_cache_reused_and_invalidated(tmp_path: Path, hf_path: Path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in SENTENCES * 4])
    cfg = DataConfig(type="text", paths=[path], seq_len=16, tokenizer=hf_path)
    first = build_dataset(cfg, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def boom(*args, **kwargs):
        raise RuntimeError("re-tokenized")

    monkeypatch.setattr(HFTokenizer, "encode", boom)
    monkeypatch.setattr(HFTokenizer, "encode_batch", boom)
    second = build_dataset(cfg, tmp_path / "cache")  # loads the cache, never encodes
    assert len(second) == len(first)
    for i in range(len(first)):
        for k in first[i]:
            assert np.array_equal(first[i][k], second[i][k])

    # a changed file (or field) is a different cache entry
    write_jsonl(path, [{"text": t} for t in SENTENCES * 5])
    with pytest.raises(RuntimeError, match="re-tokenized"):
        build_dataset(cfg, tmp_path / "cache")


def test_text_errors(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"txt": "typo"}\n')
    cfg = DataConfig(type="text", paths=[bad], seq_len=8)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing field 'text'.*txt"):
        TextDataset(cfg, ByteTokenizer(), tmp_path / "c")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        TextDataset(DataConfig(type="text", paths=[broken], seq_len=8), ByteTokenizer(), tmp_path / "c")

    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match=r"small\.jsonl.*4 tokens.*seq_len"):
        TextDataset(DataConfig(type="text", paths=[small], seq_len=8), ByteTokenizer(), tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# token files
# ----------------------------------------------------------------------------------------------
def write_tokens(path: Path, tokens: np.ndarray, kind: str) -> Path:
    if kind == "npy":
        np.save(path.with_suffix(".npy"), tokens.astype(np.int32))
        return path.with_suffix(".npy")
    tokens.astype(kind).tofile(path.with_suffix(".bin"))
    return path.with_suffix(".bin")


@pytest.mark.parametrize("kind", ["npy", "uint16", "uint32"])
def test_token_dataset(tmp_path: Path, kind: str):
    eos = 7 if kind != "uint32" else 70_000  # exercise ids beyond uint16 with uint32
    rng = np.random.default_rng(1)
    parts = []
    for n in (50, 123, 80):  # three files; documents end at eos and at each file's end
        t = rng.integers(10, 60, size=n)
        t[rng.random(n) < 0.1] = eos
        parts.append(t)
    paths = [write_tokens(tmp_path / f"f{k}", p, kind) for k, p in enumerate(parts)]
    dtype = "uint32" if kind == "uint32" else "uint16"
    ds = TokenDataset(DataConfig(type="tokens", paths=paths, seq_len=24, eos_id=eos, token_dtype=dtype))

    stream = np.concatenate(parts)
    ends = np.union1d(np.flatnonzero(stream == eos), np.cumsum([len(p) for p in parts]) - 1)
    doc_starts = ends + 1
    assert len(ds) == (len(stream) - 1) // 24
    assert ds.vocab_size_needed == stream.max() + 1
    for i in range(len(ds)):
        s = ds[i]
        starts = check_invariants(s, 24)
        lo = i * 24
        assert np.array_equal(s["input_ids"], stream[lo : lo + 24])
        assert np.array_equal(starts, expected_starts(doc_starts, lo, 24))
        is_end = np.isin(np.arange(lo, lo + 24), ends)
        assert np.array_equal(s["labels"] == IGNORE_INDEX, is_end)
        assert np.array_equal(s["labels"][~is_end], stream[lo + 1 : lo + 25][~is_end])


def test_token_dataset_without_eos_and_errors(tmp_path: Path):
    path = write_tokens(tmp_path / "a", np.arange(100) % 50, "uint16")
    ds = TokenDataset(DataConfig(type="tokens", paths=[path], seq_len=16))
    for i in range(len(ds)):  # one long document: only the window start is a boundary
        s = ds[i]
        check_invariants(s, 16)
        assert np.array_equal(s["position_ids"], np.arange(16))
        assert np.all(s["labels"] != IGNORE_INDEX)

    with pytest.raises(ValueError, match=r"a\.bin.*100 tokens.*seq_len"):
        TokenDataset(DataConfig(type="tokens", paths=[path], seq_len=128))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"odd\.bin.*not a multiple of 4.*uint32"):
        TokenDataset(DataConfig(type="tokens", paths=[odd], seq_len=8, token_dtype="uint32"))
    twod = tmp_path / "twod.npy"
    np.save(twod, np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"twod\.npy.*1-D"):
        TokenDataset(DataConfig(type="tokens", paths=[twod], seq_len=8))


# ----------------------------------------------------------------------------------------------
# sft
# ----------------------------------------------------------------------------------------------
def split_docs(sample: dict) -> list[slice]:
    starts = list(np.flatnonzero(sample["position_ids"] == 0)) + [len(sample["position_ids"])]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def collect_examples(
    ds: SFTDataset, pad_id: int, pad_is_distinct: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) of every packed example, in order; checks padding and greedy packing."""
    out = []
    prev_used = None
    for i in range(len(ds)):
        s = ds[i]
        check_invariants(s, ds.seq_len)
        docs = split_docs(s)
        used = ds.seq_len
        pad = s["input_ids"] == pad_id
        if pad[-1] and (pad_is_distinct or s["labels"][docs[-1]].max() == IGNORE_INDEX):
            last = docs.pop()  # the padding pseudo-document
            assert np.all(s["input_ids"][last] == pad_id)
            assert np.all(s["labels"][last] == IGNORE_INDEX)
            used = last.start
        if prev_used is not None:  # greedy: the first example here did not fit in the previous one
            assert prev_used + (docs[0].stop - docs[0].start) > ds.seq_len
        prev_used = used
        out += [(s["input_ids"][d], s["labels"][d]) for d in docs]
    return out


def sft_records() -> list[dict]:
    rng = np.random.default_rng(2)
    recs = []
    for k in range(30):
        prompt = f"Q{k}: " + " ".join(rng.choice(SENTENCES, size=rng.integers(0, 2)))
        response = f"A{k} " + " ".join(rng.choice(SENTENCES, size=rng.integers(0, 3)))
        recs.append({"prompt": prompt, "response": response})
    return recs


@pytest.mark.parametrize("use_hf", [False, True])
def test_sft_pairs_loss_only_on_response(tmp_path: Path, hf_path: Path, use_hf: bool):
    recs = sft_records()
    long = {"prompt": "Long: ", "response": "x y " * 300}  # longer than seq_len: truncated
    recs.insert(5, long)
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    cfg = DataConfig(type="sft", paths=[path], seq_len=256, tokenizer=hf_path if use_hf else None)
    tok = build_tokenizer(cfg)
    ds = build_dataset(cfg, tmp_path / "cache")
    assert isinstance(ds, SFTDataset) and ds.truncated == 1
    examples = collect_examples(ds, tok.pad_id, pad_is_distinct=not use_hf)
    assert len(examples) == len(recs)  # every example once, in file order
    for rec, (ids, labels) in zip(recs, examples):
        trained = labels[labels != IGNORE_INDEX]
        if rec is long:
            assert len(ids) == 256 and labels[-1] == IGNORE_INDEX
            assert rec["response"].startswith(tok.decode(trained)) and len(trained) > 50
            continue
        assert trained[-1] == tok.eos_id and ids[-1] == tok.eos_id
        assert tok.decode(trained[:-1]) == rec["response"]
        # data.sft_separator (default "\n") sits between prompt and response, without loss
        sep = cfg.sft_separator
        assert tok.decode(ids).endswith(rec["prompt"] + sep + rec["response"] + tok.decode([tok.eos_id]))
        if tok.bos_id is not None:
            assert ids[0] == tok.bos_id


@pytest.mark.parametrize("use_hf", [False, True])
def test_sft_messages(tmp_path: Path, hf_path: Path, use_hf: bool):
    template = "<|{role}|>\n{content}\n"
    recs = []
    for k in range(12):
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {k}?"}]
        if k % 4 == 1:  # starts with a trained turn: without bos its first token is a target
            msgs = []
        msgs.append({"role": "assistant", "content": f"Answer {k}."})
        if k % 3 == 0:  # multi-turn: every assistant turn is trained on
            msgs += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "Done."}]
        recs.append({"messages": msgs})
    path = write_jsonl(tmp_path / "chat.jsonl", recs)
    cfg = DataConfig(type="sft", paths=[path], seq_len=160, chat_template=template)
    tok = HFTokenizer(hf_path) if use_hf else ByteTokenizer()
    ds = SFTDataset(cfg, tok, tmp_path / "cache")
    examples = collect_examples(ds, tok.pad_id, pad_is_distinct=not use_hf)
    assert len(examples) == len(recs) and ds.truncated == 0 and len(ds) < len(recs)
    for rec, (ids, labels) in zip(recs, examples):
        trained = labels[labels != IGNORE_INDEX]
        if tok.bos_id is None and rec["messages"][0]["role"] == "assistant":
            trained = np.concatenate([ids[:1], trained])  # nothing predicts a document's 1st token
        assistant = "".join(template.format(**m) for m in rec["messages"] if m["role"] == "assistant")
        assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == assistant
        rendered = "".join(template.format(**m) for m in rec["messages"])
        assert tok.decode(ids[ids != tok.bos_id]) == rendered + tok.decode([tok.eos_id])


def test_sft_long_examples_are_cut_or_left_out(tmp_path: Path, capsys):
    """An example longer than data.seq_len is cut to its first seq_len tokens (named by file:line in
    one warning); one whose cut leaves no trained token is left out of packing, so no sequence (and
    no global batch) is all prompt; its neighbours pack together around the gap, in order."""
    from seqpar.data.prepare import progress_printer

    recs = [{"prompt": "a", "response": "first"}, {"prompt": "Long " * 200, "response": "never seen"},
            {"prompt": "b", "response": "second"}, {"prompt": "Cut", "response": " tail" * 200}]
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    cfg = DataConfig(type="sft", paths=[path], seq_len=128)
    ds = SFTDataset(cfg, ByteTokenizer(), tmp_path / "cache", progress_printer(0))
    out = capsys.readouterr().out
    assert (f"seqpar: warning: 2 of 4 SFT examples are longer than data.seq_len=128 and are cut to their first "
            f"128 tokens, so their ends are not trained on ({path}:2, {path}:4); raise data.seq_len") in out
    assert f"1 of them keep no trained token in that part and are left out of training ({path}:2)" in out
    assert ds.truncated == 2 and ds.left_out == 1 and "1 left out with nothing to train on" in ds.describe()
    tok = ByteTokenizer()
    docs = [s["input_ids"][d] for i in range(len(ds)) for s in [ds[i]] for d in split_docs(s)
            if not np.all(s["input_ids"][d] == tok.pad_id)]
    texts = [tok.decode(d.tolist()) for d in docs]
    assert texts[:2] == ["a\nfirst", "b\nsecond"] and texts[2].startswith("Cut\n tail")  # 1 and 3 share a sequence
    assert len(ds) == 2 and not any("never seen" in t or "Long" in t for t in texts)
    # the summary's trained share counts the targets the sequences really hold
    targets = sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds)))
    assert ds.trained_share == pytest.approx(targets / (len(ds) * 128))
    assert f"{100 * targets / (len(ds) * 128):.0f}% trained" in ds.describe()
    # other ranks do not repeat a warning about the data
    SFTDataset(cfg, ByteTokenizer(), tmp_path / "cache", progress_printer(1))
    assert "warning" not in capsys.readouterr().out


def test_best_fit_packing(tmp_path: Path):
    """data.packing best_fit: every example once, each sequence within seq_len, sequences fuller than
    greedy file-order packing (measured here on long examples), the same packing on every call;
    documents inside a sequence keep their own positions and labels."""
    from seqpar.data.packing import best_fit_pack, greedy_pack

    rng = np.random.default_rng(0)
    lengths = rng.integers(800, 3000, 400)
    order, bounds = best_fit_pack(lengths, 4096)
    assert sorted(order.tolist()) == list(range(400))
    seqs = [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
    assert all(lengths[q].sum() <= 4096 for q in seqs) and all(list(q) == sorted(q) for q in seqs)
    greedy_bounds, _ = greedy_pack(lengths, 4096)
    lower = int(np.ceil(lengths.sum() / 4096))
    assert len(seqs) < 0.85 * (len(greedy_bounds) - 1) and len(seqs) <= 1.03 * lower + 1, (len(seqs), len(greedy_bounds), lower)
    again = best_fit_pack(lengths, 4096)
    assert np.array_equal(again[0], order) and np.array_equal(again[1], bounds)
    assert best_fit_pack(np.array([5000, 10]), 4096)[1].tolist() == [0, 1, 2]  # a cut example fills a sequence

    recs = [{"prompt": f"q{k}", "response": "x" * int(n)} for k, n in enumerate(rng.integers(20, 200, 60))]
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    tok = ByteTokenizer()
    greedy = SFTDataset(DataConfig(type="sft", paths=[path], seq_len=256), tok, tmp_path / "c")
    best = SFTDataset(DataConfig(type="sft", paths=[path], seq_len=256, packing="best_fit"), tok, tmp_path / "c")
    assert len(best) < len(greedy) and best.fill > greedy.fill and "best_fit packing" in best.describe()
    seen = []
    for i in range(len(best)):
        s = best[i]
        check_invariants(s, 256)
        for d in split_docs(s):
            ids, labels = s["input_ids"][d], s["labels"][d]
            if np.all(ids == tok.pad_id):
                continue
            text = tok.decode(ids.tolist())
            k = int(text.split("\n")[0][1:])
            assert text == f"q{k}\n" + recs[k]["response"]  # whole, its own positions
            assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == recs[k]["response"]
            seen.append(k)
    assert sorted(seen) == list(range(60))


def test_sft_errors(tmp_path: Path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"}, {"question": "?"}])
    with pytest.raises(ValueError, match=r"x\.jsonl:2: missing field 'messages' or 'prompt'/'response'"):
        SFTDataset(DataConfig(type="sft", paths=[path], seq_len=16), ByteTokenizer(), tmp_path / "c")
    path = write_jsonl(tmp_path / "y.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match=r"y\.jsonl:1: missing field 'response'"):
        SFTDataset(DataConfig(type="sft", paths=[path], seq_len=16), ByteTokenizer(), tmp_path / "c")
    path = write_jsonl(tmp_path / "z.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"z\.jsonl:1: .*no 'assistant' message"):
        SFTDataset(DataConfig(type="sft", paths=[path], seq_len=16), ByteTokenizer(), tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# passkey
# ----------------------------------------------------------------------------------------------
def passkey_cfg(**kw) -> DataConfig:
    base = {"seq_len": 512, "num_samples": 200, "passkey": {"key_digits": 5, "eval_samples": 200}}
    base.update(kw)
    return DataConfig(**base)


def test_passkey_samples_and_answers():
    ds = PasskeyDataset(passkey_cfg())
    tok = ByteTokenizer()
    assert len(ds) == 200 and ds.vocab_size_needed == 259
    needles = []
    for i in range(len(ds)):
        s = ds[i]
        check_invariants(s, 512)
        ids, labels = s["input_ids"], s["labels"]
        assert np.array_equal(s["position_ids"], np.arange(512))  # exactly one document, no padding
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and labels[-1] == IGNORE_INDEX
        assert np.all(labels[:-1] == ids[1:])  # loss_on=all
        key, start = ds.answer(i)
        assert len(key) == 5 and key.isdigit()
        assert tok.decode(labels[start : start + 5]) == key and labels[start + 5] == tok.eos_id
        text = tok.decode(ids)
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        assert tok.decode(ids[: start + 1]).endswith("The pass key is ")
        needle = ds.needle(i)
        assert text.index("The pass key is") == needle - 1  # decoded text has no bos
        assert text.count(key) == 3
        needles.append(needle)
    needles = np.array(needles)
    # planted anywhere: both halves, very early and very late, many distinct depths
    assert needles.min() < 512 * 0.1 and needles.max() > 512 * 0.6
    assert (needles < 256).sum() > 40 and (needles >= 256).sum() > 20
    assert len(set(needles.tolist())) > 15
    # deterministic in i, independent of the instance
    again = PasskeyDataset(passkey_cfg())
    assert all(np.array_equal(ds[i]["input_ids"], again[i]["input_ids"]) for i in (0, 17, 199))


def test_passkey_answer_loss_eval_split_and_errors():
    ds = PasskeyDataset(passkey_cfg(passkey={"loss_on": "answer", "key_digits": 7}))
    for i in range(10):
        labels = ds[i]["labels"]
        key, start = ds.answer(i)
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        assert np.array_equal(trained, np.arange(start, start + 8))  # 7 digits + eos
        assert ByteTokenizer().decode(labels[start : start + 7]) == key

    train = PasskeyDataset(passkey_cfg())
    held = PasskeyDataset(passkey_cfg(), split="eval")
    assert len(held) == 200
    seen = {train[i]["input_ids"].tobytes() for i in range(len(train))}
    assert not any(held[i]["input_ids"].tobytes() in seen for i in range(len(held)))
    assert len({train.answer(i)[0] for i in range(50)} & {held.answer(i)[0] for i in range(50)}) < 5

    with pytest.raises(ValueError, match=r"seq_len=64 is too short.*key_digits"):
        PasskeyDataset(passkey_cfg(seq_len=64))
    with pytest.raises(IndexError):
        train.answer(200)


def test_passkey_curriculum_packs_short_documents_then_full_ones():
    cfg = passkey_cfg(shuffle=False, passkey={"key_digits": 3, "loss_on": "answer", "eval_samples": 20,
                                              "curriculum_samples": 100, "curriculum_start_len": 128})
    ds, tok = PasskeyDataset(cfg), ByteTokenizer()
    assert "curriculum" in ds.describe()
    previous, keys = 0, set()
    for i in range(0, 120, 3):
        s = ds[i]
        starts = check_invariants(s, 512)
        lengths = ds.doc_lengths(i)
        assert sum(lengths) == 512 and np.array_equal(starts, np.cumsum([0] + lengths[:-1]))
        assert lengths[0] >= previous  # documents only grow, to one full-length one at the end
        previous = lengths[0]
        if i < 100:
            length = 128 + 128 * i // 100
            assert lengths[0] == length and len(lengths) == 512 // length >= 2
        else:
            assert lengths == [512]
        for lo, n in zip(starts, lengths):  # each one a whole passkey document, loss on its answer
            ids, labels = s["input_ids"][lo:lo + n], s["labels"][lo:lo + n]
            key = tok.decode(ids[n - 4:n - 1])
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and key.isdigit()
            assert tok.decode(ids).count(key) == 3
            assert np.array_equal(np.flatnonzero(labels != IGNORE_INDEX), np.arange(n - 5, n - 1))
            keys.add((i, key))
    assert len({k for _, k in keys}) > 50  # documents of one sample are independent draws
    assert ds.doc_lengths(0) == [128, 128, 128, 128] and ds.doc_lengths(60) == [204, 308]
    # past the curriculum, samples are exactly those of a run without it
    plain = PasskeyDataset(passkey_cfg(shuffle=False, passkey={"key_digits": 3, "loss_on": "answer"}))
    assert all(np.array_equal(ds[i]["input_ids"], plain[i]["input_ids"]) for i in (100, 150, 199))
    with pytest.raises(ValueError, match="packs curriculum documents"):
        ds.answer(5)
    # held-out samples: one full-length document each, also disjoint from curriculum documents
    held = PasskeyDataset(cfg, split="eval")
    assert all(held.doc_lengths(i) == [512] for i in range(20))
    assert not {held.answer(i)[0] for i in range(20)} >= {k for _, k in keys}

    with pytest.raises(ValidationError, match=r"data.passkey.curriculum_samples .*data.shuffle false"):
        passkey_cfg(passkey={"curriculum_samples": 10})
    with pytest.raises(ValidationError, match=r"curriculum_start_len=300 leaves no room .* at most 256"):
        passkey_cfg(shuffle=False, passkey={"curriculum_samples": 10, "curriculum_start_len": 300})
    with pytest.raises(ValueError, match=r"curriculum_start_len=64 is too short.*at least \d+"):
        PasskeyDataset(passkey_cfg(shuffle=False, passkey={"curriculum_samples": 10, "curriculum_start_len": 64}))


# ----------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------
def test_sampler_epochs_seek_and_state():
    n = 37
    s = GlobalSampler(n, seed=5, shuffle=True)
    seq = [s.index(p) for p in range(3 * n)]  # sequential walk over three epochs
    epochs = [seq[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))  # each epoch covers every index once
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))

    fresh = GlobalSampler(n, seed=5, shuffle=True)
    for pos in np.random.default_rng(0).permutation(3 * n):  # seek anywhere == sequential
        assert fresh.index(int(pos)) == seq[pos]
    assert [GlobalSampler(n, seed=6).index(p) for p in range(n)] != epochs[0]
    assert [GlobalSampler(n, seed=5, shuffle=False).index(p) for p in range(2 * n)] == list(range(n)) * 2

    sd = json.loads(json.dumps(s.state_dict()))
    assert sd == {"num_samples": n, "seed": 5, "shuffle": True}
    GlobalSampler(n, 5, True).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"data changed.*num_samples: checkpoint 37 != now 38"):
        GlobalSampler(38, 5, True).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"seed: checkpoint 5 != now 1"):
        GlobalSampler(n, 1, True).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------
class IndexDataset(PackedDataset):
    """Sample i is filled with i (labels: i, except a boundary at the middle)."""

    def __init__(self, n: int, seq_len: int = 6):
        self.n, self.seq_len, self.pad_id, self.vocab_size_needed = n, seq_len, 0, n

    def __len__(self) -> int:
        return self.n

    def _sample(self, i: int) -> dict:
        labels = np.full(self.seq_len, i, dtype=np.int64)
        labels[: self.seq_len // 2] = IGNORE_INDEX
        pos = np.arange(self.seq_len, dtype=np.int64)
        return {"input_ids": np.full(self.seq_len, i, dtype=np.int64), "labels": labels, "position_ids": pos}


def test_loader_global_batches_independent_of_dp():
    ds = IndexDataset(50)
    sampler = GlobalSampler(len(ds), seed=3)
    micro, G = 2, 8
    for step in range(8):  # crosses epoch boundaries (50 is not a multiple of 8)
        want = [sampler.index(p) for p in range(step * G, (step + 1) * G)]
        for dp in (1, 2, 4):
            gas = G // (micro * dp)
            loaders = [MicroBatchLoader(ds, sampler, micro, r, dp, gas) for r in range(dp)]
            # (micro_step, rank) order rebuilds the global batch in order; the union is the same set
            got = [i for m in range(gas) for r in range(dp) for i in loaders[r].indices(step, m)]
            assert got == want
            rows = [b.input_ids[:, 0].tolist() for L in loaders for b in L.window(step)]
            assert sorted(sum(rows, [])) == sorted(want)
            assert loaders[0].consumed_samples(step, gas - 1) == step * G + (gas - 1) * micro * dp


def test_loader_batches_and_prefetch():
    ds = IndexDataset(20)
    loader = MicroBatchLoader(ds, GlobalSampler(20, seed=0), 3, dp_rank=1, dp_size=2, grad_accum_steps=2)
    b = loader.micro_batch(4, 1)
    assert isinstance(b, Batch)
    for t in (b.input_ids, b.labels, b.position_ids):
        assert t.dtype == torch.int64 and t.shape == (3, 6)
    assert b.num_loss_tokens == 3 * 3
    assert b.to("cpu").input_ids.equal(b.input_ids)
    assert loader.consumed_samples(4, 1) == 4 * 12 + 6
    with pytest.raises(ValueError):
        loader.micro_batch(0, 2)

    ahead = MicroBatchLoader(ds, GlobalSampler(20, seed=0), 3, 1, 2, 2, prefetch=True)
    try:
        for step in (0, 1, 2, 7, 3):  # includes a seek, which discards the prefetched window
            for x, y in zip(loader.window(step), ahead.window(step)):
                assert x.input_ids.equal(y.input_ids) and x.labels.equal(y.labels)
    finally:
        ahead.close()

    with pytest.raises(ValueError, match="sampler covers"):
        MicroBatchLoader(ds, GlobalSampler(21, seed=0), 1, 0, 1, 1)


def test_loader_over_real_dataset(tmp_path: Path):
    cfg = passkey_cfg(seq_len=256)
    ds = build_dataset(cfg, tmp_path)
    loader = MicroBatchLoader(ds, GlobalSampler(len(ds), cfg.seed, cfg.shuffle), 2, 0, 1, 2)
    batches = loader.window(0)
    assert len(batches) == 2
    for b in batches:
        assert b.input_ids.shape == (2, 256)
        assert b.num_loss_tokens == 2 * 255


def test_bench_packing_script_prints_its_table():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_packing.py"), "--scale", "0.02",
                        "--seq-len", "4096"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| long") or line.startswith("| medium")]
    assert len(rows) == 2
    for row in rows:  # best fit never needs more sequences than greedy
        cells = [c.strip() for c in row.strip("|").split("|")]
        greedy, best = (int(cells[k].split(", ")[0].replace(",", "")) for k in (2, 3))
        assert best <= greedy, row
