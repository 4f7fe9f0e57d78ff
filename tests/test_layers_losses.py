"""Nested heads (MRL, MRL-E) against a plain loop, and the Matryoshka losses."""

import pytest
import torch
from torch import nn

from mrl_core.layers import NestedLinear
from mrl_core.losses import MatryoshkaClassificationLoss, MatryoshkaContrastiveLoss
from mrl_core.nesting import prefix

DIMS = (4, 8, 16)


def test_mrl_heads_match_a_plain_loop():
    torch.manual_seed(0)
    layer = NestedLinear(DIMS, num_classes=5)
    z = torch.randn(7, 16)
    out = layer(z)
    assert len(out) == len(DIMS)
    for i, m in enumerate(DIMS):
        lin = getattr(layer, f"nesting_classifier_{i}")
        assert lin.weight.shape == (5, m)
        expected = z[:, :m] @ lin.weight.T + lin.bias
        torch.testing.assert_close(out[i], expected)


@pytest.mark.parametrize("bias", [True, False])
def test_mrl_e_uses_the_first_m_columns_of_one_matrix(bias):
    torch.manual_seed(0)
    layer = NestedLinear(DIMS, num_classes=5, efficient=True, bias=bias)
    assert [n for n, _ in layer.named_parameters()] == (
        ["nesting_classifier_0.weight"] + (["nesting_classifier_0.bias"] if bias else [])
    )
    z = torch.randn(7, 16)
    w = layer.nesting_classifier_0.weight
    for m, logits in zip(DIMS, layer(z)):
        expected = z[:, :m] @ w[:, :m].T
        if bias:
            expected = expected + layer.nesting_classifier_0.bias
        torch.testing.assert_close(logits, expected)


def test_reference_state_dict_keys_load_unchanged():
    """A state dict shaped like the reference MRL_Linear_Layer's loads strictly."""
    reference = {}
    for i, m in enumerate(DIMS):
        reference[f"nesting_classifier_{i}.weight"] = torch.randn(3, m)
        reference[f"nesting_classifier_{i}.bias"] = torch.randn(3)
    layer = NestedLinear(DIMS, num_classes=3)
    layer.load_state_dict(reference, strict=True)
    torch.testing.assert_close(layer.nesting_classifier_2.weight, reference["nesting_classifier_2.weight"])
    efficient = {"nesting_classifier_0.weight": torch.randn(3, 16), "nesting_classifier_0.bias": torch.randn(3)}
    NestedLinear(DIMS, num_classes=3, efficient=True).load_state_dict(efficient, strict=True)


def test_heads_reject_short_features():
    with pytest.raises(ValueError, match="expects 16-dim"):
        NestedLinear(DIMS, 3)(torch.randn(2, 8))


def test_classification_loss_is_weighted_sum_with_label_smoothing():
    torch.manual_seed(0)
    logits = [torch.randn(6, 4) for _ in DIMS]
    y = torch.randint(0, 4, (6,))
    weights = [0.5, 1.0, 2.0]
    loss = MatryoshkaClassificationLoss(3, weights=weights, label_smoothing=0.1)(logits, y)
    expected = sum(
        w * nn.functional.cross_entropy(lg, y, label_smoothing=0.1) for w, lg in zip(weights, logits)
    )
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="2 loss weights for 3"):
        MatryoshkaClassificationLoss(3, weights=[1, 1])


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_matches_per_prefix_infonce(symmetric):
    torch.manual_seed(0)
    q, d = torch.randn(5, 16), torch.randn(5, 16)
    loss_fn = MatryoshkaContrastiveLoss(DIMS, temperature=0.1, symmetric=symmetric, weights=[1, 2, 3])
    labels = torch.arange(5)
    expected = 0
    for w, m in zip([1, 2, 3], DIMS):
        sim = prefix(q, m) @ prefix(d, m).T / 0.1
        term = nn.functional.cross_entropy(sim, labels)
        if symmetric:
            term = (term + nn.functional.cross_entropy(sim.T, labels)) / 2
        expected = expected + w * term
    torch.testing.assert_close(loss_fn(q, d), expected)


def test_training_with_nested_losses_runs_the_encoder_once_per_batch_and_learns():
    """One forward per batch feeds every dim's loss; both losses fall on a toy problem."""
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    encoder = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16))
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    heads = NestedLinear(DIMS, num_classes=4)
    ce = MatryoshkaClassificationLoss(len(DIMS))
    nce = MatryoshkaContrastiveLoss(DIMS, temperature=0.2)
    opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-2)
    history = []
    for _ in range(60):
        z = encoder(x)
        ce_loss = ce(heads(z), y)
        nce_loss = nce(z, z.detach() + 0.01 * torch.randn_like(z))
        opt.zero_grad()
        (ce_loss + nce_loss).backward()
        opt.step()
        history.append((ce_loss.item(), nce_loss.item()))
    assert len(calls) == 60  # one encoder forward per step serves all dims of both losses
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1]
