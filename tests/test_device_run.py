"""scripts/device_run.sh, checked on CPU: a GPU is lent rarely and briefly, so every command the script
would run there must be valid before it gets there (DRY_RUN=1 prints them instead of running them)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _dry_run(tmp_path: Path, *phases: str) -> list[tuple[str, list[str]]]:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_run.sh"), *phases], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={**ENV, "DRY_RUN": "1", "OUT": str(tmp_path / "out")})
    assert r.returncode == 0, r.stdout + r.stderr
    steps = []
    for line in r.stdout.splitlines():
        if line.startswith("DRY "):
            name, _, cmd = line[4:].partition("\t")
            steps.append((name, shlex.split(cmd)))
    return steps


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train_dry", ROOT / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_dry"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_device_run_commands_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # the script's paths are relative to the repository root, where it runs
    steps = _dry_run(tmp_path)
    names = [n for n, _ in steps]
    # the measurements come first, in the issues' order: speed (11, 13), then memory (12), then checks
    assert names.index("train 32K") < names.index("moe") < names.index("128K offload=false") < names.index("selftest")
    out_files = set()
    profiled: list[str] = []  # profile directories of the train.py runs so far
    written: dict[str, str] = {}  # configs bench_train --write-config writes there -> written here
    bt = _bench_train()
    for name, cmd in steps:
        out_files |= {a for a in cmd if a.startswith(str(tmp_path / "out"))}
        if cmd[:2] == ["python3", "scripts/bench_train.py"]:
            # parse and validate the config each run would build, at its lengths, with the CPU's settings
            args, overrides = bt.parse_args(cmd[2:])
            if args.write_config:  # write it here (no training): a later step's --config reads it
                local = str(tmp_path / Path(args.write_config).name)
                argv = [local if a == args.write_config else a for a in cmd[2:]]
                r = subprocess.run([sys.executable, "scripts/bench_train.py", *argv], capture_output=True, text=True,
                                   timeout=120, cwd=ROOT, env=ENV)
                assert r.returncode == 0 and Path(local).is_file(), f"{name}: {r.stderr[-2000:]}"
                written[args.write_config] = local
            lengths = [args.probe] if args.probe else [int(x) for x in args.seq_lens.split(",")]
            for extra in [[]] + [v for _, v in args.variant]:
                base = bt.base_config(args, overrides + extra)
                for s in lengths:
                    cfg = bt.build_config(args, base, s, tmp_path / "run")
                    assert cfg.data.seq_len == s, name
                    if args.doc_len:  # rows of --doc-len documents
                        assert cfg.data.passkey.curriculum_start_len == args.doc_len and not cfg.data.shuffle
        elif cmd[:3] == ["python3", "-m", "seqpar.plan"]:
            r = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT,
                               env=ENV)
            assert r.returncode in (0, 1), f"{name}: {r.stderr[-2000:]}"  # 1: does not fit (still a prediction)
            assert re.match(r"(fits|does not fit): predicted peak [\d.]+ GiB", r.stdout.strip().splitlines()[-1]), name
        elif "seqpar/train.py" in cmd:
            i = cmd.index("seqpar/train.py")
            if "--logging.profile" in cmd:
                profiled.append(cmd[cmd.index("--logging.run_dir") + 1] + "/profile/")
            argv = [written.get(a, a) for a in cmd[i:]]
            config = argv[argv.index("--config") + 1]
            assert config in written.values() or not config.startswith("/"), f"{name}: no earlier step writes {config}"
            r = subprocess.run([sys.executable, *argv, "--print-config"], capture_output=True, text=True,
                               timeout=120, cwd=ROOT, env=ENV)
            assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        elif cmd[0] == "head":  # shows what an earlier step wrote: the profile table of a profiled run
            assert any(cmd[-1].startswith(d) for d in profiled), name
        else:
            script = next(a for a in cmd if a.startswith("scripts/"))
            flags = cmd[cmd.index(script) + 1:]
            assert (ROOT / script).is_file(), name
            if not flags:
                continue
            r = subprocess.run([sys.executable, script, *flags, "--help"], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env=ENV)
            assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"  # types and choices of the flags before --help
            for flag in (a.split("=")[0] for a in flags if a.startswith("--")):
                assert flag in r.stdout, f"{name}: {script} has no {flag}"
    # the device returns at most 8 files from $OUT: the logs, the JSON rows and gpu.txt must fit
    logs = {a for a in re.findall(r'"\$OUT/([\w.]+)"', (ROOT / "scripts" / "device_run.sh").read_text())}
    assert len(logs | {Path(f).name for f in out_files}) <= 8, logs | out_files


def test_device_run_phases_and_budget(tmp_path: Path):
    assert [n for n, _ in _dry_run(tmp_path, "checks")][0] == "selftest"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "device_run.sh"), "speed"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={**ENV, "DRY_RUN": "1", "BUDGET": "0", "OUT": str(tmp_path / "o")})
    assert r.returncode == 0 and "DRY" not in r.stdout
    assert "device_run: skipped train 32K (0 s left of 0, needs 120)" in r.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "device_run.sh"), "sped"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**ENV, "DRY_RUN": "1", "OUT": str(tmp_path / "o")})
    assert bad.returncode == 2 and "unknown phase 'sped'" in bad.stderr


@pytest.mark.parametrize("script", ["device_wheels.sh", "device_run.sh"])
def test_device_scripts_parse(script: str):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0
