"""The tail bucket under temperature: T softens the top-k shape only, the tail keeps its true mass."""

import math

import pytest
import torch

from atkd.kd_loss import bucket_kd, bucket_logp, temper_buckets, token_kd

KINDS = ["forward_kl", "reverse_kl", "jsd"]
f64 = dict(dtype=torch.float64)


def log_buckets(probs):
    return torch.tensor([[math.log(p) for p in probs]], **f64)


def test_a_one_percent_tail_stays_one_percent_at_t2():
    teacher = [0.6, 0.39, 0.01]  # two top-k tokens, then the tail
    got = temper_buckets(log_buckets(teacher), 2.0).exp()[0].tolist()
    # by hand: the top-k shape softened, scaled to the untempered top-k mass 0.99
    r = [math.sqrt(0.6), math.sqrt(0.39)]
    hand = [0.99 * r[0] / sum(r), 0.99 * r[1] / sum(r), 0.01]
    assert got == pytest.approx(hand, abs=1e-12)
    # tempering the tail as if it were one token would have made it 0.1 / (0.775 + 0.624 + 0.1) = 6.7%
    as_one_token = math.sqrt(0.01) / (sum(r) + math.sqrt(0.01))
    assert as_one_token > 0.066 and got[-1] == pytest.approx(0.01, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_bucket_kd_matches_a_hand_computation(kind):
    T = 2.0
    teacher, student = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]  # [top-1, top-2, tail]

    def tempered(b):
        r = [x ** (1 / T) for x in b[:-1]]
        return [(1 - b[-1]) * x / sum(r) for x in r] + [b[-1]]

    p, q = tempered(teacher), tempered(student)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))
    m = [(x + y) / 2 for x, y in zip(p, q)]
    hand = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m)}[kind]
    t = log_buckets(teacher)
    got = bucket_kd(log_buckets(student), t[:, :-1], t[:, -1], T, kind)
    assert float(got) == pytest.approx(hand, abs=1e-12)


def test_forward_kl_is_the_tail_bernoulli_kl_plus_the_weighted_shape_kl():
    """The decomposition the module docstring gives: the tail is matched at its true value."""
    T, teacher, student = 3.0, [0.5, 0.25, 0.15, 0.1], [0.3, 0.3, 0.1, 0.3]
    t = log_buckets(teacher)
    got = float(bucket_kd(log_buckets(student), t[:, :-1], t[:, -1], T, "forward_kl"))
    qt, qs = teacher[-1], student[-1]
    bern = qt * math.log(qt / qs) + (1 - qt) * math.log((1 - qt) / (1 - qs))
    shape = lambda b: [x ** (1 / T) / sum(y ** (1 / T) for y in b[:-1]) for x in b[:-1]]
    st, ss = shape(teacher), shape(student)
    assert got == pytest.approx(bern + (1 - qt) * sum(a * math.log(a / b) for a, b in zip(st, ss)), abs=1e-12)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_zero_when_the_student_equals_the_teacher(T):
    torch.manual_seed(0)
    logits = torch.randn(6, 50, **f64) * 3
    ids = logits.topk(5, dim=-1).indices
    buckets = bucket_logp(logits, ids)
    for kind in KINDS:
        assert token_kd(logits, ids, buckets[:, :-1], buckets[:, -1], T, kind).abs().max() < 1e-12
    assert torch.allclose(temper_buckets(buckets, T)[:, -1], buckets[:, -1], atol=1e-12)  # tail untouched


def plain_token_kd(z, ids, t_top, t_tail, T, kind):
    """The same loss in probability space with plain autograd (softmax, gather, powers, sums)."""
    p = torch.softmax(z, -1)
    s_top = p.gather(-1, ids)
    s_tail = 1 - s_top.sum(-1, keepdim=True)

    def tempered(top, tail):
        r = top ** (1 / T)
        return torch.cat([(1 - tail) * r / r.sum(-1, keepdim=True), tail], -1)

    q = tempered(s_top, s_tail)
    pt = tempered(t_top.exp(), t_tail.exp()[:, None])
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    m = (pt + q) / 2
    return {"forward_kl": kl(pt, q), "reverse_kl": kl(q, pt), "jsd": 0.5 * kl(pt, m) + 0.5 * kl(q, m)}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_equals_autograd_of_the_plain_composition(kind):
    torch.manual_seed(1)
    V, k, T = 40, 4, 2.0
    teacher = torch.log_softmax(torch.randn(3, V, **f64) * 2, -1)
    ids = teacher.topk(k, -1).indices
    t_top = teacher.gather(-1, ids)
    t_tail = torch.logsumexp(teacher.scatter(-1, ids, float("-inf")), -1)
    z = (torch.randn(3, V, **f64) * 2).requires_grad_()
    (g,) = torch.autograd.grad(token_kd(z, ids, t_top, t_tail, T, kind).sum(), z)
    (g_ref,) = torch.autograd.grad(plain_token_kd(z, ids, t_top, t_tail, T, kind).sum(), z)
    assert torch.allclose(g, g_ref, atol=1e-10)
    assert g.abs().max() > 1e-3  # a real gradient, not a vanishing one
    assert torch.autograd.gradcheck(lambda x: token_kd(x, ids, t_top, t_tail, T, kind), (z,))
