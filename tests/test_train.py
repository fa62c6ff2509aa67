"""moela train: loss goes down, bias balancing, MTP save/load, exact resume, DDP parity, HF loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import rel_err
from moela.config import DEFAULT_MODEL_DIR, ModelConfig
from moela.errors import CheckpointError, ConfigError
from moela.loader import load_model, load_mtp
from moela.models import StepContext
from moela.models.layers import Gate
from moela.train import data
from moela.train.balance import RouterMonitor, max_violation
from moela.train.cli import main as train_main
from moela.train.loop import Trainer, TrainConfig
from moela.models.mtp import MTP
from moela.train.optim import lr_at, orthogonalize

ARCH = dict(model_type="deepseek_v3", vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=64, num_nextn_predict_layers=1,
            rope_theta=10000.0, bos_token_id=0, eos_token_id=1)
FAST = dict(batch_size=4, seq_len=16, lr=1e-2, warmup=2, precision="fp32")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine thread sync would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(root: Path, n_files: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"def add_{i}_{j}(a, b):\n    return a + b * {j}\n\n" for j in range(6))
        (root / f"mod_{i}.py").write_text(body + f"print(add_{i}_0(1, 2))\n")
    return root


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> torch.Tensor:
    root = write_corpus(tmp_path_factory.mktemp("corpus"))
    texts = data.read_texts(data.find_files([root]))
    return data.pack(data.train_tokenizer(texts, vocab_size=300), texts, seq_len=16)


def trainer(windows, **overrides) -> Trainer:
    return Trainer(ARCH, TrainConfig(**(FAST | overrides)), windows, windows[:8])


def test_a_few_steps_reduce_the_loss(windows):
    t = trainer(windows, steps=30)
    losses = [t.step()["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert t.evaluate() < losses[0] - 1.5


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, total=100, peak_lr=1.0, warmup=10, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_muon_orthogonalizes_each_expert_matrix():
    g = torch.randn(3, 24, 40)  # a stack of expert matrices, each treated alone
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.shape == (3, 24) and s.min() > 0.5 and s.max() < 1.3  # Newton-Schulz pushes every singular value toward 1


def test_bias_update_moves_a_skewed_router_toward_balance():
    cfg = ModelConfig.from_dict(ARCH)
    gate = Gate(cfg)
    torch.manual_seed(0)
    x = torch.randn(512, cfg.hidden_size) + 1.0  # inputs share a direction...
    with torch.no_grad():
        gate.weight.normal_(0, 0.05)
        gate.weight[:2] += 0.2  # ...that experts 0 and 1 align with: every token picks them
    router = RouterMonitor(gate)
    loads = []
    for _ in range(300):
        gate(x)
        loads.append(router.end_step(bias_update_speed=0.01))
    first, last = max_violation(loads[0])[0].item(), max_violation(loads[-1])[0].item()
    assert first == pytest.approx(3.0)  # 2 of 8 experts take all top-2 picks
    assert last < 0.5
    assert gate.bias[:2].max() < 0 < gate.bias[2:].min()  # overloaded pushed down, idle ones up
    assert not gate.bias.requires_grad


def test_sequence_balance_loss():
    cfg = ModelConfig.from_dict(ARCH)
    gate = Gate(cfg)
    router = RouterMonitor(gate, balance_alpha=0.1)
    with torch.no_grad():
        gate.weight.zero_()  # equal scores: P_i = 1/E, so sum_i f_i P_i = 1 whatever the picks
    gate(torch.randn(12, cfg.hidden_size))
    assert router.balance_loss(n_seqs=3).item() == pytest.approx(0.1)
    with torch.no_grad():
        gate.weight.normal_()
        gate.weight[0] += 3.0
    gate(torch.randn(12, cfg.hidden_size) + 1.0)
    loss = router.balance_loss(n_seqs=3)
    assert loss.item() > 0.1
    loss.backward()
    assert gate.weight.grad.abs().sum() > 0


def test_mtp_loss_is_saved_and_loaded(windows, tmp_path):
    t = trainer(windows, mtp_weight=0.5)
    for _ in range(3):
        metrics = t.step()
    assert 0 < metrics["mtp_loss"] < 10
    t.save(tmp_path)
    L = ARCH["num_hidden_layers"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "mlp.gate.weight",
                 "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{name}" in names
    mtp = MTP(t.cfg)
    load_mtp(mtp, tmp_path, t.cfg)
    for (name, a), b in zip(t.mtp.state_dict().items(), mtp.state_dict().values()):
        assert torch.equal(a, b), name
    model = load_model(tmp_path, torch.float32)  # moela's loader skips the MTP layer
    batch = windows[:4].long()
    inp = batch[:, :-1]
    ctx, ctx2 = StepContext.prefill([16] * 4), StepContext.prefill([15] * 4)
    with torch.no_grad():
        hidden = model(inp.flatten(), ctx.positions, ctx).view(4, 16, -1)[:, :-1].flatten(0, 1)
        logits = model.logits(mtp(model, hidden, inp[:, 1:].flatten(), ctx2.positions + 1, ctx2))
        loss = torch.nn.functional.cross_entropy(logits, batch[:, 2:].flatten())
        expected = t.net(batch)[1]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_saved_model_round_trips_in_bf16(windows, tmp_path):
    t = trainer(windows)
    t.step()
    t.save(tmp_path, dtype=torch.bfloat16, state=False)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.3.up_proj.weight").get_dtype() == "BF16"
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path, torch.float32).state_dict()
    for name, value in t.model.state_dict().items():
        want = value if name.endswith("gate.bias") else value.bfloat16().float()
        assert torch.equal(loaded[name], want), name


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(windows, tmp_path, optimizer):
    opts = dict(steps=6, optimizer=optimizer, balance_alpha=1e-2, bias_update_speed=1e-2)
    straight = trainer(windows, **opts)
    expected = [straight.step()["loss"] for _ in range(6)]
    first = trainer(windows, **opts)
    for _ in range(3):
        first.step()
    first.save(tmp_path)
    second = trainer(windows, **opts)
    second.resume(tmp_path)
    assert second.step_num == 3
    resumed = [second.step()["loss"] for _ in range(3)]
    assert [r[1] for r in second.history["train"][:3]] == [round(v, 5) for v in expected[:3]]
    assert resumed == pytest.approx(expected[3:], abs=1e-6)
    for a, b in zip(straight.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_refuses_an_incompatible_checkpoint(windows, tmp_path):
    t = trainer(windows)
    t.step()
    t.save(tmp_path / "ckpt")
    t.save(tmp_path / "export", state=False)
    with pytest.raises(CheckpointError, match="seq_len = 16, this run has 8"):
        trainer(windows[:, :9].contiguous(), seq_len=8).resume(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        trainer(windows).resume(tmp_path / "export")
    wider = Trainer(ARCH | {"hidden_size": 48}, TrainConfig(**FAST), windows)
    with pytest.raises(CheckpointError, match="config field 'hidden_size' is 32 in the checkpoint but 48"):
        wider.resume(tmp_path / "ckpt")


def test_sequence_longer_than_the_model_is_refused(windows):
    with pytest.raises(ConfigError, match="sequence length 128 exceeds the model's max_position_embeddings = 64"):
        trainer(windows, seq_len=128)


def run_cli(tmp_path: Path, out: str, corpus: Path, *extra: str) -> list[str]:
    config = tmp_path / "arch.json"
    config.write_text(json.dumps(ARCH))
    return ["--out", str(tmp_path / out), "--config", str(config), "--corpus", str(corpus), "--vocab-size", "300",
            "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--warmup", "1", "--lr", "1e-2", "--precision", "fp32",
            "--eval-every", "2", "--eval-windows", "4", "--save-every", "2", "--sample-prompt", "def", *extra]


def test_cli_trains_and_two_gloo_ranks_match_one_process(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 16)
    assert train_main(run_cli(tmp_path, "single", corpus, "--balance-alpha", "1e-2")) == 0
    single = tmp_path / "single"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss_curve.png", "README.md"):
        assert (single / name).is_file(), name
    assert (single / "checkpoints" / "step-000002" / "loss_curve.png").is_file()
    assert "held-out perplexity" in (single / "README.md").read_text()
    assert "expert load MaxVio" in capsys.readouterr().err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moela.train.cli",
           *run_cli(tmp_path, "ddp", corpus, "--balance-alpha", "1e-2")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads((tmp_path / run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())["history"]
               for run in ("single", "ddp")]
    assert [r[0] for r in history[0]["train"]] == [r[0] for r in history[1]["train"]] == [1, 2, 3, 4]
    for a, b in zip(history[0]["train"] + history[0]["eval"], history[1]["train"] + history[1]["eval"]):
        assert a == pytest.approx(b, abs=2e-4)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_main(run_cli(tmp_path, "out", tmp_path / "empty")) == 1
    assert "empty corpus: no files matching '*.py'" in capsys.readouterr().err
    corpus = write_corpus(tmp_path / "corpus", 3)
    assert train_main(run_cli(tmp_path, "out", corpus, "--seq-len", "100")) == 1
    assert "sequence length 100 exceeds the model's max_position_embeddings = 64" in capsys.readouterr().err
    assert train_main(run_cli(tmp_path, "out", corpus, "--resume", str(tmp_path / "empty"))) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


def test_trained_checkpoint_loads_in_transformers(windows, tmp_path):
    t = trainer(windows)
    for _ in range(3):
        t.step()
    t.save(tmp_path)
    assert_same_logits(tmp_path, torch.randint(2, 300, (1, 16)))


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="the default model is not trained yet")
def test_shipped_default_model_matches_transformers():
    cfg = ModelConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert cfg.model_type == "deepseek_v3" and cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok >= 2
    assert cfg.n_shared_experts >= 1 and cfg.num_nextn_predict_layers == 1 and cfg.q_lora_rank
    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) <= 25e6
    ids = torch.tensor([[0] + list(range(100, 160))])
    assert_same_logits(DEFAULT_MODEL_DIR, ids)


def assert_same_logits(path: Path, ids: torch.Tensor) -> None:
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, torch.float32)
    ctx = StepContext.prefill([ids.shape[1]])
    with torch.no_grad():
        ours = model.logits(model(ids[0], ctx.positions, ctx))
        ref = hf(ids).logits[0]
    assert rel_err(ours, ref) < 1e-4


def test_cli_says_what_it_does_and_warns_of_a_smaller_vocabulary(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", 8)
    assert train_main(run_cli(tmp_path, "out", corpus, "--vocab-size", "5000", "--steps", "2", "--holdout", "0.5")) == 0
    err = capsys.readouterr().err
    for said in ("reading *.py files under", "training a 5000-token byte-level BPE on", "tokenizing and packing into "
                 "sequences of 16", "final evaluation on all", "warmup 1 of 2 steps"):
        assert said in err, said
    assert "fewer than --vocab-size 5000: the training files hold no more merges to learn" in err


def test_default_warmup_fits_the_run_and_help_shows_defaults(capsys):
    from moela.train.cli import parse_args, train_config

    assert train_config(parse_args(["--out", "x", "--steps", "20"])).warmup == 2
    assert train_config(parse_args(["--out", "x", "--steps", "5000"])).warmup == 100
    assert train_config(parse_args(["--out", "x", "--steps", "20", "--warmup", "7"])).warmup == 7
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps anywhere
    assert "(default: 0.003)" in out and "(default: 6144)" in out and "(default: auto)" in out
