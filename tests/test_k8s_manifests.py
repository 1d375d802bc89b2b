"""Static checks of the Kubernetes example in scripts/k8s/ and of docs/kubernetes.md.

No cluster is needed: the manifests are parsed with yaml, the container's command with torchrun's and
seqpar's own argument parsers, and the training config is loaded and laid out for the world size
the manifest launches. ``check`` returns the problems it finds; ``test_each_check_bites`` breaks one
field at a time in a copy and asserts that the matching problem is reported, so no check is dead.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "scripts" / "k8s"
DOC = ROOT / "docs" / "kubernetes.md"
WRAPPER = "scripts/auto_restart.sh"
INDEX_VAR = "$(JOB_COMPLETION_INDEX)"  # the kubelet expands it from the env the Job controller sets


def load_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"want exactly one {kind} in scripts/k8s/*.yaml, found {len(found)}"
    return found[0]


def trainer(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def argv(job: dict) -> list[str]:
    c = trainer(job)
    return list(c.get("command") or []) + list(c.get("args") or [])


# -- podFailurePolicy, evaluated the way the Job controller does: first matching rule wins ----------
def failure_action(rules: list[dict], container: str, exit_code: int, conditions: tuple[str, ...] = ()) -> str:
    for rule in rules:
        req = rule.get("onExitCodes")
        if req and req.get("containerName") in (None, container):
            values = req.get("values", [])
            if (req.get("operator") == "In" and exit_code in values) or \
               (req.get("operator") == "NotIn" and exit_code not in values):
                return rule["action"]
        for pattern in rule.get("onPodConditions") or []:
            if pattern.get("type") in conditions and pattern.get("status", "True") == "True":
                return rule["action"]
    return "Count"  # no rule: counted against backoffLimit


def doc_table(text: str) -> dict[str, str]:
    """First cell -> second cell of every Markdown table row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2:
            rows.setdefault(cells[0], cells[1])
    return rows


def check(docs: list[dict], doc_text: str, tmp: Path) -> list[str]:
    from torch.distributed.run import get_args_parser

    from seqpar.config import ConfigError, load_config, parse_overrides
    from seqpar.train import parse_args

    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    job, svc, pvc = one(docs, "Job"), one(docs, "Service"), one(docs, "PersistentVolumeClaim")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = trainer(job)

    # -- the Job: restarts, failure policy -----------------------------------------------------------
    need(job.get("apiVersion") == "batch/v1", "Job: apiVersion must be batch/v1")
    need(pod.get("restartPolicy") == "Never", "restartPolicy: must be Never (podFailurePolicy requires it)")
    need(isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 1,
         "backoffLimit: set it (>= 1) so real crashes end the Job")
    need(spec.get("podReplacementPolicy") == "Failed",
         "podReplacementPolicy: must be Failed (new pod only after the old ranks are gone)")
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    name = c.get("name")
    need(failure_action(rules, name, 75) == "Ignore", "podFailurePolicy: exit 75 (preempted, saved) must be Ignore")
    need(failure_action(rules, name, 2) == "FailJob", "podFailurePolicy: exit 2 (user error) must be FailJob")
    need(failure_action(rules, name, 137, ("DisruptionTarget",)) == "Ignore",
         "podFailurePolicy: a DisruptionTarget pod must be Ignore")
    for code in (1, 74, 137):  # a catch-all Ignore would retry a broken run forever
        need(failure_action(rules, name, code) == "Count",
             f"podFailurePolicy: exit {code} must count against backoffLimit")
    for rule in rules:
        req = rule.get("onExitCodes") or {}
        vals = req.get("values", [])
        need(vals == sorted(set(vals)) and not (req.get("operator") == "In" and 0 in vals),
             f"podFailurePolicy: values {vals} must be sorted, unique, without 0 (API validation)")

    # -- the command: wrapper as PID 1, then torchrun, then seqpar/train.py ------------------------
    cmd = argv(job)
    need(cmd[:2] == ["bash", WRAPPER] and (ROOT / WRAPPER).is_file(),
         f"command: PID 1 must be `bash {WRAPPER}` (it owns SIGTERM and the exit code)")
    need("args" not in c or "command" in c, "command: set `command`, not only `args` (an ENTRYPOINT would be PID 1)")
    need(len(cmd) > 2 and cmd[2] == "torchrun", "command: the wrapper must launch torchrun")
    if "torchrun" not in cmd:
        return problems
    need(not any(a.startswith(("--shutdown_timeout", "--shutdown-timeout")) for a in cmd),
         "command: no --shutdown_timeout (torch 2.11's torchrun rejects it): set "
         "TORCH_ELASTIC_SHUTDOWN_TIMEOUT in env")
    try:
        tr = get_args_parser().parse_args([a.replace(INDEX_VAR, "0") for a in cmd[cmd.index("torchrun") + 1:]])
    except SystemExit:
        problems.append("command: torchrun rejects its arguments")
        return problems
    need(tr.training_script == "seqpar/train.py" and (ROOT / tr.training_script).is_file(),
         "command: torchrun must run seqpar/train.py")
    need(tr.rdzv_backend == "static",
         "command: --rdzv_backend must be static (--node_rank/--master_addr used only then)")
    need(any(a in (f"--node_rank={INDEX_VAR}", f"--node-rank={INDEX_VAR}") for a in cmd) or
         any(a in ("--node_rank", "--node-rank") and b == INDEX_VAR for a, b in zip(cmd, cmd[1:])),
         f"command: --node_rank must be {INDEX_VAR}")
    need(tr.max_restarts == 0, "command: --max_restarts must be 0 (the wrapper restarts)")
    env = {e.get("name"): e.get("value") for e in c.get("env") or []}
    shutdown = env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    shutdown = int(shutdown) if isinstance(shutdown, str) and shutdown.isdigit() else None
    need(shutdown is not None, "env: set TORCH_ELASTIC_SHUTDOWN_TIMEOUT explicitly (torchrun's default 30 s is "
                               "too short for a save)")
    grace = pod.get("terminationGracePeriodSeconds")
    need(isinstance(grace, int) and isinstance(shutdown, int) and grace > shutdown > 0,
         f"terminationGracePeriodSeconds ({grace}) must exceed TORCH_ELASTIC_SHUTDOWN_TIMEOUT ({shutdown}) > 0")

    # -- nodes, GPUs ---------------------------------------------------------------------------------
    nnodes = int(tr.nnodes) if str(tr.nnodes).isdigit() else None
    need(spec.get("completionMode") == "Indexed",
         "completionMode: must be Indexed (index = node rank, hostname <job>-<i>)")
    need(spec.get("completions") == spec.get("parallelism") == nnodes,
         f"completions / parallelism / --nnodes must be equal: {spec.get('completions')} / "
         f"{spec.get('parallelism')} / {tr.nnodes}")
    gpus = (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
    need(str(gpus) == str(tr.nproc_per_node),
         f"--nproc_per_node ({tr.nproc_per_node}) must equal nvidia.com/gpu ({gpus})")

    # -- headless Service and DNS name of pod 0 ------------------------------------------------------
    labels = job["spec"]["template"].get("metadata", {}).get("labels") or {}
    sel = svc["spec"].get("selector") or {}
    need(svc["spec"].get("clusterIP") == "None", "Service: clusterIP must be None (headless)")
    need(bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
         "Service: selector must match the pod template's labels")
    need(pod.get("subdomain") == svc["metadata"]["name"], "subdomain: must be the headless Service's name")
    need(tr.master_addr == f"{job['metadata']['name']}-0.{svc['metadata']['name']}",
         f"command: --master_addr must be <job>-0.<service>, got {tr.master_addr}")
    need(tr.master_port in [p.get("port") for p in svc["spec"].get("ports") or []] or not svc["spec"].get("ports"),
         "Service: its port must be --master_port")

    # -- volumes: shared run dir, /dev/shm -------------------------------------------------------------
    need("ReadWriteMany" in (pvc["spec"].get("accessModes") or []), "PVC: accessModes must include ReadWriteMany")
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    pvc_vols = {n for n, v in vols.items()
                if (v.get("persistentVolumeClaim") or {}).get("claimName") == pvc["metadata"]["name"]}
    mounts = [m for m in c.get("volumeMounts") or [] if m["name"] in pvc_vols and not m.get("readOnly")]
    need(len(mounts) == 1, "volumeMounts: the trainer must mount the RWX claim read-write once")
    mount = mounts[0]["mountPath"].rstrip("/") + "/" if mounts else "/nonexistent/"
    shm = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"]
    need(bool(shm) and (vols.get(shm[0]["name"], {}).get("emptyDir") or {}).get("medium") == "Memory",
         "/dev/shm: mount an emptyDir with medium Memory (NCCL)")

    # -- seqpar's own view of the command line ----------------------------------------------------------
    targs, overrides = parse_args(tr.training_script_args)
    need(targs.resume is None, "command: no --resume (auto_restart.sh appends --resume auto)")
    need("--resume auto" in (ROOT / WRAPPER).read_text(), f"{WRAPPER} no longer appends --resume auto")
    over = parse_overrides(overrides)
    run_dir = str((over.get("logging") or {}).get("run_dir", ""))
    need(run_dir.startswith(mount), f"--logging.run_dir ({run_dir!r}) must be under the claim's mountPath {mount}")
    # inputs that live on the cluster are swapped for stand-ins; everything else is validated as is
    stand_in = tmp / "tokens.bin"
    stand_in.write_bytes(b"")
    local = [*overrides, "--model.hf_path", "null", "--data.paths", f"[{stand_in}]"]
    try:
        cfg = load_config(ROOT / targs.config if targs.config else None, local)
        cfg.layout(max(nnodes or 1, 1) * int(tr.nproc_per_node))
        ckpt = str(cfg.checkpoint.dir or f"{cfg.logging.run_dir}/checkpoints")
        need(ckpt.startswith(mount), f"checkpoint dir {ckpt!r} must be on the shared claim {mount}")
    except (ConfigError, ValueError) as e:
        problems.append(f"config: {e}")

    # -- the numbers docs/kubernetes.md states about this manifest -------------------------------------
    table = doc_table(doc_text)

    def doc_says(key: str, value: Any) -> None:
        need(table.get(key) == str(value),
             f"docs/kubernetes.md: row {key} says {table.get(key)!r}, manifest {value!r}")

    doc_says("`terminationGracePeriodSeconds`", grace)
    doc_says("`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`", shutdown)
    doc_says("`backoffLimit`", spec.get("backoffLimit"))
    doc_says("`completions` = `parallelism` = `--nnodes`", spec.get("completions"))
    doc_says("`--nproc_per_node` = `nvidia.com/gpu`", tr.nproc_per_node)
    doc_says("`--master_addr`", f"`{tr.master_addr}`")
    doc_says("`--master_port`", tr.master_port)
    doc_says("`--logging.run_dir`", f"`{run_dir}`")
    doc_says("PVC `storage`", pvc["spec"]["resources"]["requests"]["storage"])
    est = table.get("estimated stop path (s)", "")
    need(est.isdigit() and int(est) < (shutdown or 0),
         f"docs/kubernetes.md: the estimated stop path ({est!r} s) must fit in TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    blocks = re.findall(r"```\n(bash scripts/auto_restart\.sh .*?)```", doc_text, re.S)
    need(any(b.split() == cmd + ["--resume", "auto"] for b in blocks),
         "docs/kubernetes.md: the command block must be the manifest's command + --resume auto")
    return problems


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text()


def test_manifests_pass(tmp_path: Path, doc_text: str) -> None:
    assert check(load_manifests(), doc_text, tmp_path) == []


# -- each check must fail when its field is removed or wrong -------------------------------------------
def _job(d):
    return one(d, "Job")


def _pod(d):
    return _job(d)["spec"]["template"]["spec"]


def _cmd(d):
    return trainer(_job(d))["command"]


def _set(d, prefix: str, new: str | None):
    """Replace (or drop, when ``new`` is None) the command token starting with ``prefix``."""
    cmd = _cmd(d)
    i = next(i for i, a in enumerate(cmd) if a.startswith(prefix))
    cmd[i:i + 1] = [] if new is None else [new]


def _set_env(d, name: str, value: str | None):
    """Set (or drop, when ``value`` is None) the trainer's environment variable ``name``."""
    env = trainer(_job(d))["env"]
    env[:] = [e for e in env if e["name"] != name] + ([{"name": name, "value": value}] if value is not None else [])


def _rules(d):
    return _job(d)["spec"]["podFailurePolicy"]["rules"]


def _drop_rule(d, pred: Callable[[dict], bool]):
    _job(d)["spec"]["podFailurePolicy"]["rules"] = [r for r in _rules(d) if not pred(r)]


def _exit_rule(code: int) -> Callable[[dict], bool]:
    return lambda r: code in (r.get("onExitCodes") or {}).get("values", [])


MUTATIONS: dict[str, tuple[Callable[[list], Any], str]] = {
    "no restartPolicy": (lambda d: _pod(d).pop("restartPolicy"), "restartPolicy"),
    "restartPolicy OnFailure": (lambda d: _pod(d).update(restartPolicy="OnFailure"), "restartPolicy"),
    "no backoffLimit": (lambda d: _job(d)["spec"].pop("backoffLimit"), "backoffLimit"),
    "no podReplacementPolicy": (lambda d: _job(d)["spec"].pop("podReplacementPolicy"), "podReplacementPolicy"),
    "no 75 rule": (lambda d: _drop_rule(d, _exit_rule(75)), "exit 75"),
    "75 counted": (lambda d: next(r for r in _rules(d) if _exit_rule(75)(r)).update(action="Count"), "exit 75"),
    "no 2 rule": (lambda d: _drop_rule(d, _exit_rule(2)), "exit 2"),
    "2 ignored": (lambda d: next(r for r in _rules(d) if _exit_rule(2)(r)).update(action="Ignore"), "exit 2"),
    "no DisruptionTarget rule": (lambda d: _drop_rule(d, lambda r: "onPodConditions" in r), "DisruptionTarget"),
    "rules name another container": (lambda d: [r["onExitCodes"].update(containerName="main")
                                                for r in _rules(d) if "onExitCodes" in r], "exit 75"),
    "catch-all Ignore first": (lambda d: _rules(d).insert(0, {"action": "Ignore", "onExitCodes":
                                                             {"operator": "NotIn", "values": [0]}}), "exit 1 must"),
    "unsorted values": (lambda d: _rules(d)[0]["onExitCodes"].update(values=[75, 2]), "sorted"),
    "not Indexed": (lambda d: _job(d)["spec"].pop("completionMode"), "completionMode"),
    "parallelism != completions": (lambda d: _job(d)["spec"].update(parallelism=1), "completions / parallelism"),
    "--nnodes != completions": (lambda d: _set(d, "--nnodes", "--nnodes=3"), "completions / parallelism"),
    "grace < shutdown_timeout": (lambda d: _pod(d).update(terminationGracePeriodSeconds=200),
                                 "terminationGracePeriodSeconds"),
    "no grace": (lambda d: _pod(d).pop("terminationGracePeriodSeconds"), "terminationGracePeriodSeconds"),
    "no shutdown timeout": (lambda d: _set_env(d, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None),
                            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT explicitly"),
    "--shutdown_timeout flag": (lambda d: _cmd(d).insert(4, "--shutdown_timeout=240"), "no --shutdown_timeout"),
    "args, not command": (lambda d: trainer(_job(d)).update(args=trainer(_job(d)).pop("command")), "`command`"),
    "torchrun is PID 1": (lambda d: _cmd(d).__delitem__(slice(0, 2)), "PID 1"),
    "deepspeed launcher": (lambda d: _cmd(d).__setitem__(2, "deepspeed"), "launch torchrun"),
    "other script": (lambda d: _set(d, "seqpar/train.py", "scripts/gpu_selftest.py"), "seqpar/train.py"),
    "torchrun restarts": (lambda d: _set(d, "--max_restarts", "--max_restarts=3"), "--max_restarts"),
    "fixed node rank": (lambda d: _set(d, "--node_rank", "--node_rank=0"), "--node_rank"),
    "c10d rendezvous": (lambda d: _set(d, "--rdzv_backend", "--rdzv_backend=c10d"), "static"),
    "wrong master_addr": (lambda d: _set(d, "--master_addr", "--master_addr=seqpar-8b-0"), "--master_addr"),
    "wrong master_port": (lambda d: _set(d, "--master_port", "--master_port=29501"), "--master_port"),
    "explicit --resume": (lambda d: _cmd(d).extend(["--resume", "none"]), "--resume"),
    "GPUs != nproc": (lambda d: trainer(_job(d))["resources"]["limits"].update({"nvidia.com/gpu": 4}),
                      "nvidia.com/gpu"),
    "run_dir off the claim": (lambda d: _set(d, "--logging.run_dir", "--logging.run_dir=/tmp/run"), "run_dir"),
    "checkpoints off the claim": (lambda d: _cmd(d).append("--checkpoint.dir=/tmp/ck"), "checkpoint dir"),
    "claim mounted read-only": (lambda d: [m.update(readOnly=True) for m in trainer(_job(d))["volumeMounts"]
                                           if m["name"] == "runs"], "read-write"),
    "PVC ReadWriteOnce": (lambda d: one(d, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"]),
                          "ReadWriteMany"),
    "no /dev/shm": (lambda d: trainer(_job(d)).update(volumeMounts=[m for m in trainer(_job(d))["volumeMounts"]
                                                                   if m["mountPath"] != "/dev/shm"]), "/dev/shm"),
    "Service not headless": (lambda d: one(d, "Service")["spec"].pop("clusterIP"), "headless"),
    "selector misses pods": (lambda d: one(d, "Service")["spec"]["selector"].update(x="y"), "selector"),
    "no subdomain": (lambda d: _pod(d).pop("subdomain"), "subdomain"),
    "layout impossible": (lambda d: (_set(d, "--nproc_per_node", "--nproc_per_node=3"),
                                     trainer(_job(d))["resources"]["limits"].update({"nvidia.com/gpu": 3})),
                          "config:"),
    "doc out of date": (lambda d: (_pod(d).update(terminationGracePeriodSeconds=900),
                                   _set_env(d, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "800")), "docs/kubernetes.md"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_check_bites(name: str, tmp_path: Path, doc_text: str) -> None:
    docs = copy.deepcopy(load_manifests())
    mutate, expected = MUTATIONS[name]
    mutate(docs)
    problems = check(docs, doc_text, tmp_path)
    assert any(expected in p for p in problems), f"{name}: no problem mentioning {expected!r} in {problems}"


DOC_MUTATIONS = {
    "grace row": ("| `terminationGracePeriodSeconds` | 300 |", "| `terminationGracePeriodSeconds` | 120 |"),
    "estimate over the timeout": ("| estimated stop path (s) | 145 |", "| estimated stop path (s) | 280 |"),
    "PVC size row": ("| PVC `storage` | 1Ti |", "| PVC `storage` | 500Gi |"),
    "command block": ("--max_restarts=0\n", "--max_restarts=1\n"),
}


@pytest.mark.parametrize("name", list(DOC_MUTATIONS))
def test_doc_checks_bite(name: str, tmp_path: Path, doc_text: str) -> None:
    old, new = DOC_MUTATIONS[name]
    assert old in doc_text, f"{name}: docs/kubernetes.md no longer contains {old!r}; update this test"
    problems = check(load_manifests(), doc_text.replace(old, new), tmp_path)
    assert any("docs/kubernetes.md" in p for p in problems), f"{name}: not detected: {problems}"
