"""Stage transitions (paper Section 5.1): a model of the next stage starts from the weights of
the last one, whatever the two configs add or drop.

    report = init_from_state(model, weights, ModelConfig.from_dict(ckpt_config["model"]))

Blocks are matched by kind: the j-th spatial block of the checkpoint goes to the j-th spatial
block of the model, the j-th temporal one to the j-th temporal one (in the base and in the
ControlNet, with the ControlNet's per-block output projections). So a stage-1 checkpoint
(spatial blocks only, `temporal: false`) fills the spatial blocks of a stage-2 model and the
temporal blocks are new.

A module the new config adds keeps the model's initialisation, which is an identity wherever it
matters: a new block gets zero output projections (attention, cross-attention, MLP). The zero
adaLN table alone would not do: the shared timestep projection t0 is trained by then, so the
gates are not zero. A new ControlNet block is a copy of its base block (as at init) and its
output projection is zero. So the model's output at step 0 equals the checkpoint's.

A tensor of the checkpoint that the model has no place for (the new config drops a module)
is an error unless `allow_drop`; a shape mismatch (another hidden size) always is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from model.blocks import STDiTBlock
from model.config import ModelConfig

# stacks whose index follows the block layout: (key prefix, number of (spatial, temporal) pairs)
_STACKS = (("blocks.", "depth"), ("controlnet.blocks.", "controlnet_depth"),
           ("controlnet.out_projs.", "controlnet_depth"))


class StageInitError(ValueError):
    """The checkpoint does not fit the new model (a user's config mistake, reported as one line)."""


@dataclass
class InitReport:
    loaded: int = 0                                       # tensors taken from the checkpoint
    added: list[str] = field(default_factory=list)        # model tensors the checkpoint lacks (identity init)
    dropped: list[str] = field(default_factory=list)      # checkpoint tensors the model has no place for
    upgraded: list[str] = field(default_factory=list)     # filled for checkpoints older than a module

    def summary(self) -> str:
        def short(keys: list[str]) -> str:  # whole blocks ("blocks.1"), else the top two levels
            heads = sorted({m.group(1) if (m := re.match(r"((?:controlnet\.)?(?:blocks|out_projs)\.\d+)\.", k))
                            else ".".join(k.split(".")[:2]) for k in keys})
            return ", ".join(heads[:8]) + (f", ... ({len(heads)} modules)" if len(heads) > 8 else "")
        parts = [f"{self.loaded} tensors loaded"]
        if self.added:
            parts.append(f"{len(self.added)} new (identity init): {short(self.added)}")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped: {short(self.dropped)}")
        if self.upgraded:
            parts.append(f"{len(self.upgraded)} filled for an older checkpoint")
        return "; ".join(parts)


def _index_map(src: list[bool], dst: list[bool]) -> dict[int, int]:
    """Source block index -> target block index, matching the j-th block of each kind."""
    out, seen = {}, {False: [], True: []}
    for i, t in enumerate(dst):
        seen[t].append(i)
    count = {False: 0, True: 0}
    for i, t in enumerate(src):
        j = count[t]
        count[t] += 1
        if j < len(seen[t]):
            out[i] = seen[t][j]
    return out


def remap_keys(state: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint keys renamed to the model's block layout -> (state, keys with no place)."""
    maps = {prefix: _index_map(src.block_layout(getattr(src, n)), dst.block_layout(getattr(dst, n)))
            for prefix, n in _STACKS}
    out, orphans = {}, []
    for key, value in state.items():
        for prefix, m in maps.items():
            hit = re.match(re.escape(prefix) + r"(\d+)\.(.*)", key)
            if hit:
                i = int(hit.group(1))
                if i in m:
                    out[f"{prefix}{m[i]}.{hit.group(2)}"] = value
                else:
                    orphans.append(key)
                break
        else:
            out[key] = value
    return out, orphans


def upgrade_state(state: dict[str, torch.Tensor]) -> list[str]:
    """In place: checkpoints written before the cross-view gate existed ran cross-view attention
    ungated, i.e. with a gate of one; give them that gate so they compute what they computed."""
    filled = []
    for key in list(state):
        if key.endswith(".cross_view.attn.q.weight"):
            gate = key[: -len("attn.q.weight")] + "gate"
            if gate not in state:
                state[gate] = torch.ones(state[key].shape[0], dtype=state[key].dtype)
                filled.append(gate)
    return filled


def identity_block(block: STDiTBlock) -> None:
    """Make a block an identity whatever its modulation: every branch's output projection is zero."""
    with torch.no_grad():
        for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if block.cross_view is not None:
            nn.init.zeros_(block.cross_view.gate)


def init_from_state(model: nn.Module, state: dict[str, torch.Tensor], src_config: ModelConfig,
                    allow_drop: bool = False, where: str = "checkpoint") -> InitReport:
    """Load a previous stage's weights into a freshly initialised MVDiT (see the module doc)."""
    report = InitReport()
    state = dict(state)
    report.upgraded = upgrade_state(state)
    state, orphans = remap_keys(state, src_config, model.config)
    target = model.state_dict()
    report.dropped = sorted(orphans + [k for k in state if k not in target])
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
    new_blocks = _new_modules(target, state, "blocks.")
    new_cblocks = _new_modules(target, state, "controlnet.blocks.")
    merged = {k: state.get(k, v) for k, v in target.items()}
    model.load_state_dict(merged)
    report.loaded = sum(k in state for k in target)
    for i in new_blocks:
        identity_block(model.blocks[i])
    for i in new_cblocks:  # a ControlNet block starts as a copy of its base block (as at init)
        cb = model.controlnet.blocks[i]
        missing = cb.load_state_dict(model.blocks[i].state_dict(), strict=False).missing_keys
        assert not missing, missing
    return report


def _new_modules(target: dict, state: dict, prefix: str) -> list[int]:
    """Indices of the stack that the checkpoint has no tensor of (whole blocks inserted)."""
    def indices(keys) -> set[int]:
        return {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(indices(target) - indices(state))
