"""compressors.activations: the Grams of every linear module's inputs, block by block."""

import pytest
import torch

from compressors import activations
from compressors.apply import linear_targets


def test_gram_by_panels_equals_the_full_product():
    x = torch.randn(300, 1030, generator=torch.Generator().manual_seed(0))
    want = x.double().T @ x.double()
    got = activations.gram(x)
    assert torch.equal(got, got.T)  # mirrored exactly
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_panels_add_into_a_float64_sum_as_the_float32_gram_would():
    """A collector's sum takes each float32 panel product into its float64 accumulator in
    place: the same numbers as forming the float32 Gram and adding it, call after call."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(200, 700, generator=g).bfloat16() for _ in range(3)]
    acc = torch.zeros(700, 700, dtype=torch.float64)
    want = torch.zeros(700, 700, dtype=torch.float64)
    for x in xs:
        activations.add_gram(x, acc)
        want += activations.gram(x).double()
    assert torch.equal(acc, want)
    exact = sum(x.double().T @ x.double() for x in xs)
    torch.testing.assert_close(acc, exact, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "opt"])
def test_grams_are_the_inputs_products_shared_by_siblings(family, family_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dir(family)).eval()
    windows = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    targets = linear_targets(model)
    seen: dict[str, list] = {}
    hooks = [
        mod.register_forward_pre_hook(
            lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach().clone())
        )
        for name, (t, mod) in targets.items()
        if t.block is not None
    ]
    try:
        grams = activations.collect(model, windows)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(grams) == [0, 1]
    names = {n for b in grams.values() for n in b}
    assert names == {n for n, (t, _) in targets.items() if t.block is not None}
    for block in grams.values():
        for name, (h, rows) in block.items():
            x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[name]]).double()
            assert rows == x.shape[0] == windows.numel()
            torch.testing.assert_close(h, x.T @ x, rtol=1e-5, atol=1e-5)
    # one matrix per input tensor: attention in, attention out, MLP in, MLP hidden
    assert len({id(h) for h, _ in grams[0].values()}) == 4


def test_llama_siblings_share_one_matrix(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    h = {n: g for n, (g, _) in activations.collect(model, windows)[1].items()}
    attn = "model.layers.1.self_attn."
    assert h[attn + "q_proj"] is h[attn + "k_proj"] is h[attn + "v_proj"]
    assert h[attn + "o_proj"] is not h[attn + "q_proj"]
    assert h["model.layers.1.mlp.gate_proj"] is h["model.layers.1.mlp.up_proj"]
    assert h["model.layers.1.mlp.down_proj"].shape == (96, 96)
    assert len(h) == 7
