"""The teacher-logits store's format (written by step E, read by step F): safetensors shards plus one JSON index.

Layout of the output folder (step E):

    index.json                   format, teacher, tokenizer fingerprint, lang, top_k, response
                                 field, shard list, teacher accuracy, and per item id: shard,
                                 row, letters, answer, the teacher's pick, whether its top
                                 letters tied, prompt hashes, token rows (tok_start, tok_len),
                                 `on_policy: true` when the response is the student's own
    summary.json                 the teacher's accuracy on the data (n, correct, accuracy), its
                                 letter mass and tied top letters (atkd.scoring.scoring_summary)
    shard-00000.safetensors      per shard (about --shard_size items):
        option_logprobs [items, 26] fp32  teacher log-probs over the item's options (-inf pads)
        target_ids      [rows] int32      the response token each token-level row predicts
        topk_ids        [rows, k] int32   the teacher's top-k token ids at that position
        topk_logprobs   [rows, k] fp32    their log-probs (full vocabulary, T = 1)
        tail_logprob    [rows] fp32       log(1 - sum of the top-k probs), computed as a logsumexp

Items are never one file each and nothing is pickled: shards are read with safetensors only.
Token-level rows exist only when a response field is set (the response has tokens after the
letter); they cover the response tokens after the letter (the letter itself gets option-level KD).

Shards are computed by `atkd.teacher_logits` (the teacher's side); this module only knows how they
are packed, assembled and read. index.json is written last, so a folder with an index.json is
complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import InputError
from .io import read_json, write_json, write_text
from .paths import LOGITS_INDEX, logits_index, logits_summary
from .scoring import scoring_summary

log = logging.getLogger(__name__)

FORMAT = "atkd-teacher-logits/1"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# --------------------------------------------------------------------------- reading

class LogitsStore:
    """A finished store: the index in memory, shards loaded (safetensors) on first use."""

    def __init__(self, store_dir: Path, index: dict):
        self.dir = store_dir
        self.index = index
        self.items: dict[str, dict] = index["items"]
        self._shards: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, store_dir: str | Path) -> "LogitsStore":
        store_dir = Path(store_dir)
        if not store_dir.is_dir():
            raise InputError(store_dir, "teacher logits folder not found")
        path = logits_index(store_dir)
        if not path.is_file():
            raise InputError(store_dir, f"no {LOGITS_INDEX}: not a teacher-logits folder, or generate_logits.py "
                                        "did not finish (run it again to complete it)")
        index = read_json(path)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(path, f"not a teacher-logits index (expected format {FORMAT!r})")
        for shard in index["shards"]:
            if not (store_dir / shard).is_file():
                raise InputError(store_dir / shard, "shard listed in the index is missing")
        return cls(store_dir, index)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.index["tokenizer_fingerprint"]

    @property
    def response_field(self) -> str | None:
        return self.index.get("response_field")

    @property
    def lang(self) -> str:
        return self.index["lang"]

    def shard(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._shards:
            from safetensors.torch import load_file

            self._shards[name] = load_file(str(self.dir / name))
        return self._shards[name]

    def option_logprobs(self, key: str) -> torch.Tensor:
        """The teacher's log-probs over the item's options, in letter order (fp32)."""
        meta = self.items[key]
        return self.shard(meta["shard"])["option_logprobs"][meta["row"], : len(meta["letters"])].clone()

    def token_level(self, key: str):
        """(target_ids, topk_ids, topk_logprobs, tail_logprob) of the item's later response tokens, or None."""
        meta = self.items[key]
        if not meta.get("tok_len"):
            return None
        s = self.shard(meta["shard"])
        a, b = meta["tok_start"], meta["tok_start"] + meta["tok_len"]
        return (s["target_ids"][a:b].long(), s["topk_ids"][a:b].long(), s["topk_logprobs"][a:b].clone(),
                s["tail_logprob"][a:b].clone())


# --------------------------------------------------------------------------- writing

def pack(option_rows, per_item_tokens, items, top_k) -> tuple[dict[str, torch.Tensor], list[dict]]:
    ids, logp, tail, targets = [], [], [], []
    start = 0
    for row, (entry, tokens) in enumerate(zip(items, per_item_tokens)):
        entry["row"] = row
        entry["tok_start"], entry["tok_len"] = start, 0
        if tokens is not None:
            ids.append(tokens[0])
            logp.append(tokens[1])
            tail.append(tokens[2])
            targets.append(tokens[3])
            entry["tok_len"] = int(tokens[0].shape[0])
            start += entry["tok_len"]
    tensors = {
        "option_logprobs": option_rows.contiguous(),
        "topk_ids": torch.cat(ids) if ids else torch.zeros((0, top_k), dtype=torch.int32),
        "topk_logprobs": torch.cat(logp) if logp else torch.zeros((0, top_k)),
        "tail_logprob": torch.cat(tail) if tail else torch.zeros((0,)),
        "target_ids": torch.cat(targets) if targets else torch.zeros((0,), dtype=torch.int32),
    }
    return {k: v.contiguous() for k, v in tensors.items()}, items


def assemble(output_dir: Path, parts_dir: Path, records: list[dict], header: dict) -> dict:
    """Move the shards into place and write index.json (last) and summary.json.

    `header`: teacher_model, tokenizer_fingerprint, vocab_size, lang, top_k, response_field.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    index_file = logits_index(output_dir)
    if index_file.exists():
        index_file.unlink()  # the folder is incomplete until the new index lands
    names = [r["file"] for r in records]
    for stale in output_dir.glob("shard-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    items: dict[str, dict] = {}
    for r in records:
        os.replace(parts_dir / r["file"], output_dir / r["file"])
        for entry in r["items"]:
            entry = dict(entry)
            key = entry.pop("id")
            entry["shard"] = r["file"]
            items[key] = entry
    n = len(items)
    correct = sum(1 for e in items.values() if e["correct"])
    summary = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
               "mean_letter_mass": sum(e["letter_mass"] for e in items.values()) / n if n else 0.0,
               "token_level_items": sum(1 for e in items.values() if e["tok_len"]),
               "on_policy_items": sum(1 for e in items.values() if e.get("on_policy")),
               "shards": len(names),
               **scoring_summary([e["letter_mass"] for e in items.values()], [e.get("tied") for e in items.values()],
                                 header.get("teacher_model") or "the teacher")}
    if header.get("served"):  # a served teacher (atkd.served_teacher): top-k asked, letters outside it, token level
        summary["served"] = header["served"]
    index = {"format": FORMAT, **header, "shards": names, "summary": summary, "items": items}
    write_json(logits_summary(output_dir), summary)
    # index.json last: its presence marks the store complete.
    _write_index(index_file, index)
    return index


def _write_index(path: Path, index: dict) -> None:
    """Pretty header, then one line per item (a 10k-item index stays a few MB and diffable)."""
    head = json.dumps({k: v for k, v in index.items() if k != "items"}, ensure_ascii=False, indent=1)
    body = ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                      for k, v in index["items"].items())
    write_text(path, head[:-2] + ',\n "items": {\n' + body + "\n }\n}\n")
