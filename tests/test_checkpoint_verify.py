"""A checkpoint is untrusted input: unsafe names, malformed manifests, files the manifest does not
account for, and the ``seqpar.ckpt`` tool on broken checkpoints (no tracebacks, clear exit codes)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from seqpar import ckpt
from seqpar.checkpoint import codec
from seqpar.checkpoint.store import MARKER, CheckpointStore, describe_files, tag_for
from seqpar.checkpoint.verify import UnsafePath, load_manifest, read_latest, safe_member, verify_checkpoint

STATE = {"step": 1, "micro_step": 0, "consumed_samples": 8, "consumed_tokens": 1000, "losses": [2.0, 1.5],
         "topology": {"world_size": 2, "dp": 2, "zero_stage": 2}, "versions": {"seqpar": "x"},
         "format_version": 1, "config_hash": "abc", "optimizer_kind": "zero"}
CONFIG = {"model": {"arch": "llama", "num_hidden_layers": 2, "hidden_size": 32}, "train": {"micro_batch_size": 1}}


def make_checkpoint(root: Path, step: int = 1, ranks: int = 2, tokenizer: bool = False) -> Path:
    """A committed checkpoint with rank trees, a HF-style model dir, trainer state and config."""
    store = CheckpointStore(root)
    tag = tag_for(step, 0)
    part = store.begin(tag)
    files = []
    for r in range(ranks):
        d = part / f"rank{r:05d}"
        d.mkdir()
        files += codec.save_tree({"w": torch.full((10,), float(r)), "n": r}, d / "optimizer")
        files += codec.save_tree({"counters": {"micro_steps": 4}}, d / "engine")  # no tensors
    (part / "model").mkdir()
    (part / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.ones(3)}, str(part / "model" / "model.safetensors"))
    files += [part / "model" / "config.json", part / "model" / "model.safetensors"]
    if tokenizer:
        (part / "tokenizer").mkdir()
        (part / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
        files.append(part / "tokenizer" / "tokenizer.json")
    (part / "trainer_state.json").write_text(json.dumps({**STATE, "step": step}))
    (part / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    files += [part / "trainer_state.json", part / "config.yaml"]
    position = {"step": step, "micro_step": 0, "window_samples": 0, "consumed_samples": 8 * step}
    return store.commit(tag, describe_files(part, files), {"world_size": ranks, "position": position})


def manifest_of(ck: Path) -> dict:
    return json.loads((ck / "manifest.json").read_text())


def reseal(ck: Path, manifest: dict | list | bytes) -> None:
    """Write a (possibly hostile) manifest with a matching marker, as an attacker would."""
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (ck / "manifest.json").write_bytes(data)
    (ck / MARKER).write_text(hashlib.sha256(data).hexdigest() + "\n")


def entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture
def ck(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "run" / "checkpoints")


# -- names -------------------------------------------------------------------------------------------
def test_safe_member(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    assert safe_member(tmp_path, "a/f") == tmp_path / "a" / "f"
    assert safe_member(tmp_path, "a/new") == tmp_path / "a" / "new"  # need not exist
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "flink").symlink_to(tmp_path / "a" / "f")
    for bad in ("../../secret", "/etc/passwd", "a/../a/f", "", ".", "a//f", "./a/f", "a\\f", "a\0f", "link/f",
                "a/flink", "link"):
        with pytest.raises(UnsafePath):
            safe_member(tmp_path, bad)
    assert safe_member(tmp_path, "link/f", symlinks=True) == tmp_path / "link" / "f"  # HF cache snapshots
    with pytest.raises(UnsafePath):
        safe_member(tmp_path, "../x", symlinks=True)


def test_verify_refuses_names_outside_the_checkpoint(ck):
    secret = ck.parent.parent / "secret"
    secret.write_text("top secret")
    m = manifest_of(ck)
    m["files"]["../../secret"] = entry(secret)  # sizes and hashes match: only the name is wrong
    m["files"]["/etc/passwd"] = entry(Path("/etc/passwd"))
    reseal(ck, m)
    problems = verify_checkpoint(ck)
    assert any("../../secret" in p and "unsafe" in p for p in problems), problems
    assert any("/etc/passwd" in p and "unsafe" in p for p in problems), problems


def test_verify_refuses_symlinks(ck, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    f = ck / "trainer_state.json"  # a symlink to an identical file: same size and hash
    (outside / f.name).write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(outside / f.name)
    problems = verify_checkpoint(ck)
    assert any("trainer_state.json" in p and "symlink" in p for p in problems), problems
    ck2 = make_checkpoint(ck.parent, step=2)
    os.rename(ck2 / "rank00001", outside / "rank00001")
    (ck2 / "rank00001").symlink_to(outside / "rank00001")
    problems = verify_checkpoint(ck2)
    assert any("rank00001" in p and "symlink" in p for p in problems), problems
    ck3 = make_checkpoint(ck.parent, step=3)  # the checkpoint dir itself
    os.rename(ck3, outside / ck3.name)
    ck3.symlink_to(outside / ck3.name)
    assert verify_checkpoint(ck3) and verify_checkpoint(outside / ck3.name) == []


def test_read_latest(ck, tmp_path):
    root = ck.parent
    assert read_latest(root) == ck.name
    for bad in ("../x", "/etc", "../" + ck.name, ".partial-" + ck.name, "a b", "", "\0"):
        (root / "latest").write_text(bad + "\n")
        assert read_latest(root) is None, bad
    (root / "latest").unlink()
    assert read_latest(root) is None
    (tmp_path / "elsewhere").write_text(ck.name)
    (root / "latest").symlink_to(tmp_path / "elsewhere")
    assert read_latest(root) is None
    (root / "latest").unlink()
    (root / "latest").write_text(tag_for(99, 0))  # a hint: the directory may be gone
    assert read_latest(root) == tag_for(99, 0)


def test_hf_index_refuses_shards_outside_the_model_dir(tmp_path):
    from seqpar.hf_files import SAFETENSORS_INDEX, checkpoint_files

    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))  # exists, so only the name is wrong
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(ValueError, match=r"\.\./x\.safetensors") as e:
        checkpoint_files(model)
    assert "\n" not in str(e.value)
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ValueError, match="unusable index"):
        checkpoint_files(model)
    # Hub cache snapshots are symlinks into blobs/: still loadable
    (model / "s1.safetensors").symlink_to(tmp_path / "x.safetensors")
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert checkpoint_files(model) == ([model / "s1.safetensors"], {"a": model / "s1.safetensors"})


# -- manifest ----------------------------------------------------------------------------------------
def _files_as_list(m):
    m["files"] = list(m["files"])


def _size_as_string(m):
    rel = next(iter(m["files"]))
    m["files"][rel]["size"] = str(m["files"][rel]["size"])


MALFORMED = {
    "files as a list": (_files_as_list, "files"),
    "size as string": (_size_as_string, "size"),
    "negative size": (lambda m: m["files"][next(iter(m["files"]))].update(size=-1), "size"),
    "uppercase sha256": (lambda m: [e.update(sha256=e["sha256"].upper()) for e in m["files"].values()], "sha256"),
    "missing files": (lambda m: m.pop("files"), "files"),
    "files null": (lambda m: m.update(files=None), "files"),
    "tag not a string": (lambda m: m.update(tag=5), "tag"),
    "unknown version": (lambda m: m.update(format_version=7), "format version 7"),
    "version 2 without position": (lambda m: (m.update(format_version=2), m.pop("position")), "position"),
    "bad position": (lambda m: m.update(position={"step": "1"}), "position"),
    "not JSON": (b"{not json", "unreadable"),
    "JSON array": (b"[1, 2]", "dictionary"),
    "bad UTF-8": (b'{"tag": "\xff"}', "unreadable"),
    "deeply nested": (b"[" * 100000 + b"]" * 100000, "manifest.json"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_gives_problems(ck, case):
    edit, expect = MALFORMED[case]
    if isinstance(edit, bytes):
        reseal(ck, edit)
    else:
        m = manifest_of(ck)
        edit(m)
        reseal(ck, m)
    problems = verify_checkpoint(ck)  # never raises
    assert problems and any(expect in p for p in problems), problems
    assert not any("does not match" in p for p in problems)  # resealed: only the content is wrong
    manifest, why = load_manifest(ck)
    assert manifest is None and why


def test_load_manifest(ck):
    manifest, problems = load_manifest(ck)
    assert problems == [] and manifest.tag == ck.name and manifest.position.consumed_samples == 8
    assert manifest.files["rank00000/optimizer.safetensors"].size > 0
    assert manifest.model_extra["world_size"] == 2  # extra meta keys are kept
    assert load_manifest(ck / "nope") == (None, ["no manifest.json"])


# -- structure ---------------------------------------------------------------------------------------
def test_verify_checks_the_directory_matches_the_manifest(ck, tmp_path):
    root = ck.parent
    assert verify_checkpoint(ck) == []
    (ck / "rank00001" / "extra.bin").write_bytes(b"x")
    (ck / "rank00000" / "DONE.json").write_text("{}")  # a leftover of the write protocol
    problems = verify_checkpoint(ck)
    assert any("rank00001/extra.bin is not listed" in p for p in problems), problems
    assert any("rank00000/DONE.json is not listed" in p for p in problems), problems
    ck2 = make_checkpoint(root, step=2)
    os.mkfifo(ck2 / "model" / "pipe")
    assert any("model/pipe is not a regular file" in p for p in verify_checkpoint(ck2))
    ck3 = make_checkpoint(root, step=3)
    reseal(ck3, {**manifest_of(ck3), "files": {}})
    assert any("lists no files" in p for p in verify_checkpoint(ck3))
    ck4 = make_checkpoint(root, step=4)
    reseal(ck4, {**manifest_of(ck4), "tag": tag_for(5, 0)})  # a renamed / copied directory
    assert any("does not match the directory name" in p for p in verify_checkpoint(ck4))


def test_only_limits_hashing_not_structure(ck):
    data = (ck / "rank00001" / "optimizer.safetensors").read_bytes()
    (ck / "rank00001" / "optimizer.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    mine = lambda rel: not rel.startswith("rank00001/")  # noqa: E731 - what rank 0 reads
    assert verify_checkpoint(ck, only=mine) == []
    assert any("checksum mismatch" in p for p in verify_checkpoint(ck))
    (ck / "rank00001" / "engine.json").unlink()
    (ck / "rank00001" / "stray").write_text("x")
    problems = verify_checkpoint(ck, only=mine)
    assert any("missing file rank00001/engine.json" in p for p in problems), problems
    assert any("rank00001/stray is not listed" in p for p in problems), problems
    assert not any("checksum" in p for p in problems)


def test_contents_are_checked_after_the_hash(ck, monkeypatch):
    ck2 = make_checkpoint(ck.parent, step=2)  # before the patch: save_tree checks skeletons too
    calls: list[set[str] | None] = []
    monkeypatch.setattr(codec, "check_skeleton", lambda skel, keys: calls.append(keys) or [], raising=False)
    assert verify_checkpoint(ck) == []  # each rank*/ skeleton, with its tensor file's keys (none: empty)
    assert sorted(map(sorted, calls)) == [[], [], ["0"], ["0"]]
    # only the files a rank reads are opened; another rank's tensor keys are unknown to it
    calls.clear()
    assert verify_checkpoint(ck, only=lambda rel: rel != "rank00001/optimizer.safetensors") == []
    assert sorted(map(str, calls)) == ["None", "set()", "set()", "{'0'}"]
    monkeypatch.setattr(codec, "check_skeleton", lambda skel, keys: ["tensor '9' is not in the tensor file"],
                        raising=False)
    problems = verify_checkpoint(ck)
    assert any(p.endswith("rank00000/optimizer.json: tensor '9' is not in the tensor file") for p in problems)
    assert not any(p.startswith("model/") or "model/config.json" in p for p in problems)
    # a listed, hash-correct but unparsable tensor file
    (ck2 / "rank00000" / "optimizer.safetensors").write_bytes(b"\xff" * 64)
    m = manifest_of(ck2)
    m["files"]["rank00000/optimizer.safetensors"] = entry(ck2 / "rank00000" / "optimizer.safetensors")
    reseal(ck2, m)
    problems = verify_checkpoint(ck2)
    assert any("rank00000/optimizer.safetensors: unreadable safetensors header" in p for p in problems), problems


def test_real_skeleton_check_catches_a_hostile_skeleton(ck):
    f = ck / "rank00000" / "optimizer.json"
    f.write_text(json.dumps({"w": {"__tensor__": "7"}, "x": {"__object__": "os:system", "state": {}}}))
    m = manifest_of(ck)
    m["files"]["rank00000/optimizer.json"] = entry(f)
    reseal(ck, m)
    problems = verify_checkpoint(ck)
    assert any("rank00000/optimizer.json" in p and "'7'" in p for p in problems), problems
    assert any("os:system" in p for p in problems), problems


# -- the tool ----------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = ckpt.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_export_copies_only_listed_files(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck", tokenizer=True)
    code, out, err = run_cli(capsys, "export", ck, tmp_path / "hf")
    assert code == 0, err
    got = sorted(p.relative_to(tmp_path / "hf").as_posix() for p in (tmp_path / "hf").rglob("*"))
    assert got == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (ck / "model" / "model.safetensors").read_bytes()
    # unlisted files in model/: the checkpoint does not verify, nothing is written
    (tmp_path / "secret").write_text("secret")
    (ck / "model" / "secret.txt").symlink_to(tmp_path / "secret")
    (ck / "model" / "extra.safetensors").write_bytes(b"x")
    code, out, err = run_cli(capsys, "export", ck, tmp_path / "hf2")
    assert code == 1 and "does not verify" in err and "model/extra.safetensors is not listed" in err
    assert "secret.txt is a symlink" in err
    assert not (tmp_path / "hf2").exists() and not list(tmp_path.glob(".hf2*"))
    ck2 = make_checkpoint(tmp_path / "ck", step=2)
    code, _, err = run_cli(capsys, "export", ck2, tmp_path / "hf")
    assert code == 1 and "not empty" in err


def test_inspect_verifies(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    good = make_checkpoint(root, step=1)
    code, out, _ = run_cli(capsys, "inspect", good)
    assert code == 0 and "verified: OK" in out and "step 1, micro-step 0" in out and "'zero_stage': 2" in out, out
    truncated = make_checkpoint(root, step=2)
    f = truncated / "rank00001" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    code, out, _ = run_cli(capsys, "inspect", truncated)
    assert code == 1 and "verified: FAIL" in out and "rank00001/optimizer.safetensors" in out, out
    assert "step 2, micro-step 0" in out  # still shows what it can
    unmarked = make_checkpoint(root, step=3)
    (unmarked / MARKER).unlink()
    code, out, _ = run_cli(capsys, "inspect", root)  # the root means the newest
    assert code == 1 and "verified: FAIL" in out and "no COMMITTED marker" in out and unmarked.name in out, out


def test_cli_bad_json_and_dangling_latest(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    ck = make_checkpoint(root)
    (ck / "trainer_state.json").write_text("{oops")
    m = manifest_of(ck)
    m["files"]["trainer_state.json"] = entry(ck / "trainer_state.json")
    reseal(ck, m)
    code, out, err = run_cli(capsys, "inspect", ck)  # verifies, but the state is unreadable
    assert code == 1 and "cannot read trainer_state.json" in out and "verified: OK" in out, out
    reseal(ck, b"{oops")
    for cmd in ("inspect", "verify", "list"):
        code, out, err = run_cli(capsys, cmd, ck)
        assert "manifest.json unreadable" in out, (cmd, out)
        assert code == (0 if cmd == "list" else 1), (cmd, code)
    (root / "latest").write_text(tag_for(99, 0) + "\n")
    code, out, err = run_cli(capsys, "inspect", root / "latest")
    assert code == 2 and err.strip() == f"{root / 'latest'} names {tag_for(99, 0)}, which does not exist in {root}"
    (root / "latest").write_text("../x\n")
    code, out, err = run_cli(capsys, "export", root / "latest", tmp_path / "hf")
    assert code == 2 and err.strip() == f"{root / 'latest'} does not name a checkpoint"
    code, out, err = run_cli(capsys, "inspect", root)  # the root: latest is only a hint
    assert ck.name in out and "names no checkpoint here" in err


def test_cli_accepts_run_dir_and_reports_missing_paths(tmp_path, capsys):
    run = tmp_path / "run"
    first = make_checkpoint(run / "checkpoints", step=1)
    newest = make_checkpoint(run / "checkpoints", step=2)
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 0 and f"OK   {first.name}" in out and f"OK   {newest.name}" in out, out
    code, out, _ = run_cli(capsys, "inspect", run)
    assert code == 0 and str(newest) in out and "verified: OK" in out
    (first / "rank00000" / "stray").write_text("x")
    code, out, _ = run_cli(capsys, "list", run)
    assert code == 0 and "samples" in out, out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "FAIL" in rows[first.name] and "stray is not listed" in rows[first.name]
    assert rows[newest.name].rstrip().endswith("committed <- latest") and " 16 " in rows[newest.name]
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 1 and f"FAIL {first.name}" in out
    for cmd in ("list", "inspect", "verify"):
        code, out, err = run_cli(capsys, cmd, tmp_path / "nope")
        assert code == 2 and err.strip() == f"{tmp_path / 'nope'} does not exist", (cmd, err)
    code, out, err = run_cli(capsys, "export", tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "list", tmp_path / "empty")
    assert code == 1 and "no checkpoints in" in err


def test_export_zero3_consolidates_listed_shards(tmp_path, capsys):
    """No model/ dir: the per-rank partitions are consolidated; tokenizer files come along."""
    from seqpar.config import ModelConfig
    from seqpar.models.hf import load_hf_checkpoint
    from seqpar.models.transformer import Transformer

    arch = {"arch": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    model = Transformer(ModelConfig.model_validate(arch))
    store = CheckpointStore(tmp_path / "ck")
    tag = tag_for(1, 0)
    part = store.begin(tag)
    files = []
    for r in range(2):  # ZeRO-3 partitions: each rank holds half of every flattened (padded) parameter
        shard = {}
        for n, p in model.named_parameters():
            flat = torch.cat([p.detach().flatten(), torch.zeros(p.numel() % 2)])
            shard[n] = flat.chunk(2)[r].clone()
        (part / f"rank{r:05d}").mkdir()
        files += codec.save_tree(shard, part / f"rank{r:05d}" / "model_shard")
    (part / "config.yaml").write_text(yaml.safe_dump({"model": arch}))
    (part / "tokenizer.json").write_text("{}")
    files += [part / "config.yaml", part / "tokenizer.json"]
    position = {"step": 1, "micro_step": 0, "window_samples": 0, "consumed_samples": 8}
    ck = store.commit(tag, describe_files(part, files), {"position": position})
    code, out, err = run_cli(capsys, "export", ck, tmp_path / "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}" and (tmp_path / "hf" / "config.json").is_file()
    back = Transformer(ModelConfig.model_validate(arch))
    load_hf_checkpoint(back, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
