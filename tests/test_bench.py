"""Tests for bench.py: `--quick` end to end, the naive route computes the same loss and gradients as the
fast one (both are train.step, only the attention reader differs: the benchmark compares like with like), the
teacher is run once per example (counted by what its attention layers see), the memory meter against a hand count,
the synthetic batch's shape, and the FLOP counts: the by-hand formulas against FlopCounterMode where it sees the op,
and a step's count with its matrix products faked equal to the count of running them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import capture
import data
import mol
import train
from experiments import bench
from plumbing import flags

ROOT = Path(__file__).resolve().parents[1]


def test_quick_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for title in ("## Training step", "## The capture alone", "## Teacher side", "## FLOPs", "## Targets"):
        assert title in proc.stdout
    assert (tmp_path / "bench.md").read_text() in proc.stdout
    out = json.loads((tmp_path / "bench.json").read_text())
    assert [r["route"] for r in out["train"]] == ["dss", "molsaki", "naive"]
    for r in out["train"] + out["results"]:
        assert "error" not in r, r
    for r in out["train"]:
        assert r["sec"] > 0 and r["saved"] > 0 and r["exp_tokens"] == [256, 256] and r["sec_ratio"] > 0
        assert r["rounds"] == 2 and len(r["times"]) == 4 and len(r["round_sec_ratios"]) == 2
        assert len(r["alt_times"]) == len(r["alt_ratios"]) == 4 and r["alt_sec"] > 0  # 2 cycles x 2 processes
    assert out["targets"]["time"]["measured"] == "alternating"
    assert [r["seq_len"] for r in out["capture"]] == [128, 256]
    for r in out["capture"]:
        assert all(r[f"sec_{k}"] > 0 for k in ("sdpa", "capture", "eager"))
        assert 0 < r["extra_capture"] < r["extra_eager"]  # the capture keeps less than eager attention
    assert out["teacher"]["passes_per_example"] == 1.0 and out["teacher"]["examples_seen"] == 8
    assert out["teacher"]["passes_per_example_no_cache"] == 80.0
    assert out["targets"]["teacher_passes"]["met"] is True
    assert set(out["targets"]) == {"time", "memory", "capture_memory", "teacher_passes"}
    rows = {(r["model"], r["method"]): r for r in out["flops"]}
    assert set(rows) == {(m, r) for m in ("tiny-llama", "tiny-gpt2") for r in bench.FLOP_ROUTES}
    for (model, _), r in rows.items():
        assert r["total"] > r["forward"] > 0 and r["uncounted"] == [] and r["seq_len"] == 256
        assert r["ratio"] == r["total"] / rows[(model, "dss")]["total"]
    assert "| tiny-llama | 2 x 256 | molsaki, fast capture |" in proc.stdout


def test_rounds_pool_all_timed_steps():
    """Step time: the median of every timed step of a route over its rounds; memory: the median over rounds;
    the within-round ratio pairs each process with the dss process of its round. A failed round drops out."""
    def run(route, i, times, work):
        return {"kind": "train", "route": route, "round": i, "times": times, "sec": sorted(times)[1],
                "work": work, "peak": work + 100, "base": 100, "saved": 10}

    results = [run("dss", 0, [1.0, 3.0, 2.0], 50), run("molsaki", 0, [2.2, 2.4, 2.3], 60),
               run("naive", 0, [5.0, 5.0, 5.0], 90), run("dss", 1, [4.0, 5.0, 6.0], 70),
               run("molsaki", 1, [5.5, 4.5, 5.0], 80), {"kind": "train", "route": "naive", "round": 1, "error": "x"}]
    rows = {r["route"]: r for r in bench.summarize(results)["train"]}
    assert rows["dss"]["sec"] == 3.5  # 1 2 3 | 4 5 6
    assert rows["molsaki"]["sec"] == (2.4 + 4.5) / 2  # 2.2 2.3 2.4 | 4.5 5.0 5.5
    assert math.isclose(rows["molsaki"]["sec_ratio"], 3.45 / 3.5)
    assert [round(x, 6) for x in rows["molsaki"]["round_sec_ratios"]] == [1.15, 1.0]
    assert rows["molsaki"]["work"] == 70 and math.isclose(rows["molsaki"]["work_ratio"], 70 / 60)
    assert rows["naive"]["rounds"] == 1 and rows["naive"]["sec"] == 5.0 and rows["naive"]["work"] == 90
    assert rows["naive"]["round_sec_ratios"] == [2.5, None]
    assert "round" not in rows["molsaki"]


def test_alternating_ratios_pair_each_cycle():
    """Alternating: each cycle's step over the dss step of the same cycle, the median over all processes' cycles
    (not the ratio of the medians); the time target uses it. A failed process is reported, not pooled."""
    def alternate(i, dss, molsaki, naive):
        return {"kind": "train", "route": "alternate", "round": i,
                "times": {"dss": dss, "molsaki": molsaki, "naive": naive}}

    def run(route, i):
        return {"kind": "train", "route": route, "round": i, "times": [1.0], "sec": 1.0, "work": 1, "peak": 2,
                "base": 1, "saved": 1, "router": "none"}

    results = [run("dss", 0), run("molsaki", 0), run("naive", 0),
               alternate(0, [10.0, 20.0], [11.5, 30.0], [10.0, 20.0]), run("dss", 1), run("molsaki", 1),
               run("naive", 1), alternate(1, [30.0], [31.5], [60.0]),
               {"kind": "train", "route": "alternate", "round": 2, "error": "MemoryError: boom"}]
    summary = bench.summarize(results)
    rows = {r["route"]: r for r in summary["train"]}
    assert [round(x, 6) for x in rows["molsaki"]["alt_ratios"]] == [1.15, 1.5, 1.05]
    assert math.isclose(rows["molsaki"]["alt_ratio"], 1.15)  # the ratio of the medians would be 30 / 20 = 1.5
    assert rows["molsaki"]["alt_sec"] == 30.0 and rows["naive"]["alt_ratio"] == 1.0
    assert rows["dss"]["alt_ratios"] == [1.0, 1.0, 1.0]
    assert math.isclose(summary["targets"]["time"]["value"], 1.15) and summary["targets"]["time"]["met"] is False
    assert summary["alternate_errors"] == ["MemoryError: boom"]
    args = bench.parse_args(["--quick"])
    assert "Alternating process failed: MemoryError: boom" in bench.tables(summary, args)
    without_train = bench.summarize([])
    assert without_train["targets"]["time"] == {"value": None, "target": "<= 1.1", "measured": None, "met": None}
    assert "| molsaki / dss step time <= 1.1 | - | not run |" in bench.tables(without_train, args)


def test_alternating_process_runs_the_same_steps():
    """In the alternating process one molsaki-attention model (with the router of all routes) takes every route:
    its dss step must give the gradients of an SDPA model's, and its naive step (switched to eager) those of an
    eager model's."""
    cfg = {"model": "tiny-llama", "seq_len": 256, "batch_size": 2}
    device = torch.device("cpu")

    def gradients(attn, route, routes):
        torch.manual_seed(0)
        student, tok, router, opt = bench._student(cfg, attn, device, routes)
        step = bench._route_step(route, cfg, student, tok, router, opt)[0]
        student.set_attn_implementation("eager" if route == "naive" else attn)
        grads = []
        opt.step = lambda: grads.extend(p.grad.clone() for g in opt.param_groups for p in g["params"]
                                        if p.grad is not None)
        step()
        return grads, len(list(student.parameters()))

    for route, own in (("dss", "sdpa"), ("naive", "eager")):
        (shared, _), (alone, n_student) = (gradients(capture.register(), route, bench.TRAIN_ROUTES),
                                           gradients(own, route, [route]))
        assert len(shared) == len(alone) and all(g.abs().sum() > 0 for g in alone[:n_student])
        for a, b in zip(shared, alone, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def batch_for(student, tok, n_examples=3, n_tokens=256):
    args = flags.parse_args(["--method", "molsaki", "--max-length", str(n_tokens)])
    examples = bench.long_examples(tok, n_examples, n_tokens)
    feats = train.features(args, examples, tok, bench.fake_cache(tok, examples, n_tokens))
    return args, feats, data.collate(feats, tok.pad_token_id)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_naive_route_equals_fast_route(model):
    """The naive route is train.step with `eager_attention` as its reader: its loss and gradients (student and router)
    are those of train.step with the capture. GPT-2 in eval mode: under attention dropout eager attention returns
    post-dropout probabilities and the capture A pre-dropout; its router reads the value third of the fused c_attn."""
    student, tok = bench.load(model, capture.register())
    if model == "tiny-gpt2":
        student.eval()
    args, feats, batch = batch_for(student, tok)
    torch.manual_seed(1)
    router = mol.StudentRouter(capture.value_dim(student.config), student.config.num_hidden_layers, args.tau2)
    params = list(student.parameters()) + list(router.parameters())
    with pytest.raises(ValueError, match="eager"), bench.eager_attention(student, [f["groups"] for f in feats]):
        pass

    def loss_and_grads(read):
        for p in params:
            p.grad = None
        loss, parts = train.step(student, router, batch, **train.objective(args), read_attention=read)
        loss.backward()
        assert parts["att"] > 0
        return loss.detach(), [p.grad.clone() for p in params]

    fast, fast_grads = loss_and_grads(capture.capture)
    student.set_attn_implementation("eager")
    naive, naive_grads = loss_and_grads(bench.eager_attention)
    torch.testing.assert_close(naive, fast, atol=1e-5, rtol=0)
    for g_n, g_f in zip(naive_grads, fast_grads, strict=True):
        torch.testing.assert_close(g_n, g_f, atol=1e-4, rtol=0)
    assert router.proj.weight.grad.abs().sum() > 0 and router.bias.grad.abs().sum() > 0  # W's reads the values


def test_teacher_runs_once_per_example(monkeypatch):
    seen = []  # examples per call of the teacher's first attention layer: an independent count
    attend = capture.Capture.attend

    def counting(self, module, query, *rest, **kwargs):
        if module.layer_idx == 0:
            seen.append(query.shape[0])
        return attend(self, module, query, *rest, **kwargs)

    monkeypatch.setattr(capture.Capture, "attend", counting)
    cfg = {"teacher": "tiny-gemma3", "cache_examples": 7, "teacher_batch_size": 3, "max_length": 128}
    out = bench.bench_teacher(cfg, torch.device("cpu"))
    warmup = seen[:1]  # bench times the pass after one warm-up batch
    assert warmup == [3] and sum(seen[1:]) == 7 and len(seen[1:]) == math.ceil(7 / 3)
    assert out["forward_calls"] == 3 and out["examples_seen"] == 7 and out["cached"] == 7
    assert out["passes_per_example"] == 1.0
    assert out["passes_per_example_no_cache"] == 4000 * 16 / 800


def test_saved_bytes_hand_count():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.ReLU())
    x = torch.randn(5, 10)
    with bench.saved_bytes(model) as saved:
        y = model(x).sum()
    # Linear keeps its input (the weight is a parameter: not counted), ReLU its output: 2 x 5 x 10 floats
    assert saved["bytes"] == 2 * 5 * 10 * 4
    y.backward()
    # Two passes, each backward before the next forward: the larger pass, not the sum
    with bench.saved_bytes(model) as saved:
        model(x).sum().backward()
        model(torch.randn(7, 10)).sum().backward()
    assert saved["bytes"] == 2 * 7 * 10 * 4


def test_long_examples_fill_the_exp_text():
    student, tok = bench.load("tiny-llama", "sdpa")
    _, feats, batch = batch_for(student, tok, n_examples=2, n_tokens=256)
    assert batch["exp_ids"].shape == (2, 256) and bool(batch["exp_mask"].all())
    assert int(batch["pre_mask"].sum(1).max()) < 256  # the answer task stays a question and an answer
    for f in feats:
        steps, words = f["groups"]
        assert len(steps) >= 2 and len(words) >= 2 and f["A_t"].shape[1:] == (len(steps), len(words))
        assert max(t for group in steps + words for t in group) < 256


def test_random_folder_gives_that_shape(tmp_path):
    """`random:FOLDER` (config and tokenizer only, as a GPU machine gets them): a model of that configuration."""
    config = bench.tiny_config("tiny-llama")
    config.save_pretrained(tmp_path)
    bench.byte_tokenizer().save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    model, tok = bench.load(f"random:{tmp_path}", "sdpa")
    reference, _ = bench.load("tiny-llama", "sdpa")
    assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]
    assert tok("3 + 4")["input_ids"] == bench.byte_tokenizer()("3 + 4")["input_ids"] and tok.pad_token_id == 256


def test_pin_malloc_keeps_freed_memory():
    """After pin_malloc, 2.5 GB malloc'd, written and freed stay in the process (used again without page faults);
    with glibc's defaults they go back to the OS at once (the oracle that the RSS meter sees the difference).
    2.5 GB: above the largest positive trim threshold mallopt takes, which still handed them back."""
    code = ("import ctypes, ctypes.util, sys\nfrom experiments import bench\n"
            "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
            "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
            "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "pinned = sys.argv[1] == '1' and bench.pin_malloc()\n"
            "n, before = 5 * 2**29, bench._rss('VmRSS')\n"
            "p = libc.malloc(n)\n"
            "libc.memset(p, 1, n)\n"
            "libc.free(p)\n"
            "print(pinned, (bench._rss('VmRSS') - before) / 2**30)\n")
    if not Path("/proc/self/status").exists():
        pytest.skip("the RSS meter needs /proc")
    kept = {}
    for pin in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", code, pin], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pinned, gb = proc.stdout.split()
        if pin == "1" and pinned != "True":
            pytest.skip("pin_malloc needs glibc")
        kept[pin] = float(gb)
    assert kept["0"] < 0.1 and kept["1"] > 2.4, kept


def test_attention_flops_against_the_counter():
    """attention_flops (by hand, for the CPU kernels the counter does not know) against FlopCounterMode where it sees
    the op: torch's efficient-attention kernel, forward and backward (on meta tensors: counted from shapes), and
    attention as plain matmuls with grouped-query heads, whose autograd backward does not recompute Q K^T."""
    B, H, H_kv, N, D, Dv = 2, 4, 2, 24, 8, 6
    q, k, v = (torch.randn(B, H, N, d, device="meta") for d in (D, D, Dv))
    with FlopCounterMode(display=False) as counter:
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True)
    assert counter.get_total_flops() == bench.attention_flops(q.shape, k.shape, v.shape) == 2 * B * H * N * N * (D + Dv)
    with FlopCounterMode(display=False) as counter:
        torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            out, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], True)
    assert counter.get_total_flops() == bench.attention_flops(q.shape, k.shape, v.shape, backward=True)

    q = torch.randn(B, H, N, D, requires_grad=True)
    k, v = torch.randn(B, H_kv, N, D, requires_grad=True), torch.randn(B, H_kv, N, Dv, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        kr, vr = (t.repeat_interleave(H // H_kv, 1) for t in (k, v))
        o = (q @ kr.transpose(-1, -2) * D ** -0.5).softmax(-1) @ vr
        forward = counter.get_total_flops()
        o.sum().backward()
    assert forward == bench.attention_flops(q.shape, k.shape, v.shape)
    recompute = 2 * B * H * N * N * D
    assert counter.get_total_flops() - forward == bench.attention_flops(q.shape, k.shape, v.shape, True) - recompute


@pytest.mark.parametrize("fake", [True, False])
def test_count_flops_adds_cpu_sdpa_by_hand(fake):
    """CPU SDPA, which FlopCounterMode counts 0, gets attention_flops; its math backend (matmuls the counter sees)
    counts the same forward, and a backward without the recomputed Q K^T. With fake=True the same counts."""
    B, H, N, D = 2, 3, 40, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    fwd, bwd = (bench.attention_flops(q.shape, k.shape, v.shape, b) for b in (False, True))
    seen = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend), bench.count_flops(fake) as flops:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            forward = flops()
            o.sum().backward()
        seen[backend] = (forward, flops())
    (flash_fwd, flash), (math_fwd, math) = seen[SDPBackend.FLASH_ATTENTION], seen[SDPBackend.MATH]
    assert flash_fwd["total"] == flash_fwd["by_hand"] == math_fwd["total"] == fwd and math_fwd["by_hand"] == 0
    assert flash["total"] == flash["by_hand"] == fwd + bwd and flash["uncounted"] == []
    assert math["total"] == fwd + bwd - 2 * B * H * N * N * D and math["by_hand"] == 0


def test_critical_probs_flops_are_counted():
    """_CriticalProbs' hand-written backward is dispatched matmuls, which FlopCounterMode sees: over its row blocks
    (r0, r1, kc), 2 B H (r1 - r0) kc D forward and 3 times that backward (the logits again, dQ, dK)."""
    B, H, H_kv, N, D = 2, 4, 2, 300, 8
    groups = [([list(range(5, 140)), list(range(140, 290))], [[3, 4], [50], [200, 201]]),
              ([list(range(0, 260))], [[10], [100, 101]])]
    rows, cols, valid, member, hit, blocks = capture._index(groups, N, torch.device("cpu"))
    bias = capture._critical_bias(None, cols, valid, N)
    q, k = torch.randn(B, H, N, D, requires_grad=True), torch.randn(B, H_kv, N, D, requires_grad=True)
    pi = torch.rand(B, H, N, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        P = capture._CriticalProbs.apply(q, k, pi, cols, bias, D ** -0.5, blocks)
        forward = counter.get_total_flops()
        P.backward(torch.randn_like(P))
    expected = sum(2 * B * H * (r1 - r0) * kc * D for r0, r1, kc in blocks)
    assert len(blocks) == 3 and forward == expected and counter.get_total_flops() == 4 * expected


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_step_flops(model):
    """A step's FLOPs with the matrix products faked (zeros of their shape) equal those of running them, and nothing
    that multiplies matrices goes uncounted. mmi = dss (its loss has no matrix product); vanilla < dss < molsaki.
    Llama (no dropout): every SDPA call is counted by hand, vanilla's exactly attention_flops per layer of its batch;
    GPT-2 (attention dropout): SDPA runs its math path, seen by the counter, except the capture's call for pi."""
    cfg = {"model": model, "batch_size": 2, "seq_len": 256}
    fake, real = (bench.bench_flops(dict(cfg, fake=f), torch.device("cpu")) for f in (True, False))
    assert fake == real
    assert all(fake[m]["uncounted"] == [] for m in bench.FLOP_ROUTES)
    assert fake["mmi"] == fake["dss"] and fake["vanilla"]["total"] < fake["dss"]["total"] < fake["molsaki"]["total"]
    assert fake["naive"]["by_hand"] == 0 and fake["molsaki"]["by_hand"] > fake["dss"]["by_hand"]
    config = bench.tiny_config(model)
    if model == "tiny-llama":
        H, D = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        shape = (cfg["batch_size"], H, max(fake["pre_tokens"]), D)
        per_layer = sum(bench.attention_flops(shape, shape, shape, b) for b in (False, True))
        assert fake["vanilla"]["by_hand"] == config.num_hidden_layers * per_layer
    else:
        assert fake["dss"]["by_hand"] == 0
