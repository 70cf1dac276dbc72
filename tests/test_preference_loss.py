"""PreferenceLoss from logits equals the loss on sequence log-probs of the float64 reference."""

import pytest
import torch

import pyalign
from pyalign import losses
from pyalign.reference import reference_token_logprobs


def batch(pairs=3, time=6, vocab=31, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, time, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, time), generator=gen)
    labels[:, :2] = -100  # the prompt
    ref = torch.randn(2 * pairs, generator=gen, dtype=torch.float64) - 10
    chain = torch.randn(3, 2 * pairs, generator=gen, dtype=torch.float64) - 10
    return logits, labels, ref, chain


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "robust", "apo_zero", "apo_down", "kto_pair", "spo"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_preference_loss_matches_reference(name, backend):
    logits, labels, ref, chain = batch()
    kwargs = {"alphas": [0.1, 0.2]} if name == "spo" else {}
    module = pyalign.PreferenceLoss(name, beta=0.2, backend=backend, **kwargs)
    leaf = logits.clone().requires_grad_()
    out = module(leaf, labels, ref_logps=ref, chain_logps=chain)
    out.loss.backward()

    ref_leaf = logits.clone().requires_grad_()
    seq = reference_token_logprobs(ref_leaf, labels).sum(-1)
    if name == "ipo":
        seq = seq / (labels != -100).sum(-1)
    half = seq.shape[0] // 2
    if name == "spo":
        expected = losses.spo(seq[:half], seq[half:], chain[:, :half], chain[:, half:], alphas=[0.1, 0.2], beta=0.2)
    else:
        expected = losses.get_loss(name)(seq[:half], seq[half:], ref[:half], ref[half:], beta=0.2)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    torch.testing.assert_close(out.chosen_rewards, expected.chosen_rewards)


def test_nll_weight_adds_the_sft_term():
    logits, labels, ref, _ = batch()
    plain = pyalign.PreferenceLoss("dpo", backend="torch")(logits, labels, ref_logps=ref)
    with_nll = pyalign.PreferenceLoss("dpo", backend="torch", nll_weight=0.5)(logits, labels, ref_logps=ref)
    seq = reference_token_logprobs(logits, labels).sum(-1)
    tokens = (labels != -100).sum(-1)
    nll = (-seq[:3] / tokens[:3]).mean()
    torch.testing.assert_close(with_nll.loss, plain.loss + 0.5 * nll)


def test_preference_loss_errors():
    logits, labels, ref, chain = batch()
    with pytest.raises(ValueError, match="ref_logps: the dpo loss needs"):
        pyalign.PreferenceLoss("dpo")(logits, labels)
    with pytest.raises(ValueError, match="chain_logps"):
        pyalign.PreferenceLoss("spo", alphas=[0.1, 0.1])(logits, labels)
    with pytest.raises(ValueError, match="alphas"):
        pyalign.PreferenceLoss("spo")
    with pytest.raises(ValueError, match="temperature: not an option of the dpo loss"):
        pyalign.PreferenceLoss("dpo", temperature=2.0)
    with pytest.raises(ValueError, match="logits: expected an even number of rows"):
        pyalign.PreferenceLoss("dpo", backend="torch")(logits[:5], labels[:5], ref_logps=ref[:5])
    with pytest.raises(ValueError, match="ref_logps: expected shape"):
        pyalign.PreferenceLoss("dpo", backend="torch")(logits, labels, ref_logps=ref[:2])
