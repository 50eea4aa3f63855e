"""Reading (and writing) the parity fixtures of tests/data/magicdrivedit (FORMAT.md there), and the authors'
config files read with `ast`, never executed. Shared by the fixture generator (tools/make_magicdrivedit_fixture.py,
run in a scratch venv with the authors' code) and this project's parity tests and converter; nothing here
imports the authors' code or this project's model."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import torch

FP16_ARGS = ("x", "y", "box_latent")  # continuous and large: rounded to fp16 before the forward, stored fp16


def read_config(path: Path) -> dict:
    """Top-level names of a MagicDriveDiT config file, evaluated without executing it (literals, dict(...),
    names defined above, and/or/not, comparisons, subscripts); names it cannot evaluate are left out."""
    env: dict = {}

    def ev(n):
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, (ast.List, ast.Tuple)):
            return (list if isinstance(n, ast.List) else tuple)(ev(e) for e in n.elts)
        if isinstance(n, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(n.keys, n.values)}
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "dict" and not n.args:
            out = {}
            for kw in n.keywords:
                out.update(ev(kw.value) if kw.arg is None else {kw.arg: ev(kw.value)})
            return out
        if isinstance(n, ast.BoolOp):
            vals = [ev(v) for v in n.values]
            return all(vals) and vals[-1] if isinstance(n.op, ast.And) else next((v for v in vals if v), vals[-1])
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand)
            return {ast.USub: lambda: -v, ast.Not: lambda: not v, ast.UAdd: lambda: v}[type(n.op)]()
        if isinstance(n, ast.Compare) and len(n.ops) == 1:
            a, b = ev(n.left), ev(n.comparators[0])
            return {ast.Gt: a > b, ast.Lt: a < b, ast.GtE: a >= b, ast.LtE: a <= b, ast.Eq: a == b,
                    ast.NotEq: a != b}[type(n.ops[0])]
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, ast.Subscript):
            return ev(n.value)[ev(n.slice)]
        raise ValueError(ast.dump(n)[:80])

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                env[node.targets[0].id] = ev(node.value)
            except (ValueError, KeyError, TypeError):
                pass
    return env


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def encode_args(prefix: str, args: dict, stored: int, tensors: dict) -> dict:
    """Store one call's kwargs under prefix/<arg> (bbox members as bbox/<member>); returns the sidecar's
    "args" (tensors: key, shape and dtype in the call, stored dtype, encoding) and "values" (the rest)."""
    flat = {f"bbox/{k}": v for k, v in args.get("bbox", {}).items()}
    flat.update({k: v for k, v in args.items() if torch.is_tensor(v)})
    entries = {}
    for name, t in flat.items():
        e = {"key": f"{prefix}/{name}", "shape": list(t.shape), "dtype": _dtype(t), "encoding": "none"}
        if name == "y":  # tokens >= `tokens` are zero in the call (or never reach the model: see FORMAT.md)
            s, e["encoding"], e["tokens"] = t[:, :, :stored].half(), "y_prefix", stored
        elif name == "maps":  # binary maps, bit-packed along the last axis
            s, e["encoding"] = torch.from_numpy(np.packbits(t.numpy().astype(np.uint8), axis=-1)), "packbits"
        elif name.split("/")[-1] in FP16_ARGS:
            s, e["encoding"] = t.half(), "fp16"
        else:
            s = t
        e["stored_dtype"] = _dtype(s)
        tensors[e["key"]] = s.contiguous()
        entries[name] = e
    values = {k: v for k, v in args.items() if k != "bbox" and not torch.is_tensor(v)}
    return {"args": entries, "values": json.loads(json.dumps(values))}


def decode_args(tensors: dict, entry: dict) -> dict:
    """The call's kwargs back from a case's sidecar entry and the stored tensors (inverse of encode_args)."""
    args: dict = {"bbox": {}} if any(n.startswith("bbox/") for n in entry["args"]) else {}
    for name, e in entry["args"].items():
        s = tensors[e["key"]]
        if e["encoding"] == "y_prefix":
            t = torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"]))
            t[:, :, : e["tokens"]] = s.to(t.dtype)
        elif e["encoding"] == "packbits":
            t = torch.from_numpy(np.unpackbits(s.numpy(), axis=-1, count=e["shape"][-1]).astype(np.float32))
        else:
            t = s.to(getattr(torch, e["dtype"]))
        assert list(t.shape) == e["shape"], (name, t.shape, e["shape"])
        if name.startswith("bbox/"):
            args["bbox"][name[5:]] = t
        else:
            args[name] = t
    for k, v in entry["values"].items():
        args[k] = {int(a): b for a, b in v.items()} if k == "mv_order_map" and v is not None else v
    return args


def load(folder: Path) -> tuple[dict, dict, dict]:
    """(sidecar, weights, tensors) of a fixture folder: what a parity test starts from."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = json.loads((folder / "fixture.json").read_text())
    return meta, load_file(str(folder / "weights.safetensors")), load_file(str(folder / "cases.safetensors"))
