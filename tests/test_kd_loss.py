"""The distillation loss against float64 hand computations, masking, and window normalisation."""

import math
import random

import pytest
import torch

from atkd.head import HeadAtPositions
from atkd.kd_loss import (bucket_logp, ce_sum, combined_loss, divergence, gathered_logp, option_kd, response_loss_sums,
                          soften, token_kd)
from atkd.models import load_model, load_tokenizer
from atkd.train_data import TrainExample, collate, token_counts
from atkd.trainer import TrainConfig, micro_batch_loss

TOL = 1e-10  # float64 in, float64 out


# ----------------------------------------------------------------------------- hand references

def hand_softmax(xs, T=1.0):
    m = max(x / T for x in xs)
    e = [math.exp(x / T - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def hand_div(p, q, kind):
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def hand_log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def hand_tempered(buckets, T):
    """[(1 - q) * softmax(log p_topk / T), q] of probabilities [p_1..p_k, q]."""
    head = sum(buckets[:-1])
    return [head * x for x in hand_softmax([math.log(b) for b in buckets[:-1]], T)] + [buckets[-1]]


KINDS = ["forward_kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_option_kd_matches_hand_computation_with_padded_options(kind, T):
    rng = random.Random(3)
    n_opts = [2, 4, 5]  # rows padded to 26 letters; the mask marks the real ones
    student = torch.full((3, 26), 0.0, dtype=torch.float64)
    teacher = torch.full((3, 26), float("-inf"), dtype=torch.float64)
    mask = torch.zeros((3, 26), dtype=torch.bool)
    hand = []
    for r, m in enumerate(n_opts):
        s_logits = [rng.uniform(-4, 4) for _ in range(m)]
        t_logp = hand_log_softmax([rng.uniform(-4, 4) for _ in range(m)])
        student[r, :m] = torch.tensor(s_logits, dtype=torch.float64)
        student[r, m:] = 50.0  # garbage in padded slots must not leak into the loss
        teacher[r, :m] = torch.tensor(t_logp, dtype=torch.float64)
        mask[r, :m] = True
        p = hand_softmax(t_logp, T)  # softmax(log p / T) = teacher softened over its options
        q = hand_softmax(s_logits, T)
        hand.append(hand_div(p, q, kind))
    got = option_kd(student, teacher, mask, T, kind)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(hand, dtype=torch.float64), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_token_kd_tail_bucket_matches_hand_computation(kind, T):
    rng = random.Random(5)
    V, k, n = 30, 4, 3
    s_logits = [[rng.gauss(0, 2) for _ in range(V)] for _ in range(n)]
    t_logits = [[rng.gauss(0, 2) for _ in range(V)] for _ in range(n)]
    top_ids, top_logp, tail_logp, hand = [], [], [], []
    for r in range(n):
        t_full = hand_log_softmax(t_logits[r])
        ids = sorted(range(V), key=lambda i: -t_full[i])[:k]
        tail_mass = 1.0 - sum(math.exp(t_full[i]) for i in ids)  # what generate_logits stores (as a log)
        top_ids.append(ids)
        top_logp.append([t_full[i] for i in ids])
        tail_logp.append(math.log(tail_mass))
        s_full = [math.exp(x) for x in hand_log_softmax(s_logits[r])]
        s_buckets = [s_full[i] for i in ids] + [1.0 - sum(s_full[i] for i in ids)]
        t_buckets = [math.exp(x) for x in top_logp[-1]] + [tail_mass]
        # T softens the top-k shape on both sides; each tail keeps its untempered mass
        p = hand_tempered(t_buckets, T)
        q = hand_tempered(s_buckets, T)
        hand.append(hand_div(p, q, kind))
    f64 = dict(dtype=torch.float64)
    got = token_kd(torch.tensor(s_logits, **f64), torch.tensor(top_ids), torch.tensor(top_logp, **f64),
                   torch.tensor(tail_logp, **f64), T, kind)
    assert torch.allclose(got, torch.tensor(hand, **f64), atol=TOL, rtol=0)


def test_tail_bucket_is_zero_kd_when_student_equals_teacher_and_sums_to_one():
    torch.manual_seed(0)
    logits = torch.randn(5, 100, dtype=torch.float64) * 3
    ids = logits.topk(7, dim=-1).indices
    buckets = bucket_logp(logits, ids)
    assert torch.allclose(buckets.exp().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    for kind in KINDS:
        kd = token_kd(logits, ids, buckets[:, :-1], buckets[:, -1], 2.0, kind)
        assert kd.abs().max() < 1e-12


def test_gathered_logp_backward_equals_autograd_of_log_softmax():
    """The memory-lean backward (softmax recomputed from the logits) is the exact gradient."""
    torch.manual_seed(2)
    z = (torch.randn(5, 40, dtype=torch.float64) * 3).requires_grad_()
    ids = torch.stack([torch.randperm(40)[:7] for _ in range(5)])
    ids[:, 1] = ids[:, 0]  # a repeated id (padded slots repeat the target)
    assert torch.autograd.gradcheck(lambda x: gathered_logp(x, ids, 4), (z,))
    assert torch.autograd.gradcheck(lambda x: gathered_logp(x, ids, 0), (z,))
    full = torch.log_softmax(z.detach(), -1)
    tail = torch.logsumexp(full.scatter(-1, ids[:, -4:], float("-inf")), -1, keepdim=True)
    assert torch.allclose(gathered_logp(z, ids, 4), torch.cat([full.gather(-1, ids), tail], -1), atol=1e-12)


def reference_sums(logits, batch, T, kind):
    """train.py's loss terms written the plain autograd way (N x V intermediates and all)."""
    ce = ce_sum(logits, batch["targets"], batch["weights"])
    letters = logits[batch["opt_index"]].gather(-1, batch["opt_ids"])
    kd = (option_kd(letters, batch["opt_teacher"], batch["opt_mask"], T, kind) * batch["opt_weight"]).sum()
    rows = torch.log_softmax(logits[batch["tok_index"]], -1)
    s = torch.cat([rows.gather(-1, batch["tok_ids"]),
                   torch.logsumexp(rows.scatter(-1, batch["tok_ids"], float("-inf")), -1, keepdim=True)], -1)
    t = torch.cat([batch["tok_logp"], batch["tok_tail"][:, None]], -1).double()
    kd = kd + (divergence(plain_tempered(t, T), plain_tempered(s, T), kind) * batch["tok_weight"]).sum()
    return ce, kd


def plain_tempered(buckets, T):
    """log [(1 - q) * softmax(log p_topk / T), q], renormalised (the teacher's rounding), written out."""
    head = torch.log_softmax(buckets[:, :-1] / T, -1) + torch.logsumexp(buckets[:, :-1], -1, keepdim=True)
    return torch.log_softmax(torch.cat([head, buckets[:, -1:]], -1), -1)


@pytest.mark.parametrize("kind", KINDS)
def test_response_loss_sums_equal_the_plain_autograd_composition(tiny, kind):
    tok, _ = tiny
    examples = synthetic_examples(tok, 5, seed=6)
    batch = collate(examples, [1.0, 1.0, 0.0, 1.0, 1.0], tok.pad_token_id)
    batch = {k: v.double() if v.dtype == torch.float32 else v for k, v in batch.items()}
    assert batch["tok_index"].numel() > 0
    logits = (torch.randn(len(batch["targets"]), len(tok), dtype=torch.float64) * 2).requires_grad_()
    ce, kd = response_loss_sums(logits, batch, 2.0, kind)
    (g,) = torch.autograd.grad(0.3 * ce + 0.7 * kd, logits)
    ce_ref, kd_ref = reference_sums(logits, batch, 2.0, kind)
    (g_ref,) = torch.autograd.grad(0.3 * ce_ref + 0.7 * kd_ref, logits)
    assert float(ce.detach()) == pytest.approx(float(ce_ref.detach()), abs=1e-9)
    assert float(kd.detach()) == pytest.approx(float(kd_ref.detach()), abs=1e-9)
    assert torch.allclose(g, g_ref, atol=1e-10)


def test_divergences_are_nonnegative_and_masked_entries_give_no_nan_gradient():
    torch.manual_seed(1)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    t = t.masked_fill(~mask, float("-inf"))
    for kind in KINDS:
        d = divergence(soften(t, 1.5, mask), soften(s, 1.5, mask), kind, mask)
        assert (d >= -1e-12).all()
        d.sum().backward()
        assert torch.isfinite(s.grad).all() and (s.grad[:, 4:] == 0).all()
        s.grad = None


def test_ce_sum_masks_by_weight_and_matches_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2, 0])
    weights = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # a placeholder row carries no loss
    hand = -hand_log_softmax([1.0, 2.0, 0.5])[1] - hand_log_softmax([0.0, -1.0, 3.0])[2]
    assert abs(float(ce_sum(logits, targets, weights)) - hand) < TOL


def test_alpha_ce_weights_the_ce_term():
    """alpha_ce weighs CE and 1 - alpha_ce weighs KD (the reference weighted KD with alpha_ce although it is
    documented as the CE weight)."""
    ce, kd, T = torch.tensor(6.0), torch.tensor(10.0), 2.0
    got = combined_loss(ce, kd, n_ce=3, n_kd=5, alpha_ce=0.25, temperature=T)
    assert float(got) == pytest.approx(0.25 * 6 / 3 + 0.75 * T ** 2 * 10 / 5)
    assert float(combined_loss(ce, kd, 3, 5, alpha_ce=1.0, temperature=T)) == pytest.approx(2.0)  # CE only
    assert float(combined_loss(ce, kd, 3, 5, alpha_ce=0.0, temperature=T)) == pytest.approx(T ** 2 * 2.0)  # KD only


# ----------------------------------------------------------------------------- with a real tiny model

@pytest.fixture(scope="module")
def tiny(llama_dir):
    tok = load_tokenizer(llama_dir)
    model = load_model(llama_dir)
    return tok, model


def synthetic_examples(tok, n, seed=0, k=5, token_level=True):
    """Items with random prompts/responses and random teacher targets (ids from the real vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    out = []
    for i in range(n):
        p_len = int(torch.randint(4, 12, (1,), generator=g))
        r_len = int(torch.randint(1, 5, (1,), generator=g))
        prompt = torch.randint(10, vocab, (p_len,), generator=g).tolist()
        response = torch.randint(10, vocab, (r_len,), generator=g).tolist()
        opts = torch.randperm(vocab - 10, generator=g)[:4].add(10).tolist()
        response[0] = opts[i % 4]
        ex = TrainExample(key=str(i), prompt_ids=prompt, response_ids=response, option_ids=opts,
                          teacher_option_logp=torch.log_softmax(torch.randn(4, generator=g), -1))
        if token_level and r_len > 1:
            ex.topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(r_len - 1)])
            full = torch.log_softmax(torch.randn(r_len - 1, vocab, generator=g) * 2, -1)
            ex.topk_logp = full.gather(-1, ex.topk_ids)
            ex.tail_logp = torch.logsumexp(full.scatter(-1, ex.topk_ids, float("-inf")), -1)
        out.append(ex)
    return out


def train_config(**settings) -> TrainConfig:
    """train.py's settings; the paths are never read by the loss."""
    return TrainConfig(student_model_path="s", train_file_path="t", teacher_logits_dir="l", output_dir="o", **settings)


def grads_of(model):
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters() if p.grad is not None])


def test_window_normalisation_micro_batches_and_processes_equal_one_big_batch(tiny):
    tok, model = tiny
    head = HeadAtPositions(model, len(tok))
    cfg = train_config(temperature=2.0, alpha_ce=0.4, kd_loss="forward_kl")
    examples = synthetic_examples(tok, 6)
    pad = tok.pad_token_id
    big = collate(examples, [1.0] * 6, pad)
    n_ce, n_kd = token_counts(big)
    model.zero_grad()
    loss_big, _, _ = micro_batch_loss(head, big, n_ce, n_kd, cfg)
    loss_big.backward()
    g_big = grads_of(model)

    # Three micro-batches of two, normalised by the window's totals: same loss, same gradient.
    model.zero_grad()
    micro = [collate(examples[i:i + 2], [1.0, 1.0], pad) for i in (0, 2, 4)]
    totals = [sum(token_counts(b)[j] for b in micro) for j in (0, 1)]
    assert totals == [n_ce, n_kd]
    loss_sum = 0.0
    for b in micro:
        loss, _, _ = micro_batch_loss(head, b, *totals, cfg)
        loss.backward()
        loss_sum += float(loss.detach())
    assert loss_sum == pytest.approx(float(loss_big.detach()), abs=1e-6)
    assert torch.allclose(grads_of(model), g_big, atol=1e-6)

    # Two "processes", each with half of the window and a placeholder: DDP averages their gradients.
    halves = [examples[:3] + [examples[0]], examples[3:] + [examples[0]]]
    per_process = []
    for part in halves:
        model.zero_grad()
        b = collate(part, [1.0, 1.0, 1.0, 0.0], pad)
        # 2 processes x 1 micro-batch per window: the backends divide by 2 (atkd.distributed.loss_scale)
        loss, _, _ = micro_batch_loss(head, b, n_ce, n_kd, cfg, scale=2)
        loss.backward()
        per_process.append(grads_of(model))
    assert torch.allclose((per_process[0] + per_process[1]) / 2, g_big, atol=1e-6)


def test_ce_reads_response_positions_only_and_head_output_equals_full_logits(tiny):
    """CE is the mean over response tokens of the full model's next-token CE, no prompt token."""
    tok, model = tiny
    head = HeadAtPositions(model, len(tok))
    examples = synthetic_examples(tok, 3, seed=4, token_level=False)
    batch = collate(examples, [1.0] * 3, tok.pad_token_id)
    cfg = train_config(alpha_ce=1.0)
    n_ce, n_kd = token_counts(batch)
    assert n_ce == sum(len(ex.response_ids) for ex in examples)
    with torch.no_grad():
        loss, _, _ = micro_batch_loss(head, batch, n_ce, n_kd, cfg)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits.double()
    hand, count = 0.0, 0
    width = batch["input_ids"].shape[1]
    for b, ex in enumerate(examples):
        seq = ex.prompt_ids + ex.response_ids
        offset = width - (len(seq) - 1)
        for j in range(len(ex.prompt_ids), len(seq)):  # token j predicted from position j - 1
            logp = torch.log_softmax(full[b, offset + j - 1], -1)
            hand -= float(logp[seq[j]])
            count += 1
    assert float(loss) == pytest.approx(hand / count, rel=1e-5)
    # The head at gathered positions gives the same numbers as the full model's logits there.
    with torch.no_grad():
        picked = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["rows"], batch["cols"])
    assert torch.allclose(picked.double(), full[batch["rows"], batch["cols"]], atol=1e-5)


def test_padded_vocabulary_rows_are_not_part_of_the_student_distribution(llama_dir):
    tok = load_tokenizer(llama_dir)
    model = load_model(llama_dir)
    real = len(tok)
    model.resize_token_embeddings(real + 8)  # checkpoints often pad the embedding to a multiple of 64
    with torch.no_grad():
        model.get_output_embeddings().weight[real:] = 5.0  # padded rows that would swallow probability mass
    head = HeadAtPositions(model, real)
    examples = synthetic_examples(tok, 2, seed=2, token_level=False)
    batch = collate(examples, [1.0, 1.0], tok.pad_token_id)
    with torch.no_grad():
        logits = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["rows"], batch["cols"])
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits[batch["rows"], batch["cols"]]
    assert logits.shape[-1] == real
    ce_real = summed_ce(full[:, :real], batch["targets"])
    assert float(ce_sum(logits, batch["targets"], batch["weights"])) == pytest.approx(ce_real, rel=1e-5)
    assert summed_ce(full, batch["targets"]) > ce_real + 1.0  # the padded rows would have changed the loss


def summed_ce(logits, targets):
    return float(torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum"))
