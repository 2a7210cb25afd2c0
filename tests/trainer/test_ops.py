"""The pure tensor helpers of PPO (trainer/ops.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import ops


def test_masked_mean_ignores_padding_and_never_divides_by_zero():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ops.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert ops.masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert ops.masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert ops.masked_sum(x, mask).item() == 6.0


def test_masked_var_matches_torch_on_the_selected_values():
    x = torch.tensor([[1.0, 2.0, 7.0, 50.0], [4.0, -3.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    picked = x[mask]
    assert ops.masked_var(x, mask).item() == pytest.approx(picked.var(unbiased=True).item())
    assert ops.masked_var(x, mask, unbiased=False).item() == pytest.approx(
        picked.var(unbiased=False).item()
    )


def test_masked_whiten_gives_zero_mean_unit_variance_on_the_mask_and_zero_elsewhere():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 5
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    w = ops.masked_whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[mask].var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask] == 0).all()
    # shift_mean=False only rescales: the mean is kept.
    kept = ops.masked_whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-5)


def test_logprobs_from_logits_is_the_log_softmax_at_the_labels():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    lp = ops.logprobs_from_logits(logits, labels)
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert lp.tolist()[0] == pytest.approx([3 - z, math.log(1 / 3)])


def test_entropy_from_logits():
    uniform = torch.zeros(1, 1, 4)
    assert ops.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert ops.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_k1_kl_is_zero_when_policy_equals_reference():
    lp = torch.log_softmax(torch.randn(3, 5, 7), -1)[..., 0]
    assert (ops.kl_k1(lp, lp) == 0).all()
    assert ops.kl_k1(torch.tensor([-1.0]), torch.tensor([-3.0])).item() == pytest.approx(2.0)


def test_response_mask_stops_at_the_first_eos_and_flags_cut_off_responses():
    eos = 9
    responses = torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8], [9, 1, 9, 2], [1, 2, 3, 9]])
    mask, has_eos = ops.response_mask(responses, [eos])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False, True, True]
    # Several EOS ids (e.g. <|im_end|> and <|endoftext|>).
    mask, has_eos = ops.response_mask(torch.tensor([[1, 4, 9]]), [9, 4])
    assert mask.int().tolist() == [[1, 1, 0]]


def test_gae_against_a_hand_computed_three_step_example():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 1.0, 9.9]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: δ2 = 1.0 − 0.3 = 0.7; δ1 = −0.2 + 0.3 − 0.4 = −0.3 → A1 = −0.3 + 0.95·0.7;
    # δ0 = 0.1 + 0.4 − 0.5 = 0 → A0 = 0.95·A1.
    a1 = -0.3 + 0.95 * 0.7
    assert adv[0].tolist() == pytest.approx([0.95 * a1, a1, 0.7])
    assert ret[0].tolist() == pytest.approx([0.95 * a1 + 0.5, a1 + 0.4, 1.0])
    # Row 1 ends after two tokens: the padding's reward and value never leak in.
    assert adv[1].tolist() == pytest.approx([0.4 + 0.95 * 0.9, 0.9, 0.0])
    assert ret[1].tolist() == pytest.approx([0.4 + 0.95 * 0.9 + 0.2, 1.0, 0.0])


def test_gae_matches_a_naive_loop_for_any_gamma_and_lambda():
    torch.manual_seed(1)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    gamma, lam = 0.9, 0.7
    adv, _ = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for row, n in enumerate(lengths):
        for t in range(n):
            expected = 0.0
            for k in range(t, n):
                next_v = values[row, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[row, k].item() + gamma * next_v - values[row, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert adv[row, t].item() == pytest.approx(expected, abs=1e-5)


def test_explained_variance():
    targets = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(targets)
    assert ops.explained_variance(targets, targets, mask) == pytest.approx(1.0)
    assert ops.explained_variance(torch.full_like(targets, 2.5), targets, mask) == pytest.approx(0)
    assert math.isnan(ops.explained_variance(targets, torch.ones_like(targets), mask))


def test_fixed_kl_controller_never_moves():
    ctl = ops.kl_controller(0.05, None)
    ctl.update(100.0, 16)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_follows_the_target_with_a_clipped_proportional_step():
    ctl = ops.kl_controller(0.1, 6.0, horizon=100)
    assert isinstance(ctl, ops.AdaptiveKLController)
    ctl.update(9.0, 10)  # error = 9/6 − 1 = 0.5 → clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    before = ctl.value
    ctl.update(5.4, 10)  # error = −0.1
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 10 / 100))
    before = ctl.value
    ctl.update(float("nan"), 10)  # a skipped rollout leaves β alone
    assert ctl.value == before
    restored = ops.kl_controller(0.1, 6.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target_kl"):
        ops.kl_controller(0.1, 0.0)
