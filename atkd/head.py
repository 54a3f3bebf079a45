"""The output head applied only where a loss or a stored logit is read: used by steps A/D/G (scoring), E and F.

`HeadAtPositions` runs a causal LM's body, keeps the hidden states at the requested positions and
applies the output head there only: N x V logits, never B x L x V for the whole prompt. The
teacher's stored logits (step E), the student's loss (step F) and the answer-letter scores
(`atkd.scoring`) all come through it.

The head is the model's own output-embedding module (called, not re-implemented, so sharded
heads gather their weights through their own hooks) plus what a family's forward does around
it, `HeadScaling`. Families multiply, divide or soft-cap their logits in the CausalLM's forward,
outside the module; `head_scaling` knows those of transformers' families (and of remote-code
MiniCPM). Whatever it misses is caught at load: `verify_head` compares the head's output with
`model(...).logits` on a short probe and refuses the model (an `InputError`) on a mismatch, so
no logit is stored or trained on through a head that disagrees with the model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

PROBE_TOKENS = 8  # length of the sequence `verify_head` runs through both paths
# Allowed difference between the head's logits and the model's, in units of the dtype's epsilon
# times the largest logit: a few roundings (different matmul shapes accumulate in another order);
# a missed scale or soft-cap is off by far more than that.
TOLERANCE_EPS = 4
MIN_TOLERANCE = 1e-4  # absolute floor (logits units), for models whose logits are all near 0


@dataclass(frozen=True)
class HeadScaling:
    """What a family's forward does around its output-embedding module, in this order:

    logits = head(hidden / hidden_divisor) * multiplier / divisor, then soft-capped:
    cap * tanh(logits / cap), in float32 when `softcap_fp32`.
    Each step is skipped at its neutral value, so the operations are the model's own (same rounding).
    """

    hidden_divisor: float = 1.0  # MiniCPM: hidden_size / dim_model_base, applied before the head
    multiplier: float = 1.0  # Cohere logit_scale, Falcon-H1 lm_head_multiplier, HyperCLOVA X, Muse
    divisor: float = 1.0  # Granite logits_scaling
    softcap: float | None = None  # Gemma 2/3/4, VaultGemma, nanochat, Recurrent Gemma, xLSTM, ...
    softcap_fp32: bool = False  # Beam, Inkling2 and xLSTM upcast before the soft-cap

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden / self.hidden_divisor if self.hidden_divisor != 1.0 else hidden

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap:
            if self.softcap_fp32:
                logits = logits.float()
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def text_config(model):
    """The language model's config (the text part of a multimodal one)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def head_scaling(model) -> HeadScaling:
    """The scaling `model`'s forward applies around its output embedding (see `HeadScaling`).

    Decided by model_type because one config name means different things: Granite divides its
    logits by `logits_scaling`, HyperCLOVA X multiplies them by it, MiniCPM3 divides the hidden
    state by it; MPT configs carry a `logit_scale` its forward ignores.
    """
    cfg = text_config(model)
    kind = getattr(cfg, "model_type", "") or ""
    outer = getattr(model.config, "model_type", "") or ""
    hidden_divisor, multiplier, divisor = 1.0, 1.0, 1.0
    if kind.startswith("cohere"):
        multiplier = getattr(cfg, "logit_scale", None) or 1.0
    elif kind == "falcon_h1":
        multiplier = getattr(cfg, "lm_head_multiplier", None) or 1.0
    elif kind.startswith("granite"):
        divisor = getattr(cfg, "logits_scaling", None) or 1.0
    elif kind.startswith("hyperclovax"):
        multiplier = getattr(cfg, "logits_scaling", None) or 1.0
    elif kind.startswith("minicpm") and getattr(cfg, "dim_model_base", None):
        hidden_divisor = cfg.hidden_size / cfg.dim_model_base
    elif kind.startswith("muse_"):
        multiplier = getattr(cfg, "output_multiplier", None) or 1.0
    softcap = (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None)  # Recurrent Gemma
               or getattr(cfg, "output_logit_soft_cap", None))  # xLSTM
    upcast_first = ("beam", "inkling2", "xlstm")  # their forwards call .float() before the soft-cap
    return HeadScaling(hidden_divisor=float(hidden_divisor), multiplier=float(multiplier), divisor=float(divisor),
                       softcap=float(softcap) if softcap else None,
                       softcap_fp32=kind.startswith(upcast_first) or outer.startswith(upcast_first))


class HeadAtPositions(nn.Module):
    """A causal LM whose forward returns logits only at the requested (row, col) positions.

    The logits cover the first `n_vocab` rows of the head (the tokenizer's real vocabulary): rows a
    checkpoint pads its embedding with are never part of the student's distribution. The output
    embedding is applied as a module, `head(hidden)`, then sliced: DeepSpeed ZeRO-3 and FSDP
    gather a sharded head's weight in that module's own forward hooks, which reading
    `head.weight` directly would bypass. Building one verifies the head against the model's
    own logits once per model (`verify_head`).
    """

    def __init__(self, model: nn.Module, n_vocab: int, verify: bool = True):
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        self.n_vocab = min(int(n_vocab), head.weight.shape[0])
        self.scaling = head_scaling(model)
        if verify and model not in _VERIFIED:
            verify_head(self)
            _VERIFIED.add(model)

    def forward(self, input_ids, attention_mask, position_ids, rows, cols):
        return self.logits(self.hidden_at(input_ids, attention_mask, position_ids, rows, cols))

    def hidden_at(self, input_ids, attention_mask, position_ids, rows, cols) -> torch.Tensor:
        """The body's last hidden states at (rows[i], cols[i]): N x H."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[rows.to(hidden.device), cols.to(hidden.device)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """N x n_vocab logits of N hidden states, as the model's forward computes them (its dtype)."""
        head = self.model.get_output_embeddings()
        # A model spread over GPUs (device_map) ends its body on the last GPU and may keep the head
        # on another: the hidden states move to the head.
        hidden = hidden.to(_device_of(head, hidden.device))
        return self.scaling.apply(head(self.scaling.head_input(hidden))[..., : self.n_vocab])

    def token_logits_fp32(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """N x K float32 logits of the K `token_ids` only: hidden states and head rows upcast first.

        In bf16 the logits of two letters 0.1 apart at magnitude 20 round to the same value (the
        spacing there is 0.125); K rows in float32 cost nothing next to the V-row head. Reads the
        head's weight rows directly: for scoring and E (whole models), not for a sharded head. A
        head that is not a plain linear layer is applied as a module and its output upcast.
        """
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if type(head) is not nn.Linear or weight is None or not weight.is_floating_point():
            return self.logits(hidden)[..., token_ids].float()
        ids = token_ids.to(weight.device)
        bias = head.bias[ids].float() if head.bias is not None else None
        h = self.scaling.head_input(hidden.to(weight.device).float())
        return self.scaling.apply(F.linear(h, weight[ids].float(), bias)).float()


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module's parameters live (`default` for a module without any, or sharded to nothing)."""
    param = next(module.parameters(), None)
    return param.device if param is not None and param.device.type != "meta" else default


# Models whose head passed `verify_head` (weakly held: a model's head code does not change while it lives).
_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def probe_ids(model, n_vocab: int, n: int = PROBE_TOKENS) -> list[int]:
    """`n` token ids from the middle of the vocabulary, avoiding every id the config names
    (bos, pad, image tokens: a multimodal model would expect image features for those)."""
    named = set()
    for cfg in {id(c): c for c in (model.config, text_config(model))}.values():
        for key, value in cfg.to_dict().items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                named.update(value if isinstance(value, list) else [value])
    return [i for i in range(n_vocab // 2, n_vocab) if i not in named][:n]


@torch.no_grad()
def verify_head(head: HeadAtPositions) -> float:
    """The largest difference between `head`'s logits and `model(...).logits` on a short probe.

    Raises an `InputError` naming the model folder when it exceeds the tolerance: the family's
    output head (a scale or soft-cap in its forward) is not reproduced. Runs in eval mode (no
    dropout) and restores the model's mode.
    """
    model = head.model
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([probe_ids(model, head.n_vocab)], device=device)
        n = ids.shape[1]
        mask = torch.ones_like(ids)
        positions = torch.arange(n, device=device).unsqueeze(0)
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        want = want[0, :, : head.n_vocab].float()
        got = head(ids, mask, positions, torch.zeros(n, dtype=torch.long, device=device),
                   torch.arange(n, device=device)).float()
    finally:
        model.train(was_training)
    diff = (got - want).abs().max().item()
    dtype = model.get_output_embeddings().weight.dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    tolerance = max(MIN_TOLERANCE, TOLERANCE_EPS * eps * want.abs().max().item())
    if not diff <= tolerance:  # NaN fails too
        folder = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or None
        raise InputError(folder, f"the output head of this model family ({type(model).__name__}, model_type "
                                 f"{getattr(model.config, 'model_type', '?')!r}) is not reproduced: AT-KD's head "
                                 f"logits differ from the model's own by up to {diff:.4g} on a probe (tolerance "
                                 f"{tolerance:.2g}), so its scores and logits would be wrong; please report the "
                                 f"family (atkd/head.py: head_scaling)")
    return diff
