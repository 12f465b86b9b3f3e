"""Streaming checkpoint pruning (fxprune.streaming): the same kept indices and bit-identical tensors as the
in-memory compile, a stock HF folder, layer-wise verification that catches a corrupted shard, clear errors for a
missing or truncated shard, and nothing at out_dir unless the result is complete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

T = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.errors import LoadError, VerificationError  # noqa: E402
from fxprune.passes import ChannelPrune, Shrink  # noqa: E402
from fxprune.records import ShrinkRecord  # noqa: E402
from fxprune.streaming import CheckpointReader, verify_layerwise  # noqa: E402

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, use_cache=False, tie_word_embeddings=False)


def _passes():
    return [ChannelPrune(ratio=0.3, scope="uniform"), Shrink()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A bf16 Llama checkpoint in 3 shards; weights drawn N(0, 1) so every channel matters."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CFG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    d = tmp_path_factory.mktemp("ckpt") / "llama"
    model.to(torch.bfloat16).save_pretrained(d, max_shard_size="40KB")
    assert len(list(d.glob("*.safetensors"))) >= 2
    return d


@pytest.fixture(scope="module")
def streamed(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "pruned"
    res = fxprune.prune_checkpoint(T.LlamaConfig(**CFG), ckpt, _passes(), out, end_to_end=False,
                                   max_shard_bytes=30_000)
    return res


@pytest.fixture(scope="module")
def in_memory(ckpt):
    """The in-memory compile of the same checkpoint (float32 model holding the bf16 values)."""
    model = T.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    return fxprune.compile(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)}, _passes(), count_flops=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_streaming_equals_in_memory_bitwise(in_memory, streamed):
    ref = in_memory
    assert ref.report.verified
    mine = {k: v for k, v in ref.module.state_dict().items()}
    written = CheckpointReader(streamed.out_dir)
    assert len(streamed.files) >= 2 and (streamed.out_dir / "model.safetensors.index.json").is_file()
    # the same kept indices, parameter by parameter
    want = {k: v for k, v in fxprune.records.compose_kept_indices(ref.program.records_of(ShrinkRecord)).items()
            if any(d is not None for d in v)}
    got = {k: v for k, v in streamed.plan.kept.items() if any(d is not None for d in v)}
    assert sorted(want) == sorted(got) and want
    for k in want:
        for a, b in zip(want[k], got[k]):
            assert (a is None and b is None) or np.array_equal(a, b), k
    # every written tensor is the in-memory result, bit for bit (in the checkpoint's bf16)
    names = written.names()
    assert sorted(names) == sorted(k for k in mine if "rotary" not in k)
    for k in names:
        w = written.read(k)
        assert w.dtype == torch.bfloat16
        r = mine[k].to(torch.bfloat16)
        assert w.shape == r.shape and torch.equal(_bits(w), _bits(r)), k
    assert streamed.params_after < streamed.params_before
    assert streamed.verification["verified"] and streamed.verification["segments"]
    assert all(s["ok"] and s["observable"] for s in streamed.verification["segments"])


def test_stock_hf_folder_loads_and_matches(in_memory, streamed):
    assert streamed.config_written
    cfg = json.loads((streamed.out_dir / "config.json").read_text())
    assert cfg["intermediate_size"] < CFG["intermediate_size"]
    pruned = T.LlamaForCausalLM.from_pretrained(streamed.out_dir, torch_dtype=torch.float32).eval()
    ref = in_memory
    ids = torch.randint(0, CFG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = pruned(input_ids=ids).logits
        b = ref.module(input_ids=ids)
        b = b.logits if hasattr(b, "logits") else b[0] if isinstance(b, (tuple, list)) else b
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def _corrupt(path: Path, tensor: str) -> None:
    """Overwrite the first 16 bytes of ``tensor`` in the safetensors file ``path`` (bf16 0x4f4f ~ 3.5e9)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    path.write_bytes(raw[:start] + b"\x4f" * 16 + raw[start + 16:])


def test_layerwise_verification_catches_a_corrupted_shard(ckpt, streamed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(streamed.out_dir, bad)
    name = "model.layers.1.mlp.down_proj.weight"
    written = CheckpointReader(bad)
    _corrupt(written.infos[name].file, name)
    with pytest.raises(VerificationError, match=r"model\.layers\.1\.mlp") as e:
        verify_layerwise(streamed.plan, CheckpointReader(ckpt), CheckpointReader(bad))
    assert written.infos[name].file.name in str(e.value)
    # an untouched tensor (the embedding) is compared byte for byte
    shutil.rmtree(bad)
    shutil.copytree(streamed.out_dir, bad)
    name = "model.embed_tokens.weight"
    _corrupt(CheckpointReader(bad).infos[name].file, name)
    with pytest.raises(VerificationError, match="embed_tokens"):
        verify_layerwise(streamed.plan, CheckpointReader(ckpt), CheckpointReader(bad))


def test_corruption_during_write_leaves_no_out_dir(ckpt, tmp_path, monkeypatch):
    import fxprune.streaming as S

    real = S._write_shard

    def write_then_corrupt(path, entries, reader, chunk_bytes):  # a disk that flips bytes after the write
        real(path, entries, reader, chunk_bytes)
        for o in entries:
            if o.name.endswith("layers.0.mlp.up_proj.weight"):
                _corrupt(path, o.name)

    monkeypatch.setattr(S, "_write_shard", write_then_corrupt)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"model\.layers\.0\.mlp"):
        fxprune.prune_checkpoint(T.LlamaConfig(**CFG), ckpt, _passes(), out, end_to_end=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_or_truncated_shard_is_named_and_nothing_is_written(ckpt, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    shards = sorted(broken.glob("*.safetensors"))
    shards[1].unlink()
    out = tmp_path / "out"
    with pytest.raises(LoadError, match=f"{shards[1].name}.*missing"):
        fxprune.prune_checkpoint(T.LlamaConfig(**CFG), broken, _passes(), out)
    shutil.copy(ckpt / shards[1].name, shards[1])
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-10])
    with pytest.raises(LoadError, match=f"{shards[0].name}.*truncated"):
        fxprune.prune_checkpoint(T.LlamaConfig(**CFG), broken, _passes(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_meta_model_needs_meta_weights(ckpt, tmp_path):
    model = T.LlamaForCausalLM(T.LlamaConfig(**CFG))
    with pytest.raises(fxprune.errors.InputError, match="meta device"):
        fxprune.prune_checkpoint(model, ckpt, _passes(), tmp_path / "out")


@pytest.mark.slow
def test_exact_norms_fold_into_a_stock_config(ckpt, tmp_path):
    """norms="exact" prunes the hidden size: the stock config folds sqrt(D/Dk) into the norm weights (as
    fxprune.hf.save_pretrained); the end-to-end check compares the folded tensors bitwise with the in-memory
    compile's, every segment (embedding, norms, lm_head included) is verified layer-wise."""
    passes = [ChannelPrune(ratio=0.25, scope="uniform", norms="exact"), Shrink()]
    res = fxprune.prune_checkpoint(T.LlamaConfig(**CFG), ckpt, passes, tmp_path / "out", end_to_end=True)
    assert res.config_written and res.end_to_end["in_memory_verified"]
    assert res.end_to_end["tensors_compared"] == len(CheckpointReader(ckpt).names())
    segs = {s["segment"]: s for s in res.verification["segments"]}
    assert {"model.embed_tokens", "model.norm", "lm_head", "model.layers.1.input_layernorm"} <= set(segs)
    assert all(s["ok"] for s in segs.values())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden_size"] == 48 and cfg["rms_norm_eps"] == pytest.approx(1e-6 * 64 / 48)


@pytest.mark.slow
def test_cli_checkpoint_flag(ckpt, tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - pass: ChannelPrune\n    ratio: 0.3\n    scope: uniform\n  - pass: shrink\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fxprune", "compile", f"hf:{ckpt}", "--recipe", str(recipe),
                        "--checkpoint", str(ckpt), "--out", str(out), "--json"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["verification"]["verified"] and summary["params_after"] < summary["params_before"]
    assert (out / "config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "fxprune", "compile", "resnet18", "--recipe", str(recipe),
                        "--checkpoint", str(ckpt), "--out", str(tmp_path / "o2")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 2 and "hf: models" in r.stderr
