"""``data.weights``: each data.paths file its own source, sampled in proportion; every sample of
every source in each epoch, upsampled sources repeating evenly; interleaved, not in blocks; a pure
function of the index (O(1) seek, any rank count); config mistakes are one line; a resume refuses
changed weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_data import SENTENCES, write_jsonl

import seqpar.data.mixture as mixture
from seqpar.checkpoint.manager import ResumeError, check_resume_config
from seqpar.config import DataConfig, validate_config
from seqpar.data import MixtureDataset, PackedDataset, build_dataset
from seqpar.data.packing import Sample


class Numbered(PackedDataset):
    """``n`` samples whose input ids say (source, index)."""

    def __init__(self, source: int, n: int, vocab: int = 10):
        self.source, self.n, self.seq_len, self.pad_id, self.vocab_size_needed = source, n, 4, 0, vocab

    def __len__(self) -> int:
        return self.n

    def _sample(self, i: int) -> Sample:
        ids = np.array([self.source, i, 0, 0], dtype=np.int64)
        return {"input_ids": ids, "labels": ids, "position_ids": np.arange(4)}


def _brute(mix: MixtureDataset) -> list[tuple[int, int]]:
    seen = Counter()
    out = []
    for k in mix.source_of.tolist():
        out.append((k, seen[k] % mix.sizes[k]))
        seen[k] += 1
    return out


@pytest.mark.parametrize("sizes,weights", [([100, 1000], [1, 1]), ([7, 300, 50], [0.5, 0.2, 0.3]),
                                           ([1000, 10], [0.9, 0.1]), ([5], [2.0])])
def test_epoch_counts_cover_and_repeat_evenly(sizes, weights, monkeypatch):
    monkeypatch.setattr(mixture, "_BLOCK", 64)  # many blocks: lookups cross block starts
    mix = MixtureDataset([Numbered(k, n) for k, n in enumerate(sizes)], weights, [f"s{k}" for k in range(len(sizes))])
    total = sum(weights)
    assert len(mix) == sum(mix.counts)
    for k, (n, w, c) in enumerate(zip(sizes, weights, mix.counts)):
        assert c >= n  # every sample in every epoch
        assert abs(c / len(mix) - w / total) <= 1.0 / len(mix) * len(sizes) + 1e-9, (c, len(mix))
    if len(sizes) == 1:
        assert len(mix) == sizes[0]
    # O(1) lookup == a walk over the whole epoch; each sample of a source repeats floor or ceil times
    walk = _brute(mix)
    got = [tuple(mix[i]["input_ids"][:2].tolist()) for i in range(len(mix))]
    assert got == walk
    for k, (n, c) in enumerate(zip(sizes, mix.counts)):
        reps = Counter(j for s, j in walk if s == k)
        assert set(reps) == set(range(n)) and set(reps.values()) <= {c // n, -(-c // n)}
    # interleaved evenly: any window holds each source within 2 of its share
    src = mix.source_of.astype(np.int64)
    for k, c in enumerate(mix.counts):
        csum = np.concatenate([[0], np.cumsum(src == k)])
        for w in (len(sizes) * 3, len(mix) // 3):
            got_w = csum[w:] - csum[:-w]
            assert np.abs(got_w - w * c / len(mix)).max() <= 2.0, (k, w)


def test_describe_vocab_and_errors():
    mix = MixtureDataset([Numbered(0, 10, vocab=50), Numbered(1, 30, vocab=90)], [3, 1], ["long.jsonl", "short.jsonl"])
    assert mix.vocab_size_needed == 90 and mix.vocab_source == "short.jsonl"
    # short.jsonl needs 120 slots at 25% to show all its 30 sequences: long.jsonl repeats 9 times
    assert mix.describe() == ("mixture of 2: long.jsonl 75% (10 sequences, x9.00), short.jsonl 25% "
                              "(30 sequences, x1.00); 120 sequences of 4 per epoch")
    with pytest.raises(IndexError):
        mix[120]


def test_build_from_files_text_and_tokens(tmp_path: Path):
    """Each file its own source (its own stream: no window spans two files); weights on held-out
    files are not applied (eval reads data.eval_paths as one set)."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": s * 3} for s in SENTENCES])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": s} for s in SENTENCES[:2]])
    one = DataConfig(type="text", paths=[a], seq_len=32)
    two = DataConfig(type="text", paths=[b], seq_len=32)
    mixed = DataConfig(type="text", paths=[a, b], weights=[1, 1], seq_len=32)
    lines: list[str] = []
    mix = build_dataset(mixed, tmp_path / "cache", lines.append)
    sa, sb = build_dataset(one, tmp_path / "cache"), build_dataset(two, tmp_path / "cache")
    assert isinstance(mix, MixtureDataset) and mix.sizes == [len(sa), len(sb)] and len(sb) < len(sa)
    for i in range(len(mix)):
        k, j = mix.locate(i)
        ref = (sa, sb)[k][j]
        assert all(np.array_equal(mix[i][f], ref[f]) for f in ref)
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("tokenizing data")] == \
        ["tokenizing data.paths[0]", "tokenizing data.paths[1]"]
    tok = tmp_path / "t.npy"
    np.save(tok, np.arange(200, dtype=np.uint16) % 97)
    tmix = build_dataset(DataConfig(type="tokens", paths=[tok, tok], weights=[2, 1], seq_len=16), tmp_path / "c")
    assert tmix.counts == [2 * len(tmix.sources[0]), len(tmix.sources[0])] and tmix.vocab_size_needed == 97


def test_config_errors_and_resume_refuses_new_weights(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    for weights, match in (([1.0], "data.weights has 1 entry for 2 data.paths files"),
                           ([1.0, 0.0], "must all be positive numbers, got 0.0"),
                           ([1.0, float("inf")], "must all be positive numbers, got inf")):
        with pytest.raises(ValidationError, match=match):
            DataConfig(type="text", paths=[f, f], weights=weights)
    with pytest.raises(ValidationError, match="data.weights mixes data.paths files, but data.type is 'passkey'"):
        DataConfig(weights=[1.0])
    base = validate_config({"data": {"type": "text", "paths": [str(f), str(f)], "weights": [1, 1]}})
    saved = json.loads(base.model_dump_json())
    new = json.loads(base.model_copy(update={"data": base.data.model_copy(update={"weights": [3.0, 1.0]})})
                     .model_dump_json())
    with pytest.raises(ResumeError, match=r"data.weights: \[1.0, 1.0\] -> \[3.0, 1.0\] \(changes what training computes"):
        check_resume_config(saved, new, [])
    unmixed = json.loads(validate_config({"data": {"type": "text", "paths": [str(f), str(f)]}}).model_dump_json())
    del unmixed["data"]["weights"]  # a checkpoint from before data.weights existed
    assert check_resume_config(unmixed, json.loads(validate_config(
        {"data": {"type": "text", "paths": [str(f), str(f)]}}).model_dump_json()), []) == []


@pytest.mark.slow
def test_cli_trains_a_mixture(tmp_path: Path):
    """seqpar/train.py with data.weights: the summary shows each source's share and repeat factor,
    one step trains."""
    from test_data_errors import run_train

    a = write_jsonl(tmp_path / "long.jsonl", [{"text": s * 6} for s in SENTENCES])
    b = write_jsonl(tmp_path / "short.jsonl", [{"text": s} for s in SENTENCES])
    r = run_train(tmp_path, {"type": "text", "paths": [str(a), str(b)], "weights": [0.8, 0.2]})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("data "))
    assert "mixture of 2: long.jsonl 80% (" in line and "short.jsonl 20% (" in line and "per epoch" in line, line
    assert "done: 1 steps" in r.stdout


@pytest.mark.parametrize("sizes,weights", [([7, 300, 50], [0.5, 0.2, 0.3]), ([1000, 13, 1], [1, 1, 1])])
def test_built_in_pieces_equals_built_at_once(sizes, weights, monkeypatch):
    """The epoch is built a bounded number of slots at a time: cut exactly, the same order as one
    sort over the whole epoch (and the same prefix counts)."""
    srcs = [Numbered(k, n) for k, n in enumerate(sizes)]
    names = [f"s{k}" for k in range(len(sizes))]
    whole = MixtureDataset(srcs, weights, names)
    assert len(whole) < mixture._BUILD
    monkeypatch.setattr(mixture, "_BUILD", 37)
    monkeypatch.setattr(mixture, "_BLOCK", 16)
    pieces = MixtureDataset(srcs, weights, names)
    assert np.array_equal(whole.source_of, pieces.source_of)
    assert [pieces.locate(i) for i in range(len(pieces))] == _brute(pieces)


def test_extreme_repeat_is_reported(caplog):
    with caplog.at_level("WARNING"):
        MixtureDataset([Numbered(0, 3), Numbered(1, 5000)], [0.5, 0.5], ["tiny.jsonl", "big.jsonl"])
    assert "data.weights: tiny.jsonl repeats x1667 in each epoch of 10,000 sequences" in caplog.text


def test_resume_refuses_changed_data_content():
    """The checkpoint's data fingerprint against today's: an edit under the same name is refused,
    naming the file; data.content in checkpoint.allow_changes accepts it; old checkpoints (no
    fingerprint) are not checked."""
    from seqpar.config import ConfigError
    from seqpar.engine.resume import check_data_unchanged

    saved = {"/d/a.jsonl": "1" * 64, "/d/b.jsonl": "2" * 64, "tokenizer": "bytes-v1"}
    check_data_unchanged(saved, dict(saved), [])
    check_data_unchanged(None, saved, [])
    edited = {**saved, "/d/b.jsonl": "3" * 64}
    with pytest.raises(ConfigError, match=r"the data changed since the checkpoint \('/d/b.jsonl': other content"):
        check_data_unchanged(saved, edited, [])
    with pytest.raises(ConfigError, match=r"\(the tokenizer file: .*--checkpoint.allow_changes '\[data.content\]'"):
        check_data_unchanged(saved, {**saved, "tokenizer": "hf-abc"}, [])
    check_data_unchanged(saved, edited, ["data.content"])


def test_fingerprints_follow_content(tmp_path: Path):
    """Text files by sha256 (the tokenizer too), token files by size and first/last MiB, mixtures
    by all their files; passkey data (the config alone) by nothing."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES])
    cfg = DataConfig(type="text", paths=[a], seq_len=16)
    fp = build_dataset(cfg, tmp_path / "c").content_fingerprint()
    assert set(fp) == {str(a), "tokenizer"} and fp["tokenizer"] == "bytes-v1"
    write_jsonl(a, [{"text": s} for s in reversed(SENTENCES)])  # same size, other content
    assert build_dataset(cfg, tmp_path / "c").content_fingerprint()[str(a)] != fp[str(a)]
    t = tmp_path / "t.npy"
    np.save(t, np.arange(3000, dtype=np.uint16))
    tcfg = DataConfig(type="tokens", paths=[t, t], weights=[1, 1], seq_len=16)
    tfp = build_dataset(tcfg, tmp_path / "c").content_fingerprint()
    np.save(t, np.arange(3000, dtype=np.uint16)[::-1].copy())
    assert list(tfp) == [str(t)] and build_dataset(tcfg, tmp_path / "c").content_fingerprint() != tfp
    assert build_dataset(DataConfig(), tmp_path / "c").content_fingerprint() == {}


def test_tokenizer_loaded_once_per_run(tmp_path: Path, monkeypatch):
    """prepare_data loads the tokenizer file once for every source of a mixture and the held-out set."""
    from test_data import make_hf_tokenizer

    from seqpar.config import validate_config
    from seqpar.data.prepare import prepare_data
    from seqpar.data.tokenizer import HFTokenizer

    loads = []
    real = HFTokenizer.__init__
    monkeypatch.setattr(HFTokenizer, "__init__", lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    tok = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    files = [str(write_jsonl(tmp_path / f"{n}.jsonl", [{"text": s} for s in SENTENCES * 2])) for n in "abc"]
    cfg = validate_config({"model": {"vocab_size": 512}, "train": {"eval_every": 5},
                           "data": {"type": "text", "tokenizer": str(tok), "paths": files, "weights": [1, 2, 3],
                                    "eval_paths": files[:1], "seq_len": 16},
                           "logging": {"run_dir": str(tmp_path / "run")}})
    train, held_out = prepare_data(cfg)
    assert isinstance(train, MixtureDataset) and list(held_out) == [None] and len(loads) == 1
