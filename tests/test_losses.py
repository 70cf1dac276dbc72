"""Every loss against a value computed by hand (plain math on scalars), and SPO's algebra."""

import math

import pytest
import torch

import pyalign
from pyalign import losses


def sig(z):
    return 1 / (1 + math.exp(-z))


def logsig(z):
    return -math.log1p(math.exp(-z))


# One pair: c = logp(y_w) - ref(y_w) = 0.5, r = logp(y_l) - ref(y_l) = -0.3.
PC, PR, RC, RR = -10.0, -12.3, -10.5, -12.0
C, R = PC - RC, PR - RR


def one_pair():
    return [torch.tensor([v], dtype=torch.float64) for v in (PC, PR, RC, RR)]


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("dpo", {"beta": 0.1}, -logsig(0.1 * (C - R))),
        ("dpo", {"beta": 0.5, "label_smoothing": 0.2},
         -0.8 * logsig(0.5 * (C - R)) - 0.2 * logsig(-0.5 * (C - R))),
        ("ipo", {"beta": 0.1}, ((C - R) - 1 / 0.2) ** 2),
        ("hinge", {"beta": 2.0}, max(0.0, 1 - 2.0 * (C - R))),
        ("hinge", {"beta": 0.1}, 1 - 0.1 * (C - R)),
        ("robust", {"beta": 0.1, "label_smoothing": 0.1},
         (-0.9 * logsig(0.1 * (C - R)) + 0.1 * logsig(-0.1 * (C - R))) / 0.8),
        ("apo_zero", {"beta": 0.1}, (1 - sig(0.1 * C)) + sig(0.1 * R)),
        ("apo_down", {"beta": 0.1}, sig(0.1 * C) + (1 - sig(0.1 * (C - R)))),
        ("kto_pair", {"beta": 0.1, "kl": 0.2}, (1 - sig(0.1 * C - 0.02)) + (1 - sig(0.02 - 0.1 * R))),
        # kl=None: batch estimate max(0, mean(c, r)) = 0.1
        ("kto_pair", {"beta": 0.1}, (1 - sig(0.1 * C - 0.01)) + (1 - sig(0.01 - 0.1 * R))),
    ],
)
def test_pairwise_losses_hand_computed(name, kwargs, expected):
    out = losses.get_loss(name)(*one_pair(), **kwargs)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    beta = kwargs["beta"]
    assert out.chosen_rewards.item() == pytest.approx(beta * C, rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(beta * R, rel=1e-6)
    assert out.chosen_rewards.dtype == torch.float32 and not out.chosen_rewards.requires_grad


def test_loss_is_mean_over_pairs_and_reference_gets_no_gradient():
    pc = torch.tensor([-1.0, -2.0, -3.5], requires_grad=True)  # third pair: c < r
    pr = torch.tensor([-1.5, -1.0, -4.0], requires_grad=True)
    rc = torch.tensor([-1.2, -2.2, -2.9], requires_grad=True)
    rr = torch.tensor([-1.4, -1.1, -3.5], requires_grad=True)
    out = losses.dpo(pc, pr, rc, rr, beta=0.3)
    per_pair = [losses.dpo(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta=0.3).loss for i in range(3)]
    assert out.loss.item() == pytest.approx(sum(p.item() for p in per_pair) / 3, rel=1e-6)
    out.loss.backward()
    assert rc.grad is None and rr.grad is None
    assert out.metrics["reward_accuracy"] == pytest.approx(2 / 3)


def test_apo_directions():
    """APO-zero pushes the chosen likelihood up; APO-down pushes it down (gradient sign)."""
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in one_pair())
    losses.apo_zero(pc, pr, rc, rr).loss.backward()
    assert pc.grad.item() < 0 and pr.grad.item() > 0  # descent raises pc, lowers pr
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in one_pair())
    losses.apo_down(pc, pr, rc, rr).loss.backward()
    assert pc.grad.item() > 0 and pr.grad.item() > 0  # descent lowers both ...
    assert pr.grad.item() > pc.grad.item()  # ... the loser more


def test_nll_term():
    lp = torch.tensor([-4.0, -9.0])
    assert losses.nll(lp).item() == pytest.approx(6.5)
    assert losses.nll(lp, num_tokens=torch.tensor([2, 3])).item() == pytest.approx((2 + 3) / 2)


# ------------------------------------------------------------------------- SPO


def test_spo_coefficients_round_two_matches_paper_eq5():
    alpha, beta = 0.1, 0.1
    kappa = pyalign.spo_coefficients([alpha], beta)
    assert kappa == pytest.approx([-alpha * beta, beta])  # xi_1 = alpha*beta, xi_2 = beta
    # Eq. 5: -log sigmoid(xi_2 * phi_2 - xi_1 * phi_1) with phi_i the pair's log-ratio difference.
    pi0 = torch.tensor([[-10.0], [-12.0]], dtype=torch.float64)  # rows: y_w, y_l
    pi1 = torch.tensor([[-9.0], [-12.5]], dtype=torch.float64)
    pi2 = torch.tensor([[-8.7], [-13.0]], dtype=torch.float64)
    phi1 = (pi1[0] - pi0[0]) - (pi1[1] - pi0[1])
    phi2 = (pi2[0] - pi1[0]) - (pi2[1] - pi1[1])
    expected = -logsig(float(beta * phi2 - alpha * beta * phi1))
    out = losses.spo(pi2[0], pi2[1], torch.stack([pi0[0], pi1[0]]), torch.stack([pi0[1], pi1[1]]),
                     alphas=[alpha], beta=beta)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_spo_coefficients_equal_alpha_closed_form():
    alpha, beta, n = 0.3, 0.2, 5
    kappa = pyalign.spo_coefficients([alpha] * (n - 1), beta)
    assert len(kappa) == n and kappa[-1] == beta
    for i in range(1, n):  # kappa_{n-i} = -beta * alpha * (1 - alpha)^(i-1)
        assert kappa[n - i - 1] == pytest.approx(-beta * alpha * (1 - alpha) ** (i - 1), rel=1e-12)


def test_spo_coefficients_general_product():
    a = [0.1, 0.2, 0.5]
    kappa = pyalign.spo_coefficients(a, 1.0)
    assert kappa == pytest.approx([-0.1 * 0.8 * 0.5, -0.2 * 0.5, -0.5, 1.0])


def test_spo_alpha_zero_is_dpo_against_the_last_model():
    gen = torch.Generator().manual_seed(0)
    chain_c, chain_r = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    pc, pr = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    s = losses.spo(pc, pr, chain_c, chain_r, alphas=[0.0, 0.0], beta=0.1)
    d = losses.dpo(pc, pr, chain_c[-1], chain_r[-1], beta=0.1)
    torch.testing.assert_close(s.loss, d.loss)
    torch.testing.assert_close(s.chosen_rewards, d.chosen_rewards)


def test_spo_round_one_is_dpo():
    pc, pr, rc, rr = one_pair()
    s = losses.spo(pc, pr, rc[None], rr[None], alphas=[], beta=0.1)
    assert s.loss.item() == pytest.approx(losses.dpo(pc, pr, rc, rr, beta=0.1).loss.item())


# ------------------------------------------------------------------------- bad input


def test_loss_errors_name_the_argument():
    pc, pr, rc, rr = one_pair()
    with pytest.raises(ValueError, match="beta"):
        losses.dpo(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected: expected shape"):
        losses.dpo(pc, pr, rc, torch.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.robust(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"alphas\[1\]"):
        pyalign.spo_coefficients([0.1, 1.5], 0.1)
    with pytest.raises(ValueError, match="alphas: round n=3"):
        losses.spo(pc, pr, torch.zeros(3, 1), torch.zeros(3, 1), alphas=[0.1])
    with pytest.raises(ValueError, match="chain_chosen: expected shape"):
        losses.spo(pc, pr, torch.zeros(3), torch.zeros(3), alphas=[])
    with pytest.raises(ValueError, match="loss: expected one of"):
        losses.get_loss("ppo")


def test_empty_batch_gives_zero_loss_not_nan():
    e = torch.zeros(0, requires_grad=True)
    out = losses.dpo(e, e, e, e)
    assert out.loss.item() == 0.0
    out.loss.backward()


# ------------------------------------------------------------------------- hyper-parameters, when a loss is built

BAD_OPTIONS = [
    ("dpo", {"beta": -1.0}, r"^beta: expected a positive finite number, got -1\.0"),
    ("dpo", {"beta": 0}, r"^beta:"),
    ("dpo", {"beta": float("nan")}, r"^beta:"),
    ("dpo", {"beta": float("inf")}, r"^beta:"),
    ("dpo", {"beta": True}, r"^beta:"),
    ("dpo", {"beta": "0.1"}, r"^beta:"),
    ("dpo", {"label_smoothing": -0.1}, r"^label_smoothing: expected a value in \[0, 0\.5\] for dpo"),
    ("dpo", {"label_smoothing": 0.7}, r"^label_smoothing: expected a value in \[0, 0\.5\] for dpo"),
    ("robust", {"label_smoothing": 0.5}, r"^label_smoothing: expected a value in \[0, 0\.5\) for robust"),
    ("spo", {"alphas": [0.1, 1.5]}, r"^alphas\[1\]: expected a value in \[0, 1\], got 1\.5"),
    ("spo", {"alphas": [-0.1]}, r"^alphas\[0\]: expected a value in \[0, 1\]"),
    ("spo", {"alphas": 0.1}, r"^alphas: expected a list of numbers in \[0, 1\]"),
    ("spo", {"alphas": [float("nan")]}, r"^alphas\[0\]:"),
    ("kto_pair", {"kl": -0.5}, r"^kl: expected a non-negative finite estimate"),
    ("dpo", {"nll_weight": -1.0}, r"^nll_weight: expected a non-negative finite number, got -1\.0"),
    ("dpo", {"nll_weight": float("inf")}, r"^nll_weight:"),
    ("ipo", {"average": "yes"}, r"^average: expected True, False or None"),
    ("hinge", {"label_smoothing": 0.1}, r"^label_smoothing: not an option of the hinge loss"),
    ("ppo", {}, r"^loss: expected one of"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD_OPTIONS, ids=[f"{n}-{k}" for n, k, _ in BAD_OPTIONS])
def test_preference_loss_refuses_out_of_range_options_when_built(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pyalign.PreferenceLoss(name, **kwargs)


def test_edges_of_the_ranges_are_accepted():
    pyalign.PreferenceLoss("dpo", beta=1e-6, label_smoothing=0.5)
    pyalign.PreferenceLoss("robust", label_smoothing=0.49)
    pyalign.PreferenceLoss("spo", alphas=[0.0, 1.0])
    pyalign.PreferenceLoss("spo", alphas=())  # round 1
    pyalign.PreferenceLoss("kto_pair", kl=0.0)
    pyalign.PreferenceLoss("dpo", nll_weight=0.0)


def test_functional_losses_check_the_same_ranges():
    pc, pr, rc, rr = one_pair()
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 0\.5\] for dpo"):
        losses.dpo(pc, pr, rc, rr, label_smoothing=0.6)
    with pytest.raises(ValueError, match="kl: expected a non-negative finite estimate"):
        losses.kto_pair(pc, pr, rc, rr, kl=float("nan"))
    with pytest.raises(ValueError, match="beta"):
        losses.spo(pc, pr, rc[None], rr[None], alphas=[], beta=-0.1)
