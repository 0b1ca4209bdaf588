"""The CUDA path agrees with the CPU path: every compressor, a whole calibrated apply,
and healing (bf16 autocast). Skipped where no GPU is present (CI); run on a lent one."""

import pytest
import torch

from compressors.base import Calibration, relative_error
from compressors.registry import compress, make_config
from spectra.io.model import open_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU = "cuda"
M, N = 48, 40  # N a multiple of 8 for the E8P rows
CONFIGS = [
    dict(method="lowrank", rank=8),
    dict(method="lowrank", rank=8, whiten=True),
    dict(method="lowrank", rank=8, factor_bits=4, factor_group_size=16),
    dict(method="joint", rank=8, whiten=True),
    dict(method="losparse", rank=4, sparsity=0.7),
    dict(method="losparse", rank=4, sparsity=0.7, whiten=True),
    dict(method="mpo", cores=3, bond_dim=6),
    dict(method="mpo", cores=2, bond_dim=4, whiten=True, factor_bits=4, factor_group_size=16),
    dict(method="quant", bits=4, group_size=16),
    dict(method="quant", bits=3, group_size=16, gptq=True),
    dict(method="quant", bits=2, gptq=True, quantizer="e8p"),
    dict(method="prune", sparsity=0.5, wanda=True),
    dict(method="prune", sparsity=0.5, sparsegpt=True),
    dict(method="caldera", rank=4, bits=2, factor_bits=4, group_size=16, iters=2),
    dict(method="caldera", rank=4, bits=2, factor_bits=4, group_size=16, quantizer="e8p"),
]


def weights(k=1):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        u, _ = torch.linalg.qr(torch.randn(M, N, generator=g))
        v, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
        out.append(((u * torch.logspace(0, -1.5, N)) @ v.T).float())
    return out


def planted_calibration(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, N, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, N)
    return Calibration((x.T @ x).to(device), 256)


@pytest.mark.parametrize("knobs", CONFIGS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_every_compressor_on_cuda_agrees_with_the_cpu(knobs):
    config = make_config(**knobs)
    ws = weights(2 if knobs["method"] == "joint" else 1)
    errors = {}
    for device in ("cpu", GPU):
        w = [x.to(device) for x in ws]
        f = compress(w if knobs["method"] == "joint" else w[0], config, planted_calibration(device))
        d = f.member_dense(0) if knobs["method"] == "joint" else f.to_dense()
        assert d.device.type == device
        errors[device] = relative_error(ws[0].double(), d.double().cpu())
        if knobs["method"] != "joint":
            x = torch.randn(5, N, device=device)
            torch.testing.assert_close(
                f.as_module(None)(x), x @ d.T.to(x.dtype), rtol=1e-4, atol=1e-4
            )
    assert errors[GPU] == pytest.approx(errors["cpu"], rel=0.05, abs=1e-6), errors


def test_a_calibrated_apply_and_healing_run_on_cuda(family_dir):
    from spectra.data import calibration, heal
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.plan import run

    path = str(family_dir("llama"))
    tok = open_model(path).tokenizer()
    plan = plans.parse(
        dict(
            version=1,
            calibration=dict(samples=8, seqlen=32),
            rules=[
                {
                    "targets": [r"re:.*\.self_attn\.[qk]_proj"],
                    "method": "joint",
                    "rank": 2,
                    "whiten": True,
                },
                {"targets": [r"re:.*\.mlp\..*"], "method": "lowrank", "rank": 4, "whiten": True},
                {
                    "targets": [r"re:.*\.self_attn\.[vo]_proj"],
                    "method": "losparse",
                    "rank": 4,
                    "sparsity": 0.8,
                    "whiten": True,
                },
            ],
        )
    )
    config = heal.HealConfig(
        steps=6,
        lr=1e-3,
        tokens_per_step=64,
        seqlen=32,
        eval_every=0,
        eval_tokens=64,
        checkpoint_every=0,
    )
    windows = heal.train_windows(tok, config, "builtin")
    read = {int(i) for s in range(6) for i in heal.batch_indices(s, 2, windows.shape[0], 0)}
    held_out = windows[[i for i in range(windows.shape[0]) if i not in read][:4]]
    ppl, kl = {}, {}
    for device in ("cpu", GPU):
        model = open_model(path, device, "float32", "none").load()
        with torch.no_grad():  # a sharper head: a KL well above bf16's rounding
            model.lm_head.weight.mul_(30)
        grams = calibration.calibrate(
            open_model(path), plan.calibration, network=model, use_cache=False
        )
        student, _, facts = run.apply_plan(model, plan, grams)
        assert {p.device.type for p in student.parameters()} == {device}
        ppl[device] = ev.perplexity(student, tok, seqlen=32, max_tokens=512).ppl
        x = held_out.to(device)

        def held_out_kl(student=student, model=model, x=x):
            with torch.no_grad():
                s, t = student(x, use_cache=False).logits, model(x, use_cache=False).logits
                return float(heal.distill_loss(s, t)[1])

        before = held_out_kl()
        heal.heal(student, model, facts, tok, config)
        kl[device] = (before, held_out_kl())
    assert ppl[GPU] == pytest.approx(ppl["cpu"], rel=0.02)
    assert kl[GPU][0] == pytest.approx(kl["cpu"][0], rel=0.02), kl
    # bf16 autocast on CUDA, float32 on the CPU: both lower the held-out KL, by about
    # as much (how much six steps buy depends on the random tiny model: on the H200,
    # 1.3228 -> 1.2273 on the CPU and -> 1.2241 on CUDA)
    drop = {d: kl[d][0] - kl[d][1] for d in kl}
    assert drop["cpu"] > 0.02 * kl["cpu"][0], kl
    assert drop[GPU] == pytest.approx(drop["cpu"], rel=0.25), kl


def test_apply_heal_and_load_on_cuda_through_the_cli(family_dir, tmp_path, cli):
    """`spectra apply` and `spectra heal` on the GPU, the output loaded on both devices."""
    import yaml

    import spectra

    plan = {
        "version": 1,
        "calibration": {"samples": 4, "seqlen": 32},
        "rules": [
            {
                "targets": [r"re:.*\.mlp\.(gate|up)_proj"],
                "method": "lowrank",
                "rank": 7,
                "whiten": True,
            },
            {"targets": [r"re:.*\.self_attn\.[qk]_proj"], "method": "joint", "rank": 8},
            {"targets": [r"re:.*\.mlp\.down_proj"], "method": "mpo", "bond_dim": 6},
            {
                "targets": [r"re:.*\.self_attn\.v_proj"],
                "method": "losparse",
                "rank": 4,
                "sparsity": 0.8,
            },
            {
                "targets": [r"re:.*\.self_attn\.o_proj"],
                "method": "caldera",
                "rank": 4,
                "bits": 2,
                "factor_bits": 4,
                "group_size": 16,
                "quantizer": "e8p",
            },
        ],
        "heal": {
            "steps": 2,
            "tokens_per_step": 64,
            "seqlen": 32,
            "lr": 1e-3,
            "eval_every": 1,
            "eval_tokens": 64,
        },
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out, out2 = tmp_path / "out", tmp_path / "out2"
    r = cli(
        "apply", tmp_path / "plan.yaml", "--model", family_dir("llama"), "-o", out, "--device", GPU
    )
    assert r.returncode == 0, r.stderr
    r = cli("heal", out, "-o", out2, "--steps", "3", "--device", GPU)
    assert r.returncode == 0, r.stderr
    x = torch.randint(0, 100, (2, 16))
    logits = {d: spectra.load_compressed(out2, d)(x.to(d)).logits.cpu() for d in ("cpu", GPU)}
    torch.testing.assert_close(logits[GPU], logits["cpu"], rtol=1e-3, atol=1e-3)
