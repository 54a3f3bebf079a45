"""The output head applied only where a loss or a stored logit is read: used by steps E and F.

`HeadAtPositions` runs a causal LM's body, keeps the hidden states at the requested positions and
applies the output head there only: N x V logits, never B x L x V for the whole prompt. The
teacher's stored logits (step E) and the student's loss (step F) both come through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadAtPositions(nn.Module):
    """A causal LM whose forward returns logits only at the requested (row, col) positions.

    The logits cover the first `n_vocab` rows of the head (the tokenizer's real vocabulary): rows a
    checkpoint pads its embedding with are never part of the student's distribution.
    """

    def __init__(self, model: nn.Module, n_vocab: int):
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        self.n_vocab = min(int(n_vocab), head.weight.shape[0])
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides its logits

    def forward(self, input_ids, attention_mask, position_ids, rows, cols):
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # A model spread over GPUs (device_map) ends its body on the last GPU and may keep the head
        # on another: index where the hidden states are, then multiply where the head is.
        head = self.model.get_output_embeddings()
        picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # N x H: only where a loss is computed
        picked = picked.to(head.weight.device)
        bias = head.bias[: self.n_vocab] if getattr(head, "bias", None) is not None else None
        logits = F.linear(picked, head.weight[: self.n_vocab], bias)
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
