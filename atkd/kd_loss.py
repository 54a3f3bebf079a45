"""The distillation loss of train.py (step F).

Loss over one gradient-accumulation window (all its micro-batches, on all processes):

    alpha_ce * CE_sum / n_ce  +  (1 - alpha_ce) * T^2 * KD_sum / n_kd

`alpha_ce` is the weight of the CE term (the seed's documentation; the reference weighted the KD
term with it). CE covers response tokens only; `n_ce` and `n_kd` count the tokens of the whole
window, so splitting a batch into micro-batches does not change the gradient.

Two kinds of KD target:
- option level: the teacher's log-probabilities over the item's option letters at the answer
  position, compared with the student's logits for its *own* letter tokens there, both
  renormalised over the options and softened by T (exact: softmax(z/T) restricted to the options);
- token level: per response token, the teacher's top-k log-probabilities plus one *tail bucket*
  holding the rest of the probability mass q. The student's full-vocabulary distribution is folded
  into the same k+1 buckets (its own log-probs at the teacher's top-k ids, and its own tail mass).
  Temperature then softens only the relative shape among the k top-k buckets; the tail keeps its
  untempered mass, on both sides (`temper_buckets`):

      buckets_T = [(1 - q) * softmax(log p_topk / T), q]

  Why not soften all k+1 buckets alike: the tail is not one token but the sum of V - k of them.
  Tempered as if it were one, its mass is raised to the power 1/T (0.01 -> 0.1 at T = 2, before
  renormalisation), and the student is pushed to keep ten times the teacher's mass outside the
  teacher's top-k. With the tail untempered, forward KL splits exactly into
  KL(Bernoulli(q_t) || Bernoulli(q_s)) + (1 - q_t) * KL(shape_t,T || shape_s,T): the tail's total is
  matched at its true value, T softens only what it is meant to (the top-k shape), the divergence is
  zero when the student equals the teacher, and the gradient reaches the student through both parts
  (its top-k mass and its tail mass). At T = 1 this is the exact KL between the bucketed distributions.
  Note that `combined_loss` multiplies KD by T^2 (the usual compensation for softened logits), which
  also weights the untempered tail term by T^2.

On-policy items (the student's own sampled response, `atkd.on_policy`): the same terms, but the
token-level rows of the student's text use their own divergence (`on_policy_kind`, train.py's
`--on_policy_kd_loss`, reverse KL by default as in GKD/MiniLLM) and carry no CE (`train_data.collate`
sets their CE weight to 0 and reads CE at the answer position towards the labelled letter).

The logits come from `atkd.head.HeadAtPositions` (the output head applied at response positions
only: N_response x V, never B x L x V for the prompt). `response_loss_sums` reads every term (CE,
option KD, token KD) from one `gathered_logp` pass whose backward recomputes the softmax, so
distillation holds no more N x V memory than CE-only training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
_TEACHER_FLOOR = -1e4  # log-prob floor: keeps reverse KL / JSD finite where the teacher says exp(-inf)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the softmaxes; fp32/fp64 stay as they are (tests use fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soften(logp: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logp / T) over the last dim; entries outside `mask` get -inf."""
    z = logp / temperature
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def _kl(a_logp: torch.Tensor, b_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row over the entries in `mask` (masked entries filled first: no NaN gradients)."""
    a = a_logp.masked_fill(~mask, 0.0)
    b = b_logp.masked_fill(~mask, 0.0)
    return (a.exp() * (a - b)).masked_fill(~mask, 0.0).sum(-1)


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence between two log-distributions on the same support (last dim).

    forward_kl = KL(teacher || student) (mode covering), reverse_kl = KL(student || teacher)
    (mode seeking), jsd = 0.5 KL(t || m) + 0.5 KL(s || m) with m = (t + s) / 2.
    """
    if mask is None:
        mask = torch.ones_like(student_logp, dtype=torch.bool)
    t = teacher_logp.clamp(min=_TEACHER_FLOOR)
    if kind == "forward_kl":
        return _kl(t, student_logp, mask)
    if kind == "reverse_kl":
        return _kl(student_logp, t, mask)
    if kind == "jsd":
        t0, s0 = t.masked_fill(~mask, 0.0), student_logp.masked_fill(~mask, 0.0)
        m = torch.logaddexp(t0, s0) - math.log(2.0)
        return 0.5 * _kl(t0, m, mask) + 0.5 * _kl(s0, m, mask)
    raise ValueError(f"unknown KD loss {kind!r}; choose one of {', '.join(KD_KINDS)}")


def option_kd(student_letter_logits: torch.Tensor, teacher_option_logp: torch.Tensor, mask: torch.Tensor,
              temperature: float, kind: str) -> torch.Tensor:
    """Per-item KD over the option letters (n x 26 padded; `mask` marks each item's real options)."""
    s = soften(_upcast(student_letter_logits), temperature, mask)
    t = soften(teacher_option_logp.to(s.dtype).clamp(min=_TEACHER_FLOOR), temperature, mask)
    return divergence(t, s, kind, mask)


class _GatheredLogProbs(torch.autograd.Function):
    """log softmax(z) at `ids` (N x m), then, with `tail_cols` > 0, the log of the probability mass
    outside the last `tail_cols` ids of each row (the tail bucket).

    Only z is kept for backward, where the softmax is recomputed: the KD terms add no N x V tensor
    to what training holds between forward and backward (autograd through log_softmax, gather and
    scatter would keep three). d/dz_v of log p_i is [v = i] - p_v; of the tail's log mass it is
    [v outside the ids] p_v / q_tail - p_v.
    """

    @staticmethod
    def forward(ctx, z, ids, tail_cols: int):
        zf = _upcast(z)
        lse = torch.logsumexp(zf, dim=-1, keepdim=True)
        out = zf.gather(-1, ids) - lse
        if tail_cols:
            rest = zf.scatter(-1, ids[:, -tail_cols:], float("-inf"))
            out = torch.cat([out, torch.logsumexp(rest, dim=-1, keepdim=True) - lse], dim=-1)
            del rest
        ctx.save_for_backward(z, ids, lse, out)
        ctx.tail_cols = tail_cols
        return out

    @staticmethod
    def backward(ctx, g):
        z, ids, lse, out = ctx.saved_tensors
        k = ctx.tail_cols
        zf = _upcast(z)
        g = g.to(lse.dtype)
        grad = (zf - lse).exp_().mul_(-g.sum(-1, keepdim=True))  # -p_v * (sum of all output grads)
        if k:
            tail_lse = lse + out[:, -1:]  # log of the tail's unnormalised mass
            tail_lse = torch.where(torch.isfinite(tail_lse), tail_lse, torch.full_like(tail_lse, float("inf")))
            share = (zf - tail_lse).exp_().scatter_(-1, ids[:, -k:], 0.0)  # p_v / q_tail outside the top-k
            grad.add_(share.mul_(g[:, -1:]))
            del share
        grad.scatter_add_(-1, ids, g[:, : ids.shape[1]])
        return grad.to(z.dtype), None, None


def gathered_logp(logits: torch.Tensor, ids: torch.Tensor, tail_cols: int = 0) -> torch.Tensor:
    """Full-vocabulary log-probs at `ids` (N x m) [+ the tail outside the last `tail_cols` ids], memory-lean."""
    return _GatheredLogProbs.apply(logits, ids, tail_cols)


def bucket_logp(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary distribution folded into k+1 buckets: log p of each top-k id, then the tail."""
    return gathered_logp(logits, topk_ids, topk_ids.shape[-1])


def temper_buckets(buckets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log [(1 - q) * softmax(log p_topk / T), q] of k+1 log-buckets (the last is the tail q).

    1 - q is the top-k buckets' own total (a logsumexp: exact for the student, whose buckets come
    from one distribution, and accurate for the teacher's stored fp32 values); the result is
    renormalised, so a teacher whose stored top-k and tail disagree by rounding still sums to one.
    """
    head, tail = buckets[..., :-1], buckets[..., -1:]
    head_mass = torch.logsumexp(head, dim=-1, keepdim=True)
    return torch.log_softmax(torch.cat([head_mass + soften(head, temperature), tail], dim=-1), dim=-1)


def bucket_kd(student_buckets: torch.Tensor, teacher_topk_logp: torch.Tensor, teacher_tail_logp: torch.Tensor,
              temperature: float, kind: str) -> torch.Tensor:
    """Per-token KD between (k+1)-bucket distributions, T softening the top-k shape only (see module doc)."""
    s = temper_buckets(student_buckets, temperature)
    t_buckets = torch.cat([teacher_topk_logp, teacher_tail_logp.unsqueeze(-1)], dim=-1).to(s.dtype)
    t = temper_buckets(t_buckets.clamp(min=_TEACHER_FLOOR), temperature)
    return divergence(t, s, kind)


def token_kd(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_topk_logp: torch.Tensor,
             teacher_tail_logp: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """Per-token KD on the teacher's top-k ids plus the tail bucket (n x V logits, n x k ids)."""
    return bucket_kd(bucket_logp(student_logits, topk_ids), teacher_topk_logp, teacher_tail_logp, temperature, kind)


def response_loss_sums(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float,
                       kind: str, on_policy_kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted CE sum, weighted KD sum) of a micro-batch from the logits at its response positions.

    `batch` is `atkd.train_data.collate`'s output. One gathered log-prob pass serves all three terms:
    per row the target, the 26 letter slots and the k top-k slots (rows without letters or top-k
    repeat the target there; those columns carry no loss). Token-level rows of the student's own
    responses (`tok_on_policy`) use `on_policy_kind` (default: `kind`), every other KD term `kind`.
    """
    targets = batch["targets"]
    k = batch["tok_ids"].shape[1]
    letters = targets[:, None].repeat(1, batch["opt_ids"].shape[1])
    letters[batch["opt_index"]] = batch["opt_ids"]
    topk = targets[:, None].repeat(1, k)
    has_tokens = batch["tok_index"].numel() > 0
    if has_tokens:
        topk[batch["tok_index"]] = batch["tok_ids"]
    ids = torch.cat([targets[:, None], letters, topk], dim=-1)
    logp = gathered_logp(logits, ids, k if has_tokens else 0)
    ce = -(logp[:, 0] * batch["weights"].to(logp.dtype)).sum()
    n_letters = letters.shape[1]
    # Log-probs work as option logits: softmax over the options cancels the shared normaliser.
    letter_logp = logp[batch["opt_index"], 1:1 + n_letters]
    kd = (option_kd(letter_logp, batch["opt_teacher"], batch["opt_mask"], temperature, kind)
          * batch["opt_weight"].to(logp.dtype)).sum()
    if has_tokens:
        rows = logp[batch["tok_index"]]
        buckets = torch.cat([rows[:, 1 + n_letters:1 + n_letters + k], rows[:, -1:]], dim=-1)
        per_token = token_divergences(buckets, batch, temperature, kind, on_policy_kind)
        kd = kd + (per_token * batch["tok_weight"].to(logp.dtype)).sum()
    return ce, kd


def token_divergences(buckets: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float, kind: str,
                      on_policy_kind: str | None) -> torch.Tensor:
    """Per token-level row: `kind` on the teacher's text, `on_policy_kind` on the student's own (`tok_on_policy`)."""
    per_token = bucket_kd(buckets, batch["tok_logp"], batch["tok_tail"], temperature, kind)
    own = batch.get("tok_on_policy")
    if on_policy_kind is None or on_policy_kind == kind or own is None or not bool(own.any()):
        return per_token
    on = bucket_kd(buckets[own], batch["tok_logp"][own], batch["tok_tail"][own], temperature, on_policy_kind)
    return torch.where(own, _spread(on, own, per_token), per_token)


def _spread(values: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` (one per True of `mask`) placed at the True positions of a tensor shaped like `like`."""
    out = torch.zeros_like(like)
    return out.index_put((mask.nonzero(as_tuple=True)[0],), values)


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of weighted token cross-entropies over the full (real) vocabulary."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    per_token = F.cross_entropy(_upcast(logits), targets, reduction="none")
    return (per_token * weights.to(per_token.dtype)).sum()


def combined_loss(ce: torch.Tensor, kd: torch.Tensor, n_ce, n_kd, alpha_ce: float, temperature: float) -> torch.Tensor:
    """alpha_ce * CE + (1 - alpha_ce) * T^2 * KD, each sum divided by its window token count."""
    n_ce = max(float(n_ce), 1.0)
    n_kd = max(float(n_kd), 1.0)
    return alpha_ce * ce / n_ce + (1.0 - alpha_ce) * temperature ** 2 * kd / n_kd
