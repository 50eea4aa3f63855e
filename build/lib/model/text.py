"""Text condition path: T5 encoder from a local folder + a caption-embedding cache.

Real runs use T5-v1.1-XXL (4096-d states, max length 300 as Open-Sora 1.2 / MagicDrive-V2);
tests use `write_tiny_t5` (random tiny T5 + byte-level ByT5 tokenizer: no vocabulary download).
Each distinct caption is encoded once; the trainer reads the cache, keyed by sha256(caption).

    python -m model.text tiny DIR                                   # write a tiny random T5 folder
    python -m model.text build --t5 DIR --captions CAPTIONS.parquet|SHARD_DIR --out CACHE_DIR

What the authors' model reads (their encode_text): the T5 states of the batch's longest caption
+ 1 tokens for every caption, padding states included (T5 computes a state at every position;
the model never masks them). So the cache stores, for every caption, the states of its first
`stored` = min(max_length, longest caption of the cache + 1) positions, and the token count;
`get` returns (stored, D) states and the mask of the real tokens. It also holds the object class
names and "" (the class tokens and base_token of a model trained from scratch:
`prepare_text_embeddings`).

Cache layout (CACHE_DIR): index.json {"meta": {..., "stored"}, "entries": {hash: file},
"lengths": {hash: tokens}} and shard files emb-NNNNN.safetensors holding, per caption hash, its
(stored, D) states.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.contract import schema
from pipeline.contract.cli import ArgumentParser, BadInput, InputNotFound, UnknownName, entry

DEFAULT_MAX_LENGTH = 300
INDEX_FILE = "index.json"


def caption_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_tiny_t5(folder: str | os.PathLike, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                  seed: int = 0, d_kv: int | None = None) -> Path:
    """A tiny random T5 encoder + ByT5 tokenizer saved with save_pretrained (safetensors)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = ByT5Tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_kv or d_model // num_heads,
                   d_ff=2 * d_model if d_kv is None else 2 * d_kv * num_heads,
                   num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    T5EncoderModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class T5TextEncoder:
    """T5 encoder states for captions, loaded only from a local folder (no hub access)."""

    def __init__(self, folder: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer, T5EncoderModel
        if not Path(folder, "config.json").exists():
            raise InputNotFound(f"{folder}: no T5 config.json; point --t5 at a save_pretrained folder "
                                "(e.g. google/t5-v1_1-xxl downloaded beforehand, or `python -m model.text tiny DIR`)")
        self.folder, self.max_length, self.device = str(folder), max_length, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(self.folder, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> states (B, max_length, D) at every position (padding ones too, as the authors' T5 gives
        them), mask (B, max_length) bool: True = a real token."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.float(), mask.bool()

    def token_counts(self, texts: list[str]) -> list[int]:
        tok = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in tok.input_ids]


class TextEmbeddingCache:
    """Caption states keyed by caption_hash, in safetensors shards under one folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._index = {"meta": {}, "entries": {}}
        if (self.path / INDEX_FILE).exists():
            self._index = json.loads((self.path / INDEX_FILE).read_text())
        self._handles: dict[str, object] = {}

    @property
    def meta(self) -> dict:
        return self._index["meta"]

    def __len__(self) -> int:
        return len(self._index["entries"])

    def __contains__(self, text: str) -> bool:
        return caption_hash(text) in self._index["entries"]

    def get(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> states (stored, D) float32, mask (stored,) bool (True = a real token)."""
        h = caption_hash(text)
        file = self._index["entries"].get(h)
        if file is None:
            raise UnknownName(f"caption {text[:60]!r}... (sha256 {h[:12]}) is not in the text cache {self.path}; "
                              "rebuild it with `python -m model.text build --captions ... --out "
                              f"{self.path}`")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        if "stored" not in self.meta:
            raise BadInput(f"text cache {self.path} was built by an older version (unpadded states only); rebuild "
                           "it with `python -m model.text build`")
        states = self._handles[file].get_tensor(h).float()                      # (stored, D)
        mask = torch.arange(states.shape[0]) < int(self._index["lengths"][h])
        return states, mask

    def get_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs, masks = zip(*(self.get(t) for t in texts))
        return torch.stack(embs), torch.stack(masks)

    def build(self, texts, encoder: T5TextEncoder, batch_size: int = 16, shard_size: int = 1024,
              dtype: torch.dtype = torch.float16, progress: bool = True) -> int:
        """Encode each distinct caption not yet cached, and the class names and "" (sorted by hash,
        so the files are deterministic); returns how many were added."""
        texts = list(texts) + list(schema.OBJECT_CLASSES) + [""]
        by_hash = {caption_hash(t): t for t in texts}
        todo = sorted(h for h in by_hash if h not in self._index["entries"])
        counts = dict(zip(todo, encoder.token_counts([by_hash[h] for h in todo]))) if todo else {}
        stored = min(encoder.max_length, max(counts.values(), default=0) + 1)
        meta = {"max_length": encoder.max_length, "dim": encoder.dim, "t5": os.path.basename(encoder.folder.rstrip("/")),
                "dtype": str(dtype).replace("torch.", ""), "stored": max(stored, int(self.meta.get("stored", 0)))}
        if self.meta and {k: self.meta.get(k) for k in ("max_length", "dim")} != \
                {k: meta[k] for k in ("max_length", "dim")}:
            raise BadInput(f"text cache {self.path} was built with {self.meta}; this encoder gives {meta}. "
                           "Use a new --out folder.")
        if self._index["entries"] and meta["stored"] > int(self.meta.get("stored", 0)):
            raise BadInput(f"text cache {self.path} stores {self.meta.get('stored')} T5 states per caption; the new "
                           f"captions need {meta['stored']} (longest + 1). Build a new cache (--out NEW) over all captions")
        stored = meta["stored"]
        self.path.mkdir(parents=True, exist_ok=True)
        n_files = len(set(self._index["entries"].values()))
        bar = tqdm(total=len(todo), desc="T5 captions", disable=not progress)
        for s in range(0, len(todo), shard_size):
            chunk, tensors = todo[s:s + shard_size], {}
            for b in range(0, len(chunk), batch_size):
                hs = chunk[b:b + batch_size]
                states, _ = encoder.encode([by_hash[h] for h in hs])
                for h, st in zip(hs, states):
                    tensors[h] = st[:stored].to(dtype).contiguous().cpu()
                bar.update(len(hs))
            name = f"emb-{n_files:05d}.safetensors"
            n_files += 1
            save_file(tensors, str(self.path / name))
            self._index["entries"].update({h: name for h in chunk})
        bar.close()
        self._index["meta"] = meta
        self._index.setdefault("lengths", {}).update(counts)
        tmp = self.path / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        os.replace(tmp, self.path / INDEX_FILE)
        return len(todo)


@torch.no_grad()
def prepare_text_embeddings(model, embed) -> None:
    """The authors' prepare_text_embedding for a model trained from scratch: each box class token =
    the mean over its real tokens of y_proj(T5(class name)), base_token = y_proj(T5(""))'s token.
    embed(texts) -> (states (B, L, C), mask (B, L)) (train.train.TextSource.embed)."""
    names = list(schema.OBJECT_CLASSES)
    states, mask = embed(names + [""])
    dev = model.base_token.device
    y = model.y_embedder.y_proj(states.to(dev, model.dtype))                  # (B, L, D)
    tok = [y[i, : int(mask[i].sum())].float().mean(0) for i in range(len(names) + 1)]
    model.bbox_embedder._class_tokens.copy_(torch.stack(tok[:-1]))
    model.base_token.copy_(tok[-1])


def read_captions(source: str) -> list[str]:
    """Captions from a caption table (.parquet, column `text`) or every caption.txt of the
    webdataset shards under a folder."""
    if source.endswith(".parquet"):
        import pyarrow.parquet as pq
        if not os.path.exists(source):
            raise InputNotFound(f"--captions {source}: no such caption table")
        table = pq.read_table(source, columns=["text"])
        return [t for t in table.column("text").to_pylist() if t is not None]
    if os.path.isdir(source):
        from pipeline.contract.shardio import iter_shard
        tars = sorted(glob.glob(os.path.join(source, "**", "*.tar"), recursive=True))
        if not tars:
            raise InputNotFound(f"{source}: no *.tar shards below this folder")
        out = []
        for tar in tqdm(tars, desc="reading captions"):
            for _key, members in iter_shard(tar):
                if "caption.txt" in members:
                    out.append(members["caption.txt"].decode("utf-8"))
        return out
    raise BadInput(f"--captions {source!r}: give a .parquet caption table or a folder of shards")


@entry
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m model.text", description=(
        "Text condition tools. `tiny DIR` writes a tiny random T5 encoder + byte tokenizer (tests, "
        "smoke runs). `build` encodes every distinct caption once into a safetensors cache keyed by "
        "sha256(caption), so training never runs T5 per step."))
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="write a tiny random T5 folder")
    t.add_argument("folder")
    b = sub.add_parser("build", help="encode captions into a cache folder")
    b.add_argument("--t5", required=True, help="local T5 folder (save_pretrained layout)")
    b.add_argument("--captions", required=True, help="caption table .parquet (column text) or shard folder")
    b.add_argument("--out", required=True, help="cache folder (created; existing entries are kept)")
    b.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="T5 token length (default 300)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage dtype of the states")
    args = ap.parse_args(argv)
    if args.cmd == "tiny":
        print(write_tiny_t5(args.folder))
        return 0
    texts = read_captions(args.captions)
    enc = T5TextEncoder(args.t5, max_length=args.max_length, device=args.device)
    added = TextEmbeddingCache(args.out).build(texts, enc, batch_size=args.batch_size,
                                               dtype=getattr(torch, args.dtype))
    print(f"{len(texts)} captions, {len(set(texts))} distinct, {added} newly encoded -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
