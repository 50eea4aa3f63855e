"""Stage transitions (paper Section 5.1): a model of the next stage starts from the weights of
the last one, whatever the two configs add or drop.

    report = init_from_state(model, weights, ModelConfig.from_dict(ckpt_config["model"]))

MVDiT keeps spatial and temporal blocks in separate stacks (base_blocks_s / base_blocks_t, and
the ControlNet's control_blocks_s / control_blocks_t, the authors' names), so tensors load by
key: a stage-1 checkpoint (no temporal stacks) fills every spatial block of a stage-2 model and
the temporal stacks are new.

A module the new config adds keeps the model's initialisation, made an identity wherever it
matters: a new temporal block gets zero output projections (attention, cross-attention, MLP;
the zero adaLN table alone would not do: the shared timestep projection is trained by then),
a new ControlNet temporal block is a copy of its base block with a zero after_proj, and a new
per-box latent (bbox_embedder.mean_var) starts at mean 0, log-variance -30 (theirs: N(0, 1)). So the model's
output at step 0 equals the checkpoint's, except where the new config computes differently
on purpose (the authors' stage 2 also averages box and ego-pose tokens per CogVAE group instead
of over the whole clip: videos see that change, images do not).

A tensor of the checkpoint that the model has no place for (the new config drops a module)
is an error unless `allow_drop`; a shape mismatch (another hidden size) always is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from model.blocks import MultiViewBlock
from model.config import ModelConfig

NEW_LOGVAR = -30.0   # a new per-box latent starts with sigma = e^-15: its draw leaves the class token as it was


class StageInitError(ValueError):
    """The checkpoint does not fit the new model (a user's config mistake, reported as one line)."""


@dataclass
class InitReport:
    loaded: int = 0                                       # tensors taken from the checkpoint
    added: list[str] = field(default_factory=list)        # model tensors the checkpoint lacks (identity init)
    dropped: list[str] = field(default_factory=list)      # checkpoint tensors the model has no place for

    def summary(self) -> str:
        def short(keys: list[str]) -> str:  # whole blocks ("blocks.1"), else the top two levels
            heads = sorted({m.group(1) if (m := re.match(r"((?:base|control)_blocks_[st]\.\d+)\.", k))
                            else ".".join(k.split(".")[:2]) for k in keys})
            return ", ".join(heads[:8]) + (f", ... ({len(heads)} modules)" if len(heads) > 8 else "")
        parts = [f"{self.loaded} tensors loaded"]
        if self.added:
            parts.append(f"{len(self.added)} new (identity init): {short(self.added)}")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped: {short(self.dropped)}")
        return "; ".join(parts)


def identity_block(block: MultiViewBlock) -> None:
    """Make a block an identity whatever its modulation: every branch's output projection is zero."""
    with torch.no_grad():
        for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if block.cross_view:
            nn.init.zeros_(block.mva_proj.weight)
            nn.init.zeros_(block.mva_proj.bias)


def _indices(keys, prefix: str) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}


def init_from_state(model: nn.Module, state: dict[str, torch.Tensor], src_config: ModelConfig,
                    allow_drop: bool = False, where: str = "checkpoint") -> InitReport:
    """Load a previous stage's weights into a freshly initialised MVDiT (see the module doc)."""
    report = InitReport()
    target = model.state_dict()
    report.dropped = sorted(k for k in state if k not in target)
    if report.dropped and not allow_drop:
        raise StageInitError(
            f"{where}: {len(report.dropped)} tensors have no place in the new model ({report.summary()}). "
            "The new config drops modules the checkpoint trained; if that is intended, pass --init-allow-drop "
            "(train config init_allow_drop: true)")
    bad = [f"{k} {tuple(v.shape)} -> {tuple(target[k].shape)}" for k, v in state.items()
           if k in target and v.shape != target[k].shape]
    if bad:
        raise StageInitError(f"{where}: shapes differ from the new model ({'; '.join(bad[:4])}); a stage "
                             "transition keeps the model's sizes (hidden, heads, patch, text_dim): build the same preset")
    report.added = sorted(k for k in target if k not in state)
    new = {p: sorted(_indices(target, p) - _indices(state, p)) for p in ("base_blocks_t.", "control_blocks_t.")}
    model.load_state_dict({k: state.get(k, v) for k, v in target.items()})
    report.loaded = sum(k in state for k in target)
    for i in new["base_blocks_t."]:
        identity_block(model.base_blocks_t[i])
    for i in new["control_blocks_t."]:   # a copy of its (identity or trained) base block, after_proj zero
        cb = model.control_blocks_t[i]
        if model.base_blocks_t is not None and i < len(model.base_blocks_t):
            cb.load_state_dict(model.base_blocks_t[i].state_dict(), strict=False)
        else:
            identity_block(cb)
        with torch.no_grad():
            cb.after_proj.weight.zero_()
            cb.after_proj.bias.zero_()
    if "bbox_embedder.mean_var" in report.added:
        with torch.no_grad():
            model.bbox_embedder.mean_var[:, 0] = 0.0
            model.bbox_embedder.mean_var[:, 1] = NEW_LOGVAR
    return report
