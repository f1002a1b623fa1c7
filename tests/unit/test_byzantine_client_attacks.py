"""Attacks done by the attacking client on the update it sends (sign flip, scaled, Gaussian, replay), and the
ALIE / IPM simulation that stays on the server; ALIE's effect on an undefended mean as a unit property."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from federator.api.models import FederationSpec
from federator.runtime import byzantine, robust
from federator.runtime.aggregation import AggregationPipeline
from federator.runtime.aggregation.attacks import ClientAttack, attack_rows, choose_attackers
from federator.runtime.training import Params


def spec(attack: dict[str, Any], **agg: Any) -> FederationSpec:
    return FederationSpec.model_validate({"rounds": 3, "clients": {"count": 10},
                                          "aggregation": agg or {"rule": "fedavg"},
                                          "byzantine": {"attack": {"count": 3, "seed": 0, **attack}}})


def params(seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
            "steps": torch.tensor(seed, dtype=torch.long)}


def delta(sent: Params, base: Params) -> torch.Tensor:
    return torch.cat([(sent[k] - base[k]).reshape(-1) for k in ("w", "b")])


def split(s: FederationSpec) -> tuple[str, str]:
    bad = choose_attackers(s)
    return bad[0], next(f"sim-{i}" for i in range(10) if f"sim-{i}" not in bad)


@pytest.mark.parametrize(("attack", "factor"), [({"type": "sign_flip"}, -1.0),
                                                ({"type": "sign_flip", "parameters": {"scale": 4}}, -4.0),
                                                ({"type": "scaled"}, 10.0),
                                                ({"type": "scaled", "parameters": {"factor": 3}}, 3.0)])
def test_sign_flip_and_scaled_rewrite_the_attackers_update_only(attack: dict[str, Any], factor: float) -> None:
    s = spec(attack)
    bad, good = split(s)
    base, trained = params(0), params(1)
    before = {k: v.clone() for k, v in trained.items()}
    ca = ClientAttack(s)
    assert ca.apply(good, 1, trained, base) is trained  # honest clients send what they trained
    sent = ca.apply(bad, 1, trained, base)
    torch.testing.assert_close(delta(sent, base), factor * delta(trained, base))
    assert torch.equal(sent["steps"], trained["steps"]) and sent.keys() == trained.keys()
    assert all(torch.equal(trained[k], before[k]) for k in trained)  # the trained model is not modified


def test_gaussian_noise_replaces_the_update_seeded_by_attack_round_and_client() -> None:
    s = spec({"type": "gaussian", "parameters": {"std": 2.0}})
    bad, _ = split(s)
    base, trained = params(0), params(1)
    one = delta(ClientAttack(s).apply(bad, 4, trained, base), base)
    again = delta(ClientAttack(s).apply(bad, 4, params(2), base), base)  # another worker, another model
    other_round = delta(ClientAttack(s).apply(bad, 5, trained, base), base)
    torch.testing.assert_close(one, again)  # the noise does not depend on the update or the worker
    assert not torch.allclose(one, other_round)
    big = ClientAttack(s).attacked(bad, 1, torch.zeros(200_000))
    assert abs(float(big.std()) - 2.0) < 0.02 and abs(float(big.mean())) < 0.02


@pytest.mark.parametrize("shared", [True, False], ids=["folder", "memory"])
def test_replay_sends_the_first_update_again_from_whichever_worker(tmp_path: Path, shared: bool) -> None:
    s = spec({"type": "replay"})
    bad, good = split(s)
    folder = tmp_path / "residuals" if shared else None
    worker_a, worker_b = ClientAttack(s, folder, "fed"), ClientAttack(s, folder, "fed")
    base1, trained1 = params(0), params(1)
    first = worker_a.apply(bad, 1, trained1, base1)
    torch.testing.assert_close(delta(first, base1), delta(trained1, base1))  # honest once, remembered
    base2, trained2 = params(5), params(6)
    later = (worker_b if shared else worker_a).apply(bad, 2, trained2, base2)
    torch.testing.assert_close(delta(later, base2), delta(trained1, base1))  # that update again, on the new model
    assert worker_a.apply(good, 2, trained2, base2) is trained2
    if shared:
        assert [p.name for p in folder.iterdir()] == [f"fed--replay--{bad}.npy"]  # type: ignore[union-attr]
    else:  # without a folder another worker does not know it: it sends an honest update and remembers it
        fresh = worker_b.apply(bad, 2, trained2, base2)
        torch.testing.assert_close(delta(fresh, base2), delta(trained2, base2))


@pytest.mark.parametrize("kind", ["alie", "ipm", "label_flip"])
def test_the_other_attacks_leave_the_clients_update_alone(kind: str) -> None:
    s = spec({"type": kind})
    bad, _ = split(s)
    trained = params(1)
    assert ClientAttack(s).apply(bad, 1, trained, params(0)) is trained


def test_fedavg_under_a_client_side_attack_streams_and_alie_buffers() -> None:
    for kind in ("sign_flip", "scaled", "gaussian", "replay"):
        assert not AggregationPipeline(spec({"type": kind}), params(0)).buffered
    for kind in ("alie", "ipm"):  # the server needs the round's honest updates to simulate them
        assert AggregationPipeline(spec({"type": kind}), params(0)).buffered


# ------------------------------------------------------------------------ ALIE on an undefended mean


@pytest.mark.parametrize(("n", "f"), [(10, 3), (20, 6), (50, 12)])
def test_alie_moves_a_plain_mean_by_f_over_n_z_sigma_less_than_the_honest_means_own_noise(n: int, f: int) -> None:
    """Baruch et al. 2019 place every attacker at mean - z_max * sigma (per coordinate), z_max chosen so that
    the attackers stay inside the honest spread. FedAvg of the round is then the honest mean moved by exactly
    (f/n) z_max sigma: at n=10, f=3 that is 0.16 sigma, below the honest mean's own standard error
    sigma / sqrt(n - f) = 0.38 sigma. This is why ALIE does not wreck FedAvg here."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5000, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, 5000, dtype=torch.float64)
    clients = [f"sim-{i}" for i in range(n)]
    attack = FederationSpec.model_validate({"rounds": 1, "clients": {"count": n}, "byzantine": {
        "attack": {"type": "alie", "count": f}}}).byzantine.attack
    assert attack is not None
    attacked = attack_rows(x, clients, frozenset(clients[:f]), attack)
    honest = x[f:]
    z = byzantine.alie_z(n, f)
    assert z == pytest.approx(statistics.NormalDist().inv_cdf((n - (math.floor(n / 2 + 1) - f)) / n))
    sigma = honest.std(dim=0, correction=1)
    shift = robust.fedavg(attacked) - honest.mean(dim=0)
    torch.testing.assert_close(shift, -(f / n) * z * sigma)
    assert (f / n) * z < 1 / math.sqrt(n - f)


def test_alie_is_what_krum_selects_and_moves_a_trimmed_mean_further_than_a_plain_mean() -> None:
    """The attack's lever (Baruch et al. 2019): its f identical updates sit at the centre of the honest cloud,
    so Krum picks one of them (the full z_max sigma shift) and a trimmed mean keeps all f of them (more than the
    mean's (f/n) z_max sigma), while each stays inside the honest spread."""
    n, f, d = 20, 6, 2000
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    clients = [f"sim-{i}" for i in range(n)]
    attack = FederationSpec.model_validate({"rounds": 1, "clients": {"count": n}, "byzantine": {
        "attack": {"type": "alie", "count": f}}}).byzantine.attack
    assert attack is not None
    attacked = attack_rows(x, clients, frozenset(clients[:f]), attack)
    honest = x[f:]
    sigma, mean = honest.std(dim=0, correction=1), honest.mean(dim=0)
    z = byzantine.alie_z(n, f)
    torch.testing.assert_close(robust.krum(attacked, f), attacked[0])  # an attacker's update wins
    per_coordinate = {name: float(((mean - agg) / sigma).mean()) for name, agg in {
        "fedavg": robust.fedavg(attacked), "trimmed_mean": robust.trimmed_mean(attacked, 0.3),
        "krum": robust.krum(attacked, f)}.items()}
    assert per_coordinate["fedavg"] == pytest.approx(f / n * z)
    assert per_coordinate["trimmed_mean"] > 1.5 * per_coordinate["fedavg"]
    assert per_coordinate["krum"] == pytest.approx(z)
    # inside the honest spread: the attackers are nearer the honest mean than a typical honest update
    assert float(torch.linalg.vector_norm(attacked[0] - mean)) < float(
        torch.linalg.vector_norm(honest - mean, dim=1).median())
