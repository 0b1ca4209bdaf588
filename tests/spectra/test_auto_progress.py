"""`auto_plan` speaks during its candidates phase (issue 32: every long wait speaks)."""

from spectra.io.model import open_model
from spectra.plan.auto import auto_plan


def test_candidates_report_each_unit_in_order(tiny_llama_dir):
    heard = []
    auto_plan(open_model(str(tiny_llama_dir)), "lowrank", 0.5, progress=lambda *a: heard.append(a))
    assert heard and all(what.startswith("candidates ") for _, _, what in heard)
    assert [d for d, _, _ in heard] == list(range(1, len(heard) + 1))
    assert {t for _, t, _ in heard} == {len(heard)} == {15}  # 14 linear modules + lm_head
