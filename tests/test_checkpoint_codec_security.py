"""A checkpoint is untrusted input: the codec refuses skeletons that name non-dtypes, unknown classes
or fields, non-plain object state or malformed tags, and real DeepSpeed state still round-trips."""

from __future__ import annotations

import inspect
import json
import os
import re
from collections import namedtuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from deepspeed.runtime.fp16 import loss_scaler as ds_scaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import save_file

from seqpar.checkpoint import codec
from seqpar.checkpoint.codec import CodecError, decode, encode, load_tree, save_tree

LS = "deepspeed.runtime.fp16.loss_scaler:LossScaler"
DLS = "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler"
FRAG = "deepspeed.utils.tensor_fragment:fragment_address"
ZSE = "deepspeed.runtime.zero.config:ZeroStageEnum"

Pair = namedtuple("Pair", "a b")


@pytest.fixture
def with_pair(monkeypatch):
    monkeypatch.setattr(codec, "ALLOWED_CLASSES", codec.ALLOWED_CLASSES | {f"{__name__}:Pair"})


def refused(skeleton, match: str, tensors: dict | None = None) -> list[str]:
    """Both the checker and the decoder refuse ``skeleton`` with a message containing ``match``."""
    tensors = {"0": torch.ones(2)} if tensors is None else tensors
    with pytest.raises(CodecError, match=re.escape(match)):
        decode(skeleton, tensors)
    problems = check_skeleton(skeleton, set(tensors))
    assert problems and any(match in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    return problems


def check_skeleton(skeleton, tensor_keys=None) -> list[str]:
    """Looked up per call, so against a codec without it each test fails on its own (not collection)."""
    return codec.check_skeleton(skeleton, tensor_keys)


def obj(cls: str, **state) -> dict:
    return {"__object__": cls, "state": state}


def dyn_state(**extra) -> dict:
    """A real DynamicLossScaler's encoded state, plus ``extra``."""
    s = ds_scaler.DynamicLossScaler(init_scale=2**16, scale_window=4, min_scale=1, delayed_shift=2,
                                    consecutive_hysteresis=False)
    return {**encode(vars(s))[0], **extra}


@pytest.mark.parametrize("name", ["load", "nn", "Tensor", "save", "from_numpy", "__builtins__", "float16.x", 3])
def test_hostile_dtype_names(name):
    refused({"x": {"__dtype__": name}}, "not a torch dtype")


def test_every_real_dtype_round_trips():
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    skeleton, tensors = encode(sorted(dtypes, key=str))
    assert check_skeleton(skeleton, set(tensors)) == []
    assert decode(skeleton, tensors) == sorted(dtypes, key=str)


@pytest.mark.parametrize("field", ["update_scale", "scale_gradient", "backward", "_has_inf_or_nan", "__class__",
                                   "__dict__", "loss_scale", "has_overflow_serial"])
def test_object_field_naming_a_method_is_refused(field):
    problems = refused({"optimizer": {"loss_scaler": obj(DLS, **dyn_state(**{field: 1}))}},
                       f"optimizer.loss_scaler.{field}: {DLS} may not carry field")
    assert len(problems) == 1


def test_object_unknown_field_is_refused():
    refused(obj(LS, cur_scale=1.0, dynamic=False, min_scale=1), f"min_scale: {LS} may not carry field")
    refused(obj(FRAG, numel=1, start=0, extra=2), "extra")
    refused(obj(LS, **{"7": 1}), "may not carry field '7'")


@pytest.mark.parametrize("value,what", [
    ({"__tensor__": "0"}, "__tensor__"), ({"__ndarray__": "0"}, "__ndarray__"),
    (obj(LS, cur_scale=1.0), "__object__"), ({"__dtype__": "float16"}, "__dtype__"),
    ({"__enum__": ZSE, "name": "weights"}, "__enum__"), ({"__tuple__": [1]}, "__tuple__"),
    ({"__items__": [[1, 2]]}, "__items__"), ([1, {"a": {"__tensor__": "0"}}], "__tensor__"),
])
def test_object_field_values_must_be_plain(value, what):
    problems = refused({"s": obj(LS, cur_scale=value)}, f"field 'cur_scale' of {LS} must be plain data, not {what}")
    assert problems[0].startswith("s.cur_scale")


def test_dtype_only_in_dtype_fields():
    assert check_skeleton(obj(DLS, **dyn_state(dtype={"__dtype__": "float16"}))) == []
    refused(obj(DLS, **dyn_state(dtype={"__dtype__": "nn"})), "'nn' is not a torch dtype")
    refused(obj(DLS, **dyn_state(cur_scale={"__dtype__": "float16"})), "must be plain data, not __dtype__")
    refused(obj(DLS, **dyn_state(dtype={"__tensor__": "0"})), "must be plain data or a dtype, not __tensor__")


def test_plain_values_are_accepted():
    state = dict(cur_scale={"__float__": "inf"}, dynamic=True, cur_iter=None, scale_window=[1, "a", {"b": [2.5]}])
    skeleton = obj(DLS, **state)
    assert check_skeleton(skeleton, set()) == []
    assert vars(decode(skeleton, {}))["cur_scale"] == float("inf")


def test_object_of_enum_or_namedtuple_class_is_refused(with_pair):
    refused(obj(ZSE), "lists no fields")
    refused(obj(f"{__name__}:Pair", a=1), "lists no fields")


def test_namedtuple_fields_must_match_exactly(with_pair):
    pair = f"{__name__}:Pair"
    assert decode({"__namedtuple__": pair, "fields": {"a": 1, "b": {"__tensor__": "0"}}}, {"0": torch.ones(1)}).a == 1
    refused({"__namedtuple__": pair, "fields": {"a": 1, "b": 2, "c": 3}}, "needs exactly the fields ['a', 'b']")
    refused({"__namedtuple__": pair, "fields": {"a": 1}}, "needs exactly the fields")
    refused({"__namedtuple__": pair, "fields": [1, 2]}, "needs exactly the fields")
    refused({"__namedtuple__": FRAG, "fields": {"numel": 1, "start": 0}}, "is not a namedtuple")


@pytest.mark.parametrize("name", ["nope", "__class__", "_member_map_", "mro", 3, None])
def test_enum_name_must_be_a_member(name):
    refused({"z": {"__enum__": ZSE, "name": name}}, f"z: {ZSE} has no member")


def test_enum_tag_on_non_enum_is_refused():
    refused({"__enum__": LS, "name": "cur_scale"}, "is not an enum")


@pytest.mark.parametrize("skeleton,match", [
    ({"__tensor__": "0", "extra": 1}, "a __tensor__ dict must have exactly the keys ['__tensor__']"),
    ({"__ndarray__": "0", "__tuple__": []}, "must have exactly the keys"),
    ({"__float__": "inf", "x": 1}, "a __float__ dict must have exactly"),
    ({"__dtype__": "float16", "name": "x"}, "a __dtype__ dict must have exactly"),
    ({"__tuple__": [1], "__items__": []}, "must have exactly the keys"),
    ({"__enum__": ZSE, "name": "weights", "x": 1}, "a __enum__ dict must have exactly"),
    ({"__enum__": ZSE}, "a __enum__ dict must have exactly"),
    ({"__object__": LS, "state": {}, "more": 1}, "a __object__ dict must have exactly"),
    ({"__object__": LS}, "a __object__ dict must have exactly"),
    ({"__namedtuple__": FRAG, "fields": {}, "x": 0}, "a __namedtuple__ dict must have exactly"),
    ({"a": {"__weird__": 1}}, "a: unknown tag '__weird__'"),
])
def test_tagged_dicts_must_have_exactly_their_keys(skeleton, match):
    refused(skeleton, match)


@pytest.mark.parametrize("skeleton,match", [
    ({"__tensor__": 0}, "must be a tensor key (a string)"), ({"__tensor__": ["0"]}, "must be a tensor key"),
    ({"__ndarray__": None}, "must be a tensor key"), ({"__tuple__": {"a": 1}}, "__tuple__ must be a list"),
    ({"__items__": [[1]]}, "list of [key, value] pairs"), ({"__items__": {"1": 2}}, "list of [key, value] pairs"),
    ({"__float__": "1e400x"}, "__float__ must be one of"), ({"__float__": 1.5}, "__float__ must be one of"),
    ({"__object__": ["os:system"], "state": {}}, "is not allowed to be loaded"),
    ({"__object__": "os:system", "state": {}}, "class 'os:system' is not allowed to be loaded"),
    ({"__enum__": "builtins:type", "name": "mro"}, "is not allowed to be loaded"),
    ({"__object__": LS, "state": [["cur_scale", 1]]}, "must be a dict"),
])
def test_malformed_tags(skeleton, match):
    refused(skeleton, match)


@pytest.mark.parametrize("key,what", [
    ({"__tensor__": "0"}, "__tensor__"), ({"__dtype__": "float16"}, "__dtype__"),
    ({"__enum__": ZSE, "name": "weights"}, "__enum__"), (obj(LS, cur_scale=1.0), "__object__"),
    ({"a": 1}, "a dict"), ({"__tuple__": [1, {"__tensor__": "0"}]}, "__tensor__"), ([[{"a": 1}]], "a dict"),
])
def test_items_keys_must_be_hashable_plain(key, what):
    refused({"state": {"__items__": [[key, 1]]}}, f"a dict key must be a hashable plain value, not {what}")


def test_items_plain_keys_still_work():
    tree = {0: "a", "__x": 1, (1, "b", None): 2, float("inf"): 3, True: 4, None: 5, 2.5: 6}
    skeleton, tensors = encode(tree)
    assert check_skeleton(skeleton, set(tensors)) == [] and decode(skeleton, tensors) == tree
    assert decode({"__items__": [[[1, [2]], "legacy list key"]]}, {}) == {(1, (2,)): "legacy list key"}


def test_tensor_key_not_in_file(tmp_path):
    refused({"w": {"__tensor__": "1"}}, "w: tensor '1' is not in the tensor file")
    refused({"w": [{"__ndarray__": "0"}]}, "w[0]: tensor '0' is not in the tensor file", tensors={})
    assert check_skeleton({"w": {"__tensor__": "1"}}) == []  # keys unknown: shape only
    (tmp_path / "a.json").write_text(json.dumps({"w": {"__tensor__": "0"}}))
    with pytest.raises(CodecError, match="not in the tensor file"):  # no tensor file at all
        load_tree(tmp_path / "a")
    save_file({"0": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "a.json").write_text(json.dumps({"w": {"__tensor__": "0"}, "v": {"__tensor__": "7"}}))
    for lazy in (False, True):
        with pytest.raises(CodecError, match="v: tensor '7' is not in the tensor file"):
            load_tree(tmp_path / "a", lazy=lazy)


def test_problems_are_all_reported_one_line_each():
    skeleton = {"a": {"__dtype__": "load"}, "b": obj(LS, run="x\ny"), "c": {"__tensor__": "5", "x": 1},
                "d": {"__items__": [[{"__tensor__": "0"}, 1]]}, "e": {"__enum__": ZSE, "name": "x\n" * 100}}
    problems = check_skeleton(skeleton, {"0"})
    starts = ["a: ", "b.run: ", "c: ", "d[{'__tensor__': '0'}]: ", "e: "]
    assert len(problems) == 5 and all(p.startswith(w) for p, w in zip(problems, starts)), problems
    assert all("\n" not in p and len(p) < 300 for p in problems)
    assert check_skeleton([[[]]] * 3) == [] and check_skeleton(object()) == ["top level: object is not JSON data"]


def test_deeply_nested_skeleton_is_refused_not_crashed():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert check_skeleton(deep) == ["skeleton is nested too deeply"]


def test_encode_refuses_what_decode_would(with_pair):
    s = ds_scaler.DynamicLossScaler(init_scale=8.0, scale_window=2, min_scale=1, delayed_shift=1,
                                    consecutive_hysteresis=False)
    s.update_scale = lambda overflow: None  # an instance attribute shadowing the method
    with pytest.raises(CodecError, match=r"DynamicLossScaler.*update_scale"):
        encode({"opt": {"loss_scaler": s}})
    for field, value, match in [("foo", 1, "may not carry field 'foo'"),
                                ("cur_scale", torch.tensor(2.0), "must be plain data, not __tensor__"),
                                ("cur_iter", ZeroStageEnum.weights, "must be plain data, not __enum__"),
                                ("scale_window", Pair(1, 2), "must be plain data, not __namedtuple__"),
                                ("min_scale", (1, 2), "must be plain data, not __tuple__")]:
        s = ds_scaler.DynamicLossScaler(init_scale=8.0, scale_window=2, min_scale=1, delayed_shift=1,
                                        consecutive_hysteresis=False)
        setattr(s, field, value)
        with pytest.raises(CodecError, match=f"opt.s.{field}: .*DynamicLossScaler.*{match}"):
            encode({"opt": {"s": s}})
    s = ds_scaler.LossScaler(scale=4)
    s.dtype = torch.float16  # a dtype only where DynamicLossScaler keeps one
    with pytest.raises(CodecError, match="may not carry field 'dtype'"):
        encode(s)
    with pytest.raises(CodecError, match="a dict key must be a hashable plain value, not __dtype__"):
        encode({torch.float16: 1})
    with pytest.raises(CodecError, match="a dict key must be a hashable plain value, not __tensor__"):
        encode({torch.ones(1): 1})


def real_scalers(monkeypatch) -> list:
    """Real DeepSpeed scalers as DeepSpeed builds them, some after overflow / growth steps."""
    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)  # overflow logging asks for it
    args = dict(init_scale=2**16, scale_window=2, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    scalers = [ds_scaler.LossScaler(), ds_scaler.LossScaler(scale=128.0),
               ds_scaler.CreateLossScaler(torch.bfloat16, 1.0, False, None),
               ds_scaler.CreateLossScaler(torch.half, 1.0, True, dict(args, raise_error_at_min_scale=False))]
    for hysteresis, overflows in ((False, [False] * 5 + [True, True, False]), (True, [True, False, False, True])):
        s = ds_scaler.DynamicLossScaler(**dict(args, consecutive_hysteresis=hysteresis))
        for o in overflows:
            s.update_scale(o)
        scalers.append(s)
    for s in scalers:
        s.update_scale(False)
    assert scalers[-2].cur_iter == 9 and scalers[-2].cur_scale != 2**16  # the steps did change state
    return scalers


def test_allowlist_fields_are_the_real_ones(monkeypatch):
    """Every field a real object has is allowed; no allowed field shadows a method or is private."""
    scalers = real_scalers(monkeypatch)
    for cls_name, objs in [(LS, [s for s in scalers if type(s) is ds_scaler.LossScaler]),
                           (DLS, [s for s in scalers if type(s) is ds_scaler.DynamicLossScaler]),
                           (FRAG, [fragment_address(numel=3, start=5)])]:
        allowed = codec.ALLOWED_CLASSES[cls_name]
        assert objs and all(set(vars(o)) == allowed for o in objs), (cls_name, allowed)
        cls = type(objs[0])
        for f in allowed:
            assert not f.startswith("_") and not hasattr(inspect.getattr_static(cls, f, None), "__get__"), f
    assert codec.ALLOWED_CLASSES[ZSE] is None
    assert set(codec.DTYPE_FIELDS) <= set(codec.ALLOWED_CLASSES)
    assert all(f <= codec.ALLOWED_CLASSES[c] for c, f in codec.DTYPE_FIELDS.items())


def test_real_deepspeed_state_round_trips(tmp_path, monkeypatch):
    scalers = real_scalers(monkeypatch)
    frags = {"layer.weight": fragment_address(numel=12, start=0), "layer.bias": fragment_address(start=12, numel=4)}
    tree = {"optimizer": {"loss_scaler": scalers, "zero_stage": ZeroStageEnum.gradients,
                          "stages": list(ZeroStageEnum), "max": ZeroStageEnum.max_stage, "dynamic_loss_scale": True,
                          "param_slice_mappings": [frags], "single_partition_of_fp32_groups": [torch.ones(16)],
                          "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(16)}}, "param_groups": []}}}
    files = save_tree(tree, tmp_path / "optimizer")
    skeleton = json.loads(files[0].read_text())
    assert check_skeleton(skeleton, {"0", "1"}) == []
    for lazy in (False, True):
        back = load_tree(tmp_path / "optimizer", lazy=lazy)["optimizer"]
        for a, b in zip(scalers, back["loss_scaler"], strict=True):
            assert type(a) is type(b) and vars(a) == vars(b)
            assert type(b.cur_scale) is type(a.cur_scale)
        last = back["loss_scaler"][-1]
        assert last.dtype is torch.float16 and last.loss_scale == scalers[-1].cur_scale
        assert back["zero_stage"] is ZeroStageEnum.gradients and back["stages"] == list(ZeroStageEnum)
        assert back["max"] is ZeroStageEnum.weights
        got = back["param_slice_mappings"][0]
        assert got == frags and all(type(v) is fragment_address for v in got.values())
        assert back["base_optimizer_state"]["state"][0]["exp_avg"].tolist() == [0.0] * 16
    # the restored dynamic scaler still works as DeepSpeed drives it
    s = back["loss_scaler"][-1]
    before = s.cur_iter
    s.update_scale(False)
    assert s.cur_iter == before + 1


def test_loaded_tensors_own_aligned_memory(tmp_path):
    """Every tensor read back is a fresh, 64-byte-aligned, writable copy, eager or lazy: safetensors
    0.8 returns views at any offset into the file's buffer, and CPU kernels round misaligned inputs
    differently (a GaLore resume drifted from the uninterrupted run)."""
    tree = {"a": torch.randn(3), "b": torch.randn(1100, 64), "c": torch.randn(7), "d": torch.arange(5.0)}
    save_tree(tree, tmp_path / "t")
    eager = load_tree(tmp_path / "t")
    lazy = load_tree(tmp_path / "t", lazy=True)
    views = [eager[k] for k in tree] + [lazy["a"], lazy["c"], lazy["b"].read(), lazy["b"].flat(5, 900),
                                        lazy["b"].read_rows(3, 7)]
    assert all(v.data_ptr() % 64 == 0 for v in views), [v.data_ptr() % 64 for v in views]
    assert all(torch.equal(eager[k], tree[k]) for k in tree)
    eager["b"].add_(1.0)  # writable, and not shared with another loaded tensor
    assert torch.equal(load_tree(tmp_path / "t")["b"], tree["b"])
