"""Detection scores, reputation and attack simulators (federator.runtime.byzantine)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from federator.runtime import byzantine as byz
from federator.runtime import robust


def honest_updates(h: int, d: int, seed: int) -> torch.Tensor:
    """Correlated updates as in a federation: a shared direction plus per-client noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, d, generator=g) + 0.5 * torch.randn(h, d, generator=g)


# --- scores ------------------------------------------------------------------------------------------------


def test_robust_zscores_use_median_and_mad() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    med, mad = 3.0, 1.0  # deviations 2, 1, 0, 1, 97
    want = [(x - med) / (1.4826 * mad) for x in v.tolist()]
    np.testing.assert_allclose(byz.robust_zscores(v).numpy(), want)
    even = torch.tensor([1.0, 2.0, 4.0, 8.0])  # median 3, deviations 2 1 1 5 -> MAD 1.5
    np.testing.assert_allclose(byz.robust_zscores(even).numpy(), [(x - 3.0) / (1.4826 * 1.5) for x in even.tolist()])


def test_robust_zscores_with_zero_mad_stay_finite() -> None:
    z = byz.robust_zscores(torch.tensor([2.0, 2.0, 2.0, 5.0]))
    assert z[:3].tolist() == [0.0, 0.0, 0.0]
    assert z[3] > 1e6 and torch.isfinite(z).all()


def planted(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    x = honest_updates(20, 500, seed).clone()
    bad = [3, 11, 17]
    x[3] *= 10.0  # scaled
    x[11] = -x[11]  # sign flipped
    x[17] = torch.randn(500, generator=torch.Generator().manual_seed(seed + 1)) * 20.0  # Gaussian noise
    return x, bad


def flagged(scores: torch.Tensor, threshold: float) -> list[int]:
    return [i for i, s in enumerate(scores.tolist()) if s > threshold]


def test_norm_scores_flag_large_updates() -> None:
    x, _ = planted()
    scores = byz.score_updates(x, "norm")
    assert flagged(scores, 3.5) == [3, 17]  # the sign flip keeps its norm: this score cannot see it
    assert torch.equal(scores, byz.norm_zscores(x).abs())


def test_cosine_scores_flag_wrong_directions() -> None:
    x, _ = planted()
    scores = byz.score_updates(x, "cosine")
    assert flagged(scores, 0.5) == [11, 17]  # scaling keeps the direction: this score cannot see it
    assert float(scores[11]) > 1.5
    agg = robust.trimmed_mean(x, 0.2)
    torch.testing.assert_close(byz.score_updates(x, "cosine", aggregate=agg), byz.cosine_distances(x, agg))


def test_cosine_distances_of_known_vectors() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(byz.cosine_distances(x, torch.tensor([2.0, 0.0])).numpy(), [0.0, 1.0, 2.0, 1.0])


def test_krum_scores_flag_every_planted_outlier() -> None:
    x, bad = planted()
    scores = byz.score_updates(x, "krum", f=3)
    assert flagged(scores, 2.0) == bad
    assert float(scores.median()) == pytest.approx(1.0)


def test_unknown_score_method_is_named() -> None:
    with pytest.raises(ValueError, match="unknown detection method 'zscore'; use one of norm, cosine, krum"):
        byz.score_updates(torch.zeros(3, 2), "zscore")


def test_scores_leave_inputs_unchanged() -> None:
    x, _ = planted()
    before = x.clone()
    for method in byz.SCORE_METHODS:
        byz.score_updates(x, method, f=2)
    assert torch.equal(x, before)


# --- reputation -----------------------------------------------------------------------------------------------

PARAMS = {"decay": 0.5, "k": 2, "w": 3, "q": 2}


def run_rounds(rounds: list[dict[str, bool]], state: byz.ReputationState | None = None, start: int = 1):
    state = state or byz.ReputationState()
    events = []
    for r, flags in enumerate(rounds, start=start):
        state, newly = byz.update_reputation(state, r, flags, **PARAMS)
        events.append(newly)
    return state, events


def test_reputation_score_decays_across_rounds() -> None:
    state, _ = run_rounds([{"a": True}, {"a": False}, {"b": False}, {"a": False}])
    # flagged in round 1, then 0.5 per round: 1 -> 0.5 (round 2) -> 0.125 (round 4, two rounds later)
    assert state.clients["a"].score == pytest.approx(0.125)
    assert byz.decayed_score(state, "a", 6, 0.5) == pytest.approx(0.03125)
    assert byz.decayed_score(state, "unknown", 6, 0.5) == 0.0


def test_quarantine_after_k_of_w_and_release_after_q() -> None:
    rounds = [{"a": True, "b": False}, {"a": False, "b": True}, {"a": True, "b": False}, {"b": True}]
    state, events = run_rounds(rounds)
    # a: flagged in rounds 1 and 3 of its last 3 -> quarantined in round 3 for rounds 4 and 5
    # b: flagged in rounds 2 and 4 of its last 3 -> quarantined in round 4
    assert events == [[], [], ["a"], ["b"]]
    assert [byz.is_quarantined(state, "a", r) for r in (3, 4, 5, 6)] == [False, True, True, False]
    assert state.clients["a"].quarantined_until == 5
    assert state.clients["a"].flags == ()  # a fresh window: k new flags are needed after release


def test_flags_outside_the_window_do_not_count() -> None:
    _, events = run_rounds([{"a": True}, {"a": False}, {"a": False}, {"a": True}])
    assert events == [[], [], [], []]  # the flag of round 1 left the 3-round window before round 4


def test_released_client_needs_k_new_flags() -> None:
    state, events = run_rounds([{"a": True}, {"a": True}])
    assert events == [[], ["a"]]
    state, events = run_rounds([{"a": True}, {"a": False}, {"a": True}], state, start=5)
    assert events == [[], [], ["a"]]
    assert state.clients["a"].quarantined_until == 9


def test_reputation_round_trips_through_json() -> None:
    state, _ = run_rounds([{"a": True, "silo-b": False}, {"a": True, "7": True}])
    data = json.loads(json.dumps(state.to_dict()))
    back = byz.ReputationState.from_dict(data)
    assert back == state
    state2, newly2 = byz.update_reputation(state, 3, {"7": True}, **PARAMS)
    back2, newly3 = byz.update_reputation(back, 3, {"7": True}, **PARAMS)
    assert (state2, newly2) == (back2, newly3) and newly2 == ["7"]


def test_reputation_rejects_bad_input() -> None:
    state, _ = run_rounds([{"a": True}])
    with pytest.raises(ValueError, match="round 1 was already folded in"):
        byz.update_reputation(state, 1, {"a": True}, **PARAMS)
    with pytest.raises(ValueError, match="need 1 <= k <= w"):
        byz.update_reputation(state, 2, {}, decay=0.5, k=4, w=3, q=1)
    with pytest.raises(ValueError, match="unsupported version"):
        byz.ReputationState.from_dict({"clients": {}})
    with pytest.raises(ValueError, match="client 'a' is malformed"):
        byz.ReputationState.from_dict({"version": 1, "clients": {"a": {"score": 1.0}}})


# --- attacks ------------------------------------------------------------------------------------------------


def test_sign_flip_scaled_replay() -> None:
    u = torch.tensor([1.0, -2.0, 3.0])
    assert byz.sign_flip(u).tolist() == [-1.0, 2.0, -3.0]
    assert byz.sign_flip(u, 4.0).tolist() == [-4.0, 8.0, -12.0]
    assert byz.scaled(u, 10.0).tolist() == [10.0, -20.0, 30.0]
    r = byz.replay(u)
    assert torch.equal(r, u) and r.data_ptr() != u.data_ptr()
    assert u.tolist() == [1.0, -2.0, 3.0]


def test_gaussian_is_seeded_noise_of_the_given_std() -> None:
    u = torch.zeros(20000)
    a = byz.gaussian(u, 3.0, torch.Generator().manual_seed(5))
    b = byz.gaussian(u, 3.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == u.shape and a.dtype == u.dtype
    assert float(a.std()) == pytest.approx(3.0, rel=0.03) and abs(float(a.mean())) < 0.1
    assert not torch.equal(a, byz.gaussian(u, 3.0, torch.Generator().manual_seed(6)))


def test_alie_z_follows_baruch_et_al() -> None:
    # n = 50, f = 12: s = floor(26) - 12 = 14, z = Phi^-1(36 / 50)
    assert byz.alie_z(50, 12) == pytest.approx(statistics.NormalDist().inv_cdf(0.72))
    assert byz.alie_z(20, 6) == pytest.approx(statistics.NormalDist().inv_cdf(0.75))
    with pytest.raises(ValueError, match="majority"):
        byz.alie_z(10, 6)


def test_alie_stays_within_the_honest_spread() -> None:
    n, f = 20, 6
    honest = honest_updates(n - f, 4000, 7)
    z = byz.alie_z(n, f)
    mal = byz.alie(honest, n, f)
    mean, std = honest.mean(dim=0), honest.std(dim=0)
    torch.testing.assert_close((mean - mal) / std, torch.full_like(mal, z), rtol=1e-4, atol=1e-4)
    inside = (mal >= honest.min(dim=0).values) & (mal <= honest.max(dim=0).values)
    assert float(inside.float().mean()) > 0.98  # z = 0.67 std from the mean: inside the range of 14 samples
    # ... so its norm looks honest to the norm score, unlike a sign flip of the same update scaled up
    x = torch.cat([honest, mal.expand(f, -1)])
    assert float(byz.score_updates(x, "norm")[n - f :].max()) < 3.5


def test_ipm_points_against_the_honest_mean() -> None:
    honest = honest_updates(7, 300, 8)
    mal = byz.ipm(honest, 0.5)
    torch.testing.assert_close(mal, -0.5 * honest.mean(dim=0))
    assert float(mal @ honest.mean(dim=0)) < 0


def test_label_flip() -> None:
    labels = torch.tensor([0, 1, 9, 4])
    assert byz.label_flip(labels, 10).tolist() == [9, 8, 0, 5]
    assert labels.tolist() == [0, 1, 9, 4]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got \[0, 10\]"):
        byz.label_flip(torch.tensor([0, 10]), 10)


def test_attacks_leave_honest_updates_unchanged() -> None:
    honest = honest_updates(5, 50, 9)
    before = honest.clone()
    byz.alie(honest, 8, 3)
    byz.ipm(honest, 2.0)
    byz.sign_flip(honest[0])
    byz.scaled(honest[1], 3.0)
    assert torch.equal(honest, before)


def test_scores_stay_finite_when_most_updates_coincide() -> None:
    x = torch.ones(6, 20)
    x[5] = torch.linspace(-3.0, 5.0, 20)  # another direction and norm
    for method in byz.SCORE_METHODS:
        scores = byz.score_updates(x, method, f=1)
        assert bool(torch.isfinite(scores).all()), method
        assert float(scores[5]) > float(scores[:5].max()), method
