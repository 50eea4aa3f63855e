"""The tiny MVDiT memorises one synthetic sample under rectified flow.

One sample = one latent x0, one noise draw eps and one condition bundle (T = 9 pixel frames,
2 views); t is drawn each step (logit-normal, as in SD3/Open-Sora). x_t = (1 - t) x0 + t eps,
target velocity eps - x0. The loss on a fixed grid of t must fall by at least 10x within 300
AdamW steps (it does in ~50, about 3 s of CPU)."""
from __future__ import annotations

import torch

from model.conditions import Conditions, random_conditions
from model.registry import build_model

torch.set_num_threads(1)  # 2 threads on a shared 2-core box is slower, not faster


def test_tiny_model_overfits_one_sample():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model("tiny")
    cond = random_conditions(1, 2, 9, text_dim=32, bev_size=32, generator=g)
    cond = model.draw_box_latent(cond, g)
    x0 = torch.randn(1, 2, 16, 3, 4, 8, generator=g)
    eps = torch.randn(1, 2, 16, 3, 4, 8, generator=g)
    t_eval = torch.tensor([0.1, 0.4, 0.7, 0.95])
    E = len(t_eval)
    cond_eval = Conditions(**{k: None if getattr(cond, k) is None else getattr(cond, k).expand(
        E, *getattr(cond, k).shape[1:]) for k in cond.__dataclass_fields__})

    def eval_loss() -> float:
        tt = t_eval.view(E, 1, 1, 1, 1, 1)
        with torch.no_grad():
            return (model((1 - tt) * x0 + tt * eps, t_eval, cond_eval) - (eps - x0)).square().mean().item()

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start = eval_loss()
    assert start > 1.0  # an untrained model: loss >= E|eps - x0|^2 ~ 2
    best, step = start, 0
    for step in range(1, 301):
        t = torch.sigmoid(torch.randn(1, generator=g))
        xt = (1 - t) * x0 + t * eps
        loss = (model(xt, t, cond) - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            best = min(best, eval_loss())
            if best <= start / 10:
                break
    assert best <= start / 10, f"loss {start:.3f} -> {best:.3f} after {step} steps"
