"""Checkpoint loading: sharded, FP8 block-quantized, MTP layers, and every bad-checkpoint error."""

import json
import logging
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf, quantize_checkpoint, quantize_fp8, rel_err
from moela.errors import CheckpointError
from moela.loader import dequantize_fp8, load_model, save_model
from moela.models import StepContext

SEQ = [5, 17, 99, 3, 64, 12, 7, 88, 41]


def logits_of(model, seq=SEQ) -> torch.Tensor:
    ctx = StepContext.prefill([len(seq)])
    with torch.no_grad():
        return model.logits(model(torch.tensor(seq), ctx.positions, ctx))


def hf_logits(hf, seq=SEQ) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0]


@pytest.fixture
def v3_dir(tmp_path, hf_checkpoint):
    """A private copy of the v3 checkpoint that a test may damage."""
    src, hf = hf_checkpoint("v3")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst, hf


def test_sharded_checkpoint(tmp_path):
    hf = build_hf("v2", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 3
    assert rel_err(logits_of(load_model(tmp_path, dtype=torch.float32)), hf_logits(hf)) < 1e-4


def test_fp8_block_quantized_checkpoint_with_ragged_edges(tmp_path):
    """Every attention/MLP/expert Linear in e4m3 with 16x16 scale blocks; dims 48, 72, 24... leave ragged edges."""
    hf = build_hf("v3", seed=4)
    hf.save_pretrained(tmp_path)
    tensors = quantize_checkpoint(tmp_path, (16, 16))
    state = hf.state_dict()
    for name, t in tensors.items():
        if name in state:
            state[name].copy_(t)
    _copy_experts(hf, tensors)  # per-expert tensors go into transformers' fused layout
    assert rel_err(logits_of(load_model(tmp_path, dtype=torch.float32)), hf_logits(hf)) < 1e-4


def _copy_experts(hf, tensors) -> None:
    for i, layer in enumerate(hf.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        p = f"model.layers.{i}.mlp.experts."
        for e in range(experts.gate_up_proj.shape[0]):
            gate, up = tensors[f"{p}{e}.gate_proj.weight"], tensors[f"{p}{e}.up_proj.weight"]
            experts.gate_up_proj.data[e] = torch.cat([gate, up])
            experts.down_proj.data[e] = tensors[f"{p}{e}.down_proj.weight"]


def test_dequantize_fp8_ragged_blocks():
    w = torch.randn(130, 260)
    q, s = quantize_fp8(w, (128, 128))
    assert s.shape == (2, 3)
    assert rel_err(dequantize_fp8(q, s, (128, 128), "w"), w) < 0.07
    with pytest.raises(CheckpointError, match="weight_scale_inv has shape"):
        dequantize_fp8(q, s[:1], (128, 128), "file: tensor 'w'")


def test_mtp_layer_is_skipped_with_one_log_line(v3_dir, caplog):
    path, hf = v3_dir
    tensors = load_file(path / "model.safetensors")
    n = hf.config.num_hidden_layers
    for name in [k for k in tensors if k.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", f"model.layers.{n}.")] = tensors[name].clone()
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(48, 96)
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level(logging.DEBUG, logger="moela.loader"):  # a debug line: every real checkpoint has one
        model = load_model(path, dtype=torch.float32)
    assert len([r for r in caplog.records if "MTP" in r.message]) == 1
    assert rel_err(logits_of(model), hf_logits(hf)) < 1e-4


def test_tied_embeddings(tmp_path):
    hf = build_hf("v2_lite", seed=5, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.head is None and rel_err(logits_of(model), hf_logits(hf)) < 1e-4


def resave(path, mutate) -> None:
    tensors = load_file(path / "model.safetensors")
    mutate(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(v3_dir):
    path, _ = v3_dir
    resave(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        load_model(path)


def test_unexpected_tensor(v3_dir):
    path, _ = v3_dir
    resave(path, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.rotary\.weight'"):
        load_model(path)


def test_misshaped_tensor(v3_dir):
    path, _ = v3_dir
    resave(path, lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(5, 24)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape \[5, 24\], expected"):
        load_model(path)


def write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize("case, match", [
    ("short", "shorter than its 8-byte header"),
    ("huge_length", "exceeds the file"),
    ("not_json", "not valid JSON"),
    ("duplicate", "appears twice"),
    ("bad_dtype", "corrupt safetensors header entry for tensor 'a'"),
    ("size_mismatch", "tensor 'a' has 8 bytes but dtype F32 x shape \\[3\\] needs 12"),
    ("overlap", "tensors 'a' and 'b' overlap"),
    ("out_of_file", "corrupt safetensors header entry for tensor 'a'"),
])
def test_corrupt_safetensors_header(v3_dir, case, match):
    path, _ = v3_dir
    f = path / "model.safetensors"
    if case == "short":
        f.write_bytes(b"\x01\x02")
    elif case == "huge_length":
        write_raw(path, {}, length=10**12)
    elif case == "not_json":
        write_raw(path, b"{not json")
    elif case == "duplicate":
        write_raw(path, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8)
    elif case == "bad_dtype":
        write_raw(path, {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "size_mismatch":
        write_raw(path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "overlap":
        write_raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "out_of_file":
        write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(path)
    assert "model.safetensors" in str(err.value)


def test_missing_shard(tmp_path):
    build_hf("v2", seed=6).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}' is listed but missing"):
        load_model(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    build_hf("v2", seed=6).save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = next(iter(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.layers.0.extra.weight' is listed in the index but not in this file"):
        load_model(tmp_path)


def test_pickle_checkpoint_refused(v3_dir):
    path, _ = v3_dir
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a pickle, never opened")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are refused"):
        load_model(path)


def test_no_checkpoint(tmp_path):
    build_hf("v2").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_fp8_weight_without_scale(v3_dir):
    path, _ = v3_dir
    name = "model.layers.0.self_attn.o_proj.weight"
    resave(path, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{name}' has no '{name}_scale_inv'"):
        load_model(path)


def test_load_in_bfloat16_and_float16(v3_dir):
    path, _ = v3_dir
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(path, dtype=dtype)
        assert model.embed.weight.dtype == dtype
        assert model.layers[1].ffn.gate.bias.dtype == torch.float32  # the correction bias stays fp32
        assert torch.isfinite(logits_of(model)).all()


def test_skipping_the_mtp_layer_is_not_news(caplog):
    """The embedded model carries an MTP layer; loading it says nothing at INFO about skipping it."""
    import logging

    from moela.config import DEFAULT_MODEL_DIR

    with caplog.at_level(logging.INFO, logger="moela.loader"):
        load_model(DEFAULT_MODEL_DIR, dtype=torch.float32)
    assert not any("skipping" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


def test_fp4_dequantization_by_hand():
    from moela.loader import dequantize_fp4

    # e2m1 codes: 0.5 -> 1, -1 -> 8 | 2, 6 -> 7, 3 -> 5; low nibble first
    packed = torch.tensor([[(10 << 4) | 1, (5 << 4) | 7]], dtype=torch.uint8)
    scale = torch.tensor([[2.0, 0.25]]).to(torch.float8_e8m0fnu)  # UE8M0: powers of two
    assert dequantize_fp4(packed, scale, "t", block=2).tolist() == [[1.0, -2.0, 1.5, 0.75]]
    with pytest.raises(CheckpointError, match="t: its FP4 scale has shape \\[1, 1\\], expected \\[1, 2\\]"):
        dequantize_fp4(packed, scale[:, :1], "t", block=2)


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def to_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (bytes [out, in/2], UE8M0 scales [out, ceil(in/block)]), rounding to the nearest e2m1."""
    blocks = torch.nn.functional.pad(w, (0, -w.shape[1] % block)).view(w.shape[0], -1, block)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-8) / 6)))  # [out, n_blocks]
    x = (w / scale.repeat_interleave(block, 1)[:, : w.shape[1]]).clamp(-6, 6)
    codes = (x.abs()[..., None] - FP4_GRID).abs().argmin(-1) | ((x < 0).long() << 3)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8), scale.to(torch.float8_e8m0fnu)


def to_fp8_ue8m0(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], power-of-two scales per block)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.nn.functional.pad(w, (0, cols * block - w.shape[1], 0, rows * block - w.shape[0]))
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-8)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    full = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def deepseek_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our V4 state dict in DeepSeek's own names: per-expert w1/w2/w3, flat mHC names, no "model." prefix."""
    import re

    out = {}
    for name, t in state.items():
        if m := re.fullmatch(r"(layers\.\d+\.ffn\.)experts\.(w13|w2)", name):
            for e, w in enumerate(t):
                parts = {"w2": w} if m[2] == "w2" else dict(zip(("w1", "w3"), w.chunk(2)))
                out.update({f"{m[1]}experts.{e}.{k}.weight": v for k, v in parts.items()})
        elif m := re.fullmatch(r"(layers\.\d+\.ffn\.shared_experts\.)w13\.weight", name):
            out.update({f"{m[1]}w1.weight": t.chunk(2)[0], f"{m[1]}w3.weight": t.chunk(2)[1]})
        else:
            out[re.sub(r"hc_(attn|ffn|head)\.(fn|base|scale)$", r"hc_\1_\2", name)] = t
    return out


def test_v4_in_deepseek_names_with_fp8_ue8m0_and_fp4_experts(hf_checkpoint, tmp_path):
    """DeepSeek's format: e4m3 projections with power-of-two 128x128 `.scale`, e2m1 experts two per byte with
    1x32 scales; loading dequantizes them to exactly the values the scales say."""
    path, _ = hf_checkpoint("v4")
    ref = load_model(path, dtype=torch.float32)
    tensors, expected = {}, dict(ref.state_dict())
    for name, t in deepseek_names(ref.state_dict()).items():
        t = t.contiguous()
        if ".experts." in name:
            tensors[name], tensors[name[: -len("weight")] + "scale"] = to_fp4(t)
        elif name.endswith(("wq_b.weight", "wkv.weight", "wo_b.weight")) and ".indexer." not in name:
            tensors[name], tensors[name[: -len("weight")] + "scale"] = to_fp8_ue8m0(t)
        else:
            tensors[name] = t
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, dtype=torch.float32)
    got = model.state_dict()
    w = got["layers.1.ffn.experts.w13"][2, :24]  # expert 2's w1: FP4, 1x32 blocks of 2^k
    assert not torch.equal(w, expected["layers.1.ffn.experts.w13"][2, :24])  # really quantized
    q, s = to_fp4(expected["layers.1.ffn.experts.w13"][2, :24].contiguous())
    from moela.loader import dequantize_fp4

    assert torch.equal(w, dequantize_fp4(q, s, "w"))
    wq = got["layers.2.attn.wq_b.weight"]
    q8, s8 = to_fp8_ue8m0(expected["layers.2.attn.wq_b.weight"])
    assert torch.equal(wq, q8.float() * s8.float())  # one 128x128 block at this size
    assert torch.equal(got["layers.0.attn.wq_a.weight"], expected["layers.0.attn.wq_a.weight"])  # left in fp32


def test_v4_in_transformers_module_names(hf_checkpoint, tmp_path):
    """The names of transformers' modules (as its in-memory state dict has them, fused experts included)."""
    path, hf = hf_checkpoint("v4")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if "inv_freq" not in k}, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ids = torch.randint(2, 128, (1, 19), generator=torch.Generator().manual_seed(5))
    model = load_model(tmp_path, dtype=torch.float32)
    ctx = StepContext.prefill([19])
    with torch.no_grad():
        assert rel_err(model.logits(model(ids[0], ctx.positions, ctx)), hf(ids).logits[0]) < 1e-4
    bad = {k: v.contiguous() for k, v in hf.state_dict().items() if "inv_freq" not in k and "layers.2.attn_hc" not in k}
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors of 'layers.2.hc_attn.fn'"):
        load_model(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["v2", "v3", "v32"])
def test_save_model_round_trips_through_transformers(hf_checkpoint, tmp_path, variant):
    src, hf = hf_checkpoint(variant)
    save_model(load_model(src, dtype=torch.float32), tmp_path, config=json.loads((src / "config.json").read_text()))
    assert rel_err(logits_of(load_model(tmp_path, dtype=torch.float32)), hf_logits(hf)) < 1e-5
    again = type(hf).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert rel_err(hf_logits(again), hf_logits(hf)) < 1e-5


def test_saving_v4_is_refused_by_name(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("v4")
    with pytest.raises(CheckpointError, match="DeepSeek-V4"):
        save_model(load_model(src, dtype=torch.float32), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
