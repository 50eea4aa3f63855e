"""model/memory.py: the memory plan's static count is exact, its per-token activation slope
matches autograd's saved tensors of the real model, and it scales with tokens and SP."""
from __future__ import annotations

import torch

from model.conditions import random_conditions
from model.memory import Estimate, estimate, markdown, measure_saved_bytes, n_params, plan, static_bytes
from model.registry import PRESETS, build_model, count_parameters

REPO_STAGE3 = "configs/stages/stage3.yaml"


def test_static_bytes_are_exact_parameter_bytes_times_the_state_factor():
    model = build_model("tiny")
    assert n_params("tiny") == count_parameters(model)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights + grads + 2 AdamW moments + EMA in fp32, plus one bf16 copy: 22 bytes a parameter
    assert static_bytes(n_params("tiny")) == fp32_bytes * 22 / 4


def _measured(preset: str, height: int, width: int) -> int:
    torch.manual_seed(0)
    model = build_model(preset)
    g = torch.Generator().manual_seed(0)
    cond = random_conditions(1, 2, 1, boxes=4, text_len=8, text_dim=model.config.text_dim, bev_size=200, generator=g)
    x = torch.randn(1, 2, 16, 1, height // 8, width // 8, generator=g)
    return measure_saved_bytes(model, x, torch.rand(1, generator=g), cond)


def test_per_token_activation_slope_matches_the_saved_tensor_count():
    """Two token counts at the same frame count: the BEV stem and the key/value terms cancel."""
    torch.set_num_threads(1)
    cfg = PRESETS["small"]
    p = n_params("small")
    small, large = (64, 128), (128, 256)                                    # 64 and 256 tokens per view
    measured = _measured("small", *large) - _measured("small", *small)
    est = [estimate(cfg, p, 1, h, w, 1, text_len=8, boxes=4, views=2).activations for h, w in (small, large)]
    assert abs((est[1] - est[0]) / measured - 1) < 0.15, (est[1] - est[0], measured)


def test_activation_estimate_scales_with_tokens_and_sp():
    cfg, p = PRESETS["paper"], 2_000_000_000
    for ck in (False, True):
        one = estimate(cfg, p, 1, 848, 1600, 9, sp=1, checkpointing=ck)
        two = estimate(cfg, p, 1, 848, 1600, 9, sp=2, checkpointing=ck)
        four = estimate(cfg, p, 1, 848, 1600, 9, sp=4, checkpointing=ck)
        assert one.static == two.static == four.static                     # SP shards tokens, not weights
        assert two.tokens_per_rank * 2 == one.tokens_per_rank == four.tokens_per_rank * 4   # 5300 tokens split evenly
        # per-token terms halve; the replicated ones (BEV stem, condition keys) do not
        assert 0.5 < two.activations / one.activations < 0.52
        assert 0.25 < four.activations / one.activations < 0.27
        longer = estimate(cfg, p, 1, 848, 1600, 17, sp=1, checkpointing=ck)   # T' 3 -> 5
        assert 1.6 < longer.activations / one.activations < 1.7
    # 424 x 800: 27 x 50 = 1350 tokens per view-frame; SP=4 pads each rank to ceil(1350 / 4) = 338
    assert estimate(cfg, p, 1, 424, 800, 1, sp=4).tokens_per_rank == 6 * 338
    assert estimate(cfg, p, 1, 424, 800, 9, checkpointing=True).total < estimate(cfg, p, 1, 424, 800, 9).total
    assert isinstance(one, Estimate) and one.total == one.static + one.activations


def test_stage3_plan_table():
    rows = plan("paper", REPO_STAGE3)
    assert len(rows) == 12
    for r in rows:  # more SP never costs more per GPU; checkpointing never costs more
        for ck in (False, True):
            assert r["est"][(ck, 1)] >= r["est"][(ck, 2)] >= r["est"][(ck, 4)]
        for sp in (1, 2, 4):
            assert r["est"][(True, sp)] <= r["est"][(False, sp)]
    text = markdown(rows)
    assert text.count("\n") == 13 and "848x1600 T=33" in text and "224x400 T=full (241)" in text
