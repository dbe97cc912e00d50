"""--teacher-device-map (docs/usage.md, "Which teacher fits where"): a teacher loaded with a device map gives the same
rationales and the same attention cache (A_t, step and word ids) as on one device.

What each test proves. On a CPU-only machine every entry of a device map is "cpu", so no layer's input ever
changes device: the CPU tests prove the device-map path (models.load_model's device_map, explicit per-layer maps,
"auto", accelerate's hooks on every layer, offloaded layers whose weights the hooks bring in at each forward,
train.teacher_stage not moving a placed teacher) and the capture's guard against a reused mask id; they cannot
prove the moves. The CUDA tests do: the layers split over cuda:0 and the CPU, once as transformers places them (the
CPU layers offloaded: their weights copied to cuda:0 at each forward) and once with layers really running on each
device, where the capture's index tensors must be on both devices and each layer's A is gathered on the first
layer's."""

import accelerate
import pytest
import torch

import capture
import train
from plumbing import flags, models, problems
from teacher import build_attention_cache

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA variant proves the moves")
META = {"delimiters": ".", "teacher": "tiny"}


@pytest.fixture(scope="module")
def examples():
    return problems.make_problems(7, seed=0)


def _load(folder, **kwargs):
    return models.load_model(folder, attn_implementation=capture.register(), **kwargs)


def _cache(model, tok, examples):
    return build_attention_cache(model, tok, examples, META, max_length=256, batch_size=3)


def _texts(model, tok, examples):
    return models.generate(model, tok, [e["question"] for e in examples], max_new_tokens=6, batch_size=3)


def _module_map(model, place):
    """An explicit device map of `model`: one entry per top module and per decoder layer, `place(name)` its device;
    the tied lm_head goes with the input embeddings."""
    names = []
    for child, module in model.model.named_children():
        names += [f"model.layers.{i}" for i in range(len(module))] if child == "layers" else [f"model.{child}"]
    names += [name for name, _ in model.named_children() if name != "model"]
    device_map = {name: place(name) for name in names}
    device_map["lm_head"] = device_map["model.embed_tokens"]
    return device_map


def assert_same_cache(got, ref, atol=1e-6):
    assert got["meta"] == ref["meta"] and got["items"].keys() == ref["items"].keys()
    for k, item in ref["items"].items():
        other = got["items"][k]
        assert (other["step_ids"], other["word_ids"]) == (item["step_ids"], item["word_ids"])
        assert other["A"].device.type == "cpu" and other["A"].dtype == torch.float32
        torch.testing.assert_close(other["A"], item["A"], atol=atol, rtol=0)
    assert sum(item["A"].sum().item() > 0.1 for item in ref["items"].values()) >= 4  # not all trivial


@pytest.fixture(scope="module")
def one_device(tiny_teacher_dir, examples):
    """The reference: the teacher on one device (the CPU), its cache and its generated texts."""
    model, tok = _load(tiny_teacher_dir)
    return _cache(model, tok, examples), _texts(model, tok, examples)


# ---------------------------------------------------------------------------------------------
# On the CPU: every entry "cpu".


def test_flag():
    assert flags.parse_args([]).teacher_device_map is None
    assert flags.parse_args(["--teacher-device-map", "auto"]).teacher_device_map == "auto"
    with pytest.raises(SystemExit):
        flags.parse_args(["--teacher-device-map", "balanced"])


@pytest.mark.parametrize("how", ["per-layer map", "auto", "hooks on every layer", "offloaded layers"])
def test_device_map_on_cpu_gives_the_same_cache_and_texts(tiny_teacher_dir, examples, one_device, how, tmp_path):
    if how == "auto":
        model, tok = _load(tiny_teacher_dir, device_map="auto")
    else:
        device_map = _module_map(_load(tiny_teacher_dir)[0], lambda name: "cpu")
        assert len(device_map) > 5  # embeddings, 3 layers, norm, rotary embeddings, lm_head
        model, tok = _load(tiny_teacher_dir, device_map=device_map)
        if how == "hooks on every layer":  # accelerate's hooks, as on several devices: each moves its layer's inputs
            model = accelerate.dispatch_model(model, device_map, force_hooks=True)
            assert hasattr(model.model.layers[1], "_hf_hook")
        if how == "offloaded layers":  # as layers put on the CPU next to a GPU: weights elsewhere (here the disk),
            device_map.update({"model.layers.1": "disk", "model.layers.2": "disk"})  # brought in at each forward
            model = accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=tmp_path)
            assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert {p.device.type for p in model.parameters()} <= {"cpu", "meta"}
    ref_cache, ref_texts = one_device
    assert_same_cache(_cache(model, tok, examples), ref_cache)
    assert _texts(model, tok, examples) == ref_texts


def test_teacher_stage_does_not_move_a_placed_teacher(tiny_teacher_dir, tmp_path, monkeypatch):
    """train.teacher_stage passes --teacher-device-map to models.load_model and never moves the model it placed;
    the cache equals the default's (one device)."""
    real_load, maps = models.load_model, []

    def spy_load(name, *args, **kwargs):
        model, tok = real_load(name, *args, **kwargs)
        maps.append(kwargs.get("device_map"))
        if kwargs.get("device_map"):
            def refuse(*a, **k):
                raise AssertionError("a teacher placed by a device map must not be moved")
            model.to = refuse
        return model, tok

    monkeypatch.setattr(models, "load_model", spy_load)
    caches = []
    for extra in ([], ["--teacher-device-map", "auto"]):
        out = tmp_path / str(len(caches))
        out.mkdir()
        args = flags.parse_args(["--data", "builtin", "--teacher", tiny_teacher_dir, "--out", str(out), "--n-train",
                                 "6", "--teacher-batch-size", "4", "--max-length", "256", "--rationales", "builtin",
                                 *extra])
        caches.append(train.teacher_stage(args)[1])
    assert maps == [None, "auto"]
    assert_same_cache(caches[1], caches[0])


def test_bias_is_not_taken_from_a_mask_whose_id_was_reused():
    """Under a device map each layer may get its own copy of the mask; when Python gives a later mask the id of a
    freed one, the capture builds the later mask's bias instead of reusing the freed one's."""
    cap = capture.Capture([([[0, 1, 2, 3]], [[1], [2]])], values=False)
    _, cols, valid, *_ = capture._index(cap.groups, 4, "cpu")
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    first = cap._bias(causal, cols, valid, 4)
    assert cap._bias(causal, cols, valid, 4) is first  # the same mask again: reused
    cap.biases[(id(full), cols.device)] = cap.biases[(id(causal), cols.device)]  # as if `full` had causal's id
    torch.testing.assert_close(cap._bias(full, cols, valid, 4), capture._critical_bias(full, cols, valid, 4))
    assert not torch.equal(cap._bias(full, cols, valid, 4), first)
    assert cap._bias(None, cols, valid, 4) is cap._bias(None, cols, valid, 4)  # causal, no mask: built once


# ---------------------------------------------------------------------------------------------
# On a GPU: the layers split over cuda:0 and the CPU.


def _split(name):  # the first layer (with the embeddings) on the CPU, the later layers on cuda:0
    return 0 if name in ("model.layers.1", "model.layers.2", "model.norm") else "cpu"


@pytest.fixture(scope="module")
def one_gpu(tiny_teacher_dir, examples):
    """The reference on a GPU: the teacher on cuda:0 alone, as train.py puts it without the flag."""
    model, tok = _load(tiny_teacher_dir)
    model = model.to("cuda:0")
    return _cache(model, tok, examples), _texts(model, tok, examples)


@CUDA
def test_split_as_transformers_places_it(tiny_teacher_dir, examples, one_gpu):
    """Through models.load_model, as --teacher-device-map auto places a teacher when the GPUs are full: the layers on
    the CPU are offloaded (their weights on the meta device, copied to cuda:0 for each forward); the same cache and
    texts as on cuda:0 alone."""
    device_map = _module_map(_load(tiny_teacher_dir)[0], lambda name: "cpu" if name in ("model.layers.1",
                                                                                        "model.layers.2") else 0)
    model, tok = _load(tiny_teacher_dir, device_map=device_map)
    assert model.device == torch.device("cuda", 0)
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    ref_cache, ref_texts = one_gpu
    assert_same_cache(_cache(model, tok, examples), ref_cache)
    assert _texts(model, tok, examples) == ref_texts


@CUDA
def test_split_with_layers_on_two_devices(tiny_teacher_dir, examples, one_device, monkeypatch):
    """Layer 0 runs on the CPU, layers 1 and 2 on cuda:0 (accelerate with the CPU as main device: nothing
    offloaded): the capture copies its index tensors to both devices, builds the critical bias for the mask copies
    the cuda:0 layers get, gathers A on the first layer's device, and the cache (on the CPU) and texts are the
    one-device ones; the value states (the student's router input) are gathered too."""
    model, tok = _load(tiny_teacher_dir)
    device_map = _module_map(model, _split)
    model = accelerate.dispatch_model(model, device_map, main_device="cpu")
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert model.model.layers[1].self_attn.q_proj.weight.device == gpu and model.device == cpu
    seen, caps, real_attend = {}, [], capture.Capture.attend

    def spy(self, module, query, *args, **kwargs):
        seen[module.layer_idx] = query.device
        if not caps or caps[-1] is not self:
            caps.append(self)
        return real_attend(self, module, query, *args, **kwargs)

    monkeypatch.setattr(capture.Capture, "attend", spy)
    cache = _cache(model, tok, examples)
    assert seen == {0: cpu, 1: gpu, 2: gpu} and len(caps) == 3  # 7 examples in batches of 3
    for cap in caps:
        assert set(cap.index) == {cpu, gpu}
        for device, tensors in cap.index.items():
            assert all(t.device == device for t in tensors)
        assert {i: a.device for i, a in cap.layers.items()} == {0: cpu, 1: gpu, 2: gpu}
        assert all(a.device == cpu for a in cap.stepwise())
    ref_cache, ref_texts = one_device
    assert_same_cache(cache, ref_cache)
    assert _texts(model, tok, examples) == ref_texts

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), capture.capture(model, [([[2, 3, 4, 5]], [[1], [3]])], values=True) as cap:
        model(ids)
    V = cap.value_states()
    assert V.device == cpu and V.shape == (1, model.config.num_hidden_layers, 6, capture.value_dim(model.config))
