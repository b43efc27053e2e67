"""Sparse attribution and label selection against the dense reference formula (docs/method.md 1.3)."""

import pytest
import torch

from pipeline.attribution import (
    attribution_labels,
    dense_attribution,
    sparse_attribution,
    top_positive,
    top_signed,
)

N, D, C, K_SAE, K = 64, 16, 96, 8, 4


def topk_code(x, W_enc, b_enc, k):
    """A TopK SAE code written out densely: ReLU of the k largest pre-activations."""
    pre = x @ W_enc.T + b_enc  # (N, C)
    vals, ids = pre.topk(k, dim=1)
    vals = vals.relu()
    dense = torch.zeros_like(pre).scatter(1, ids, vals)
    return pre, ids, vals, dense


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    W_enc = torch.randn(C, D, generator=g)
    b_enc = torch.randn(C, generator=g) - 1.0  # some TopK values come out negative -> ReLU zeros
    W_dec = torch.randn(C, D, generator=g)
    grad = torch.randn(N, D, generator=g)
    pre, ids, vals, dense = topk_code(x, W_enc, b_enc, K_SAE)
    return grad, pre, ids, vals, dense, W_dec


def reference_labels(dense_scores, k):
    """The dense reference, restricted like ours to positive scores: masked topk over all C."""
    masked = dense_scores.masked_fill(~(dense_scores > 0), float("-inf"))
    top, ids = masked.topk(k, dim=1)
    return ids.masked_fill(top == float("-inf"), 0), top


def test_sparse_equals_dense_reference_scores(problem):
    grad, pre, ids, vals, dense, W_dec = problem
    sparse = sparse_attribution(grad, ids, vals, W_dec)  # (N, k)
    ref = dense_attribution(grad, dense, W_dec)  # (N, C) = (g @ W_dec^T) * c
    torch.testing.assert_close(sparse, ref.gather(1, ids), rtol=1e-5, atol=1e-5)
    # Outside the active set the dense reference is exactly zero.
    inactive = torch.ones_like(ref, dtype=torch.bool).scatter(1, ids, False)
    assert (ref[inactive] == 0).all()


def test_act_x_grad_labels_equal_dense_reference(problem):
    grad, pre, ids, vals, dense, W_dec = problem
    ours = attribution_labels("act_x_grad", K, grad, ids, vals, W_dec)
    ref_ids, ref_scores = reference_labels(dense_attribution(grad, dense, W_dec), K)
    assert torch.equal(ours.ids, ref_ids)
    torch.testing.assert_close(ours.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert ours.n_short == int((ref_scores[:, -1] == float("-inf")).sum())
    assert 0 < ours.n_short < N  # the fixture exercises both cases


def test_preact_x_grad_is_paper_eq1_dense(problem):
    grad, pre, ids, vals, dense, W_dec = problem
    ours = attribution_labels("preact_x_grad", K, grad, ids, vals, W_dec, pre=pre)
    ref_top, ref_ids = ((grad @ W_dec.T) * pre).topk(K, dim=1)
    assert torch.equal(ours.ids, ref_ids)
    torch.testing.assert_close(ours.scores, ref_top)
    assert torch.isfinite(ours.scores).all()  # signed top-K over all C never leaves a slot empty
    with pytest.raises(ValueError, match="pre-activations"):
        attribution_labels("preact_x_grad", K, grad, ids, vals, W_dec)


def test_activation_labels_are_largest_positive_code(problem):
    grad, pre, ids, vals, dense, W_dec = problem
    ours = attribution_labels("activation", K, grad, ids, vals, W_dec)
    ref_ids, ref_scores = reference_labels(dense, K)
    assert torch.equal(ours.ids, ref_ids)
    torch.testing.assert_close(ours.scores, ref_scores)


def test_missing_slots_are_id0_minus_inf_and_counted():
    ids = torch.tensor([[5, 3, 9, 7], [1, 2, 4, 6]])
    scores = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-1.0, -2.0, -3.0, float("nan")]])
    lab = top_positive(ids, scores, 3)
    assert lab.ids.tolist() == [[7, 5, 0], [0, 0, 0]]
    assert lab.scores[0, :2].tolist() == [2.0, 0.5]
    assert (lab.scores[0, 2:] == float("-inf")).all() and (lab.scores[1] == float("-inf")).all()
    assert lab.n_short == 2


def test_ties_go_to_lower_latent_id():
    ids = torch.tensor([[40, 7, 19, 3]])
    scores = torch.tensor([[1.0, 1.0, 2.0, 1.0]])
    lab = top_positive(ids, scores, 3)
    assert lab.ids.tolist() == [[19, 3, 7]]


def test_top_signed_counts_short_tokens():
    scores = torch.tensor([[3.0, 2.0, 1.0, -1.0], [3.0, -2.0, -4.0, -5.0]])
    lab = top_signed(scores, 2)
    assert lab.ids.tolist() == [[0, 1], [0, 1]]
    assert lab.n_short == 1


def test_k_larger_than_candidates_is_an_error():
    with pytest.raises(ValueError, match="candidate"):
        top_positive(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="unknown attribution"):
        attribution_labels("bogus", 1, torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                           torch.zeros(3, 2))
