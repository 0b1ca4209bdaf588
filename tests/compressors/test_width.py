"""Width's numerics on planted blocks, checked on real transformers models: a smaller
config loaded with the shrunk weights reproduces the original."""

import json

import numpy as np
import pytest
import torch
import transformers as tf

from compressors import width
from compressors.base import ConfigError, h_norm


def llama(**kw) -> tf.LlamaForCausalLM:
    cfg = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, **kw})).double().eval()


def intermediate(mlp, x: torch.Tensor) -> torch.Tensor:
    """down_proj's input for inputs x (tokens, hidden)."""
    with torch.no_grad():
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def planted_mlp(model, k: int):
    """Neurons k.. are scaled copies of neurons 0..: gate rows equal, up rows scaled, so
    the intermediate activations live in k dimensions."""
    mlp = model.model.layers[0].mlp
    n = mlp.down_proj.weight.shape[1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for j in range(k, n):
            src = j % k
            mlp.gate_proj.weight[j] = mlp.gate_proj.weight[src]
            mlp.up_proj.weight[j] = mlp.up_proj.weight[src] * (0.5 + torch.rand(1, generator=g))
    return mlp


def with_weights(model, intermediate_size=None, kv_heads=None, **weights):
    """A copy of `model` with a smaller config, its state loaded with `weights` replaced."""
    cfg = model.config.to_dict()
    if intermediate_size:
        cfg["intermediate_size"] = intermediate_size
    if kv_heads:
        cfg["num_key_value_heads"] = kv_heads
    small = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).double().eval()
    state = dict(model.state_dict())
    state.update(weights)
    small.load_state_dict(state)
    return small


def test_kept_neurons_with_the_refit_reproduce_a_planted_mlp():
    model = llama()
    mlp = planted_mlp(model, k=9)
    x = torch.randn(400, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = intermediate(mlp, x)
    h = z.T @ z
    gate, up, down, keep = width.shrink_mlp(
        mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 9, h
    )
    assert len(set(keep.tolist())) == 9 and sorted(keep.tolist()) == keep.tolist()
    p = "model.layers.0.mlp."
    small = with_weights(
        model,
        intermediate_size=9,
        **{p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": down},
    )
    ids = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(ids).logits, small(ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # and the refit is the least-squares fit of the block's output from the kept neurons
    ref = np.linalg.lstsq(
        z[:, keep].numpy(), (z @ mlp.down_proj.weight.detach().T).numpy(), rcond=None
    )
    assert np.allclose(down.numpy(), ref[0].T, atol=1e-8)


def test_greedy_neurons_beat_weight_norms_on_the_calibration():
    model = llama(intermediate_size=64)
    mlp = model.model.layers[0].mlp
    x = torch.randn(500, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x * torch.logspace(-1, 1, 32, dtype=torch.float64)
    z = intermediate(mlp, x)
    h = z.T @ z
    w = mlp.down_proj.weight.detach()
    x = x.detach()
    errs = {}
    for select in ("greedy", "norm"):
        gate, up, down, keep = width.shrink_mlp(
            mlp.gate_proj.weight, mlp.up_proj.weight, w, 24, h, select
        )
        out = intermediate(mlp, x) @ w.T
        small = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        errs[select] = float(torch.linalg.norm(out - small) / torch.linalg.norm(out))
    assert errs["greedy"] < 0.8 * errs["norm"], errs


def test_the_greedy_choice_follows_what_down_proj_reads():
    """Two equally active neurons; down_proj reads only the second: it is kept."""
    h = torch.eye(4, dtype=torch.float64)
    down = torch.tensor([[0.0, 3.0, 0.1, 0.0], [0.0, 1.0, 0.0, 0.2]], dtype=torch.float64)
    assert width.greedy_neurons(down, h, 1).tolist() == [1]
    # the second kept adds the most of what is left of the output
    assert width.greedy_neurons(down, h, 2).tolist() == [1, 3]


def test_merged_duplicate_key_value_heads_reproduce_the_attention():
    """Heads 0 and 2, 1 and 3 are duplicates (not neighbours): merged to two key/value
    heads, with the query heads regrouped, the model's output is unchanged."""
    model = llama()
    attn = model.model.layers[0].self_attn
    d = 8
    with torch.no_grad():
        for w in (attn.k_proj.weight, attn.v_proj.weight):
            w[2 * d : 3 * d] = w[0:d]
            w[3 * d : 4 * d] = w[d : 2 * d]
    x = torch.randn(300, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q, k, v, o, _, sets = width.merge_kv_heads(
        attn.q_proj.weight,
        attn.k_proj.weight,
        attn.v_proj.weight,
        attn.o_proj.weight,
        n_heads=4,
        n_kv=4,
        new_kv=2,
        hessian=x.T @ x,
    )
    assert sets == [[0, 2], [1, 3]]
    p = "model.layers.0.self_attn."
    small = with_weights(
        model,
        kv_heads=2,
        **{
            p + "q_proj.weight": q,
            p + "k_proj.weight": k,
            p + "v_proj.weight": v,
            p + "o_proj.weight": o,
        },
    )
    assert small.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, model(ids).logits, atol=1e-10, rtol=0)


def test_merged_heads_minimise_the_calibrated_error_of_their_members():
    """A merged head is the mean of its members: no other K' does better on
    sum_i ||(K_i - K') X^T||^2 (checked against perturbations)."""
    g = torch.Generator().manual_seed(7)
    k = torch.randn(4 * 8, 32, dtype=torch.float64, generator=g)
    v = torch.randn(4 * 8, 32, dtype=torch.float64, generator=g)
    x = torch.randn(200, 32, dtype=torch.float64, generator=g)
    h = x.T @ x
    q = torch.randn(8 * 8, 32, dtype=torch.float64, generator=g)
    o = torch.randn(32, 8 * 8, dtype=torch.float64, generator=g)
    _, k2, _, _, _, sets = width.merge_kv_heads(q, k, v, o, 8, 4, 1, h)
    assert sets == [[0, 1, 2, 3]]

    def loss(kk):
        return sum(h_norm(k[i * 8 : (i + 1) * 8] - kk, h) ** 2 for i in range(4))

    best = loss(k2)
    for _ in range(5):
        assert loss(k2 + 1e-3 * torch.randn(8, 32, dtype=torch.float64, generator=g)) > best


def test_bad_widths_are_refused_naming_the_limit():
    w = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(ConfigError, match="ffn.*6 neurons"):
        width.shrink_mlp(None, torch.randn(6, 8), w, 7, torch.eye(6))
    with pytest.raises(ConfigError, match="ffn"):
        width.WidthConfig(ffn=0)
    with pytest.raises(ConfigError, match="kv_heads.*4 key/value heads"):
        width.merge_sets(torch.randn(32, 8), torch.randn(32, 8), 4, 3)
    with pytest.raises(ConfigError, match="skip"):
        width.WidthConfig(skip="everything")
    with pytest.raises(ConfigError, match="calibration"):
        width.shrink_mlp(None, torch.randn(6, 8), w, 3, None, "greedy")


def calibrated(model, ids):
    """{block: {name: (H, rows)}} of every Linear input of `model` on `ids`."""
    grams, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            block = int(name.split(".layers.")[1].split(".")[0])

            def grab(m, args, out, name=name, block=block):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                h, n = grams.setdefault(block, {}).get(name, (0, 0))
                grams[block][name] = (h + x.T @ x, n + x.shape[0])

            hooks.append(mod.register_forward_hook(grab))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return grams


def test_a_uniform_width_saves_a_plain_checkpoint_of_the_same_architecture(tmp_path):
    """Every block at one width, one block skipped: `save_pretrained` of the narrowed
    model loads with plain from_pretrained (no remote code) and equals it."""
    import copy

    from compressors.width_model import plain_config, shrink

    model = llama(num_hidden_layers=3, num_key_value_heads=2, intermediate_size=40)
    ids = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(9))
    grams = calibrated(model, ids)
    small = copy.deepcopy(model)
    settings = {i: width.WidthConfig(ffn=24, kv_heads=1) for i in (0, 2)}
    settings[1] = width.WidthConfig(skip="block")
    got = shrink(small, settings, grams)
    assert got == {
        0: {"ffn": 24, "kv_heads": 1},
        1: {"skip": "block"},
        2: {"ffn": 24, "kv_heads": 1},
    }
    assert plain_config(small)
    small.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (
        24,
        1,
        2,
    )
    assert "auto_map" not in cfg
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    test = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        a, b, dense = loaded(test).logits, small(test).logits, model(test).logits
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert not torch.allclose(a, dense, atol=1e-3)  # narrower: not the dense model
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_skipped_block_is_the_identity():
    """With block 1 of 2 skipped, the final norm and head read block 0's output."""
    from compressors.width_model import shrink

    model = llama(num_hidden_layers=2)
    ids = torch.randint(0, 50, (2, 15), generator=torch.Generator().manual_seed(11))
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)

    with torch.no_grad():
        hook = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
        model(ids)
        hook.remove()
        shrink(model, {1: width.WidthConfig(skip="block")})
        assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
        want = model.lm_head(model.model.norm(seen["h"]))
        assert torch.allclose(model(ids).logits, want, atol=1e-12, rtol=0)


def test_widths_the_model_cannot_take_are_refused():
    from compressors.width_model import shrink

    model = llama(num_hidden_layers=2)
    with pytest.raises(ConfigError, match="every block"):
        shrink(model, {i: width.WidthConfig(skip="block") for i in range(2)})
    with pytest.raises(ConfigError, match="2 blocks"):
        shrink(model, {5: width.WidthConfig(ffn=4, select="norm")})
    with pytest.raises(ConfigError, match="ffn.*24 neurons"):
        shrink(model, {0: width.WidthConfig(ffn=30, select="norm")})
    with pytest.raises(ConfigError, match="kv_heads.*4 key/value heads"):
        shrink(model, {0: width.WidthConfig(kv_heads=3, select="norm")})


def test_block_errors_are_the_calibrated_output_errors_of_what_apply_builds():
    """The Plan page's block errors: the MLP's equals its output error on the
    calibration tokens after `shrink_block` narrows it (greedy and norm choices); the
    key/value one equals the projections' output error with each head replaced by its
    merged head; a removed sublayer is 1, one left whole 0, no calibration None."""
    import copy

    from compressors import width_model

    model = llama(num_key_value_heads=4)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 32, generator=g, dtype=torch.float64)
    z = intermediate(layer.mlp, x)
    h_down, h_in = z.T @ z, x.T @ x
    a, m = layer.self_attn, layer.mlp
    w = {r: getattr(m, f"{r}_proj").weight for r in ("gate", "up", "down")}
    w.update({r: getattr(a, f"{r}_proj").weight for r in "qkvo"})
    for select in ("greedy", "norm"):
        config = width.WidthConfig(ffn=10, kv_heads=2, select=select)
        got = width.block_errors(w, config, 4, h_down, h_in)
        small = copy.deepcopy(model)
        grams = {"model.layers.0.mlp.down_proj": (h_down, 300),
                 "model.layers.0.self_attn.q_proj": (h_in, 300)}  # fmt: skip
        width_model.shrink_block(small, 0, config, grams)
        with torch.no_grad():
            want = (m(x) - small.model.layers[0].mlp(x)).norm() / m(x).norm()
        assert got["mlp"] == pytest.approx(float(want), rel=1e-9), select
        hessian = h_in if select == "greedy" else None
        *_, sets = width.merge_kv_heads(w["q"], w["k"], w["v"], w["o"], 4, 4, 2, hessian)
        err = total = 0.0
        for proj in (a.k_proj, a.v_proj):
            with torch.no_grad():
                y = proj(x).reshape(300, 4, 8)  # (tokens, heads, head_dim)
            for group in sets:
                merged = y[:, group].mean(1, keepdim=True)
                err += float(((y[:, group] - merged) ** 2).sum())
            total += float((y**2).sum())
        assert got["kv"] == pytest.approx((err / total) ** 0.5, rel=1e-9) and got["kv"] > 0
    removed = width.block_errors(w, width.WidthConfig(skip="attention"), 4, h_down, h_in)
    assert removed == {"mlp": 0.0, "kv": 1.0}
    blind = width.block_errors(w, width.WidthConfig(ffn=10, kv_heads=2, select="norm"), 4)
    assert blind == {"mlp": None, "kv": None}
