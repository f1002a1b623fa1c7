"""The aggregation pipeline seam: registry, stages, streaming and buffered rounds, detection, reputation,
attack simulation and the explicit cross-round state."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from federator.api.models import AggregationSpec, FederationSpec
from federator.runtime import byzantine, robust
from federator.runtime.aggregation import (
    RULES,
    AggregationPipeline,
    AggregationState,
    buffer_bytes,
    buffer_problem,
    weighted_average,
)
from federator.runtime.aggregation.attacks import attack_rows, choose_attackers, local_data
from federator.runtime.aggregation.flat import FlatLayout
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.data import ArrayDataset
from federator.runtime.training import Params


def _model(seed: int, scale: float = 1.0) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g) * scale,
        "b": torch.randn(4, generator=g) * scale,
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def _spec(**sections: Any) -> FederationSpec:
    doc: dict[str, Any] = {"rounds": 2, "clients": {"count": 10}}
    doc.update(sections)
    return FederationSpec.model_validate(doc)


def _run_round(spec: FederationSpec, glob: Params, updates: list[tuple[str, Params, float]],
               state: AggregationState | None = None, rnd: int = 1) -> Any:
    pipe = AggregationPipeline(spec, glob)
    agg = pipe.begin_round(rnd, glob, len(updates), [c for c, *_ in updates])
    for client, params, w in updates:
        agg.add(client, params, w)
    return agg.finish(state or AggregationState())


def _flat(p: Params) -> torch.Tensor:
    return FlatLayout.of(p).flatten(p)


def test_every_rule_of_the_api_is_registered_and_only_fedavg_streams() -> None:
    api_rules = set(typing.get_args(AggregationSpec.model_fields["rule"].annotation))
    assert api_rules == set(RULES) == set(robust.RULES)
    assert [n for n, r in RULES.items() if r.streaming] == ["fedavg"]


def test_fedavg_streams_and_equals_weighted_average_exactly() -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1), float(i + 1)) for i in range(4)]
    spec = _spec()
    pipe = AggregationPipeline(spec, glob)
    assert not pipe.buffered
    out = _run_round(spec, glob, ups)
    want = weighted_average([u for _, u, _ in ups], [w for *_, w in ups])
    assert out.aggregate.keys() == want.keys()
    for k in want:
        assert torch.equal(out.aggregate[k], want[k]), k
    assert out.used == 4 and out.scores == [] and out.flagged == []


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
                                  "centered_clipping"])
def test_a_buffered_rule_is_its_kernel_on_the_differences_to_the_global_model(rule: str) -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1), 10.0) for i in range(7)]
    spec = _spec(aggregation={"rule": rule, "f": 1, "tau": 0.5})
    out = _run_round(spec, glob, ups)
    x = torch.stack([_flat(u) - _flat(glob) for _, u, _ in ups])
    kernel = {
        "median": lambda: robust.coordinate_median(x),
        "trimmed_mean": lambda: robust.trimmed_mean(x, 0.2),
        "krum": lambda: robust.krum(x, 1),
        "multi_krum": lambda: robust.multi_krum(x, 1, 6),
        "geometric_median": lambda: robust.geometric_median(x, tol=1e-6, max_iter=100),
        "centered_clipping": lambda: robust.centered_clipping(x, torch.zeros(x.shape[1]), 0.5, 1),
    }[rule]()
    torch.testing.assert_close(_flat(out.aggregate), _flat(glob) + kernel)
    assert out.aggregate["bn.num_batches_tracked"] == ups[0][1]["bn.num_batches_tracked"]  # from the first
    if rule == "centered_clipping":
        assert out.state.reference is not None
        torch.testing.assert_close(out.state.reference, kernel)


def test_inputs_are_never_modified() -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1, scale=1e3 if i == 0 else 1.0), 1.0) for i in range(6)]
    before = [({k: v.clone() for k, v in u.items()}) for _, u, _ in ups]
    glob_before = {k: v.clone() for k, v in glob.items()}
    spec = _spec(aggregation={"rule": "median", "normClip": {"maxNorm": 1.0}},
                 byzantine={"detection": {"method": "norm"}, "attack": {"type": "sign_flip", "count": 2}})
    _run_round(spec, glob, ups)
    for b, (_, u, _) in zip(before, ups, strict=True):
        assert all(torch.equal(b[k], u[k]) for k in b)
    assert all(torch.equal(glob_before[k], glob[k]) for k in glob)


def test_norm_clipping_is_the_same_stage_streaming_and_buffered() -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1, scale=5.0), 1.0) for i in range(5)]
    streamed = _run_round(_spec(aggregation={"normClip": {"maxNorm": 0.5}}), glob, ups)
    # detection makes fedavg buffer; a huge threshold flags nothing
    buffered = _run_round(_spec(aggregation={"normClip": {"maxNorm": 0.5}},
                                byzantine={"detection": {"method": "norm", "threshold": 1e9}}), glob, ups)
    x = torch.stack([_flat(u) - _flat(glob) for _, u, _ in ups])
    want = _flat(glob) + robust.norm_clip(x, 0.5).mean(0)
    torch.testing.assert_close(_flat(streamed.aggregate), want)
    torch.testing.assert_close(_flat(buffered.aggregate), want)
    assert torch.linalg.vector_norm(_flat(streamed.aggregate) - _flat(glob)) <= 0.5 + 1e-5


def test_detection_leaves_flagged_updates_out_and_scores_every_update() -> None:
    glob = _model(0)
    honest = [(f"sim-{i}", _model(i + 1), 1.0) for i in range(6)]
    huge = ("sim-9", _model(99, scale=1e4), 1.0)
    spec = _spec(byzantine={"detection": {"method": "norm"}})  # fedavg + detection: buffered
    out = _run_round(spec, glob, [*honest, huge])
    assert out.flagged == ["sim-9"] and out.used == 6
    assert [s.client for s in out.scores] == [c for c, *_ in [*honest, huge]]
    want = weighted_average([u for _, u, _ in honest], [1.0] * 6)
    torch.testing.assert_close(_flat(out.aggregate), _flat(want))


def test_reputation_quarantines_after_k_flags_and_the_state_goes_through_a_checkpoint(tmp_path: Path) -> None:
    glob = _model(0)
    spec = _spec(byzantine={"detection": {"method": "norm"},
                            "reputation": {"k": 2, "window": 3, "quarantineRounds": 4}})
    state = AggregationState()
    ups = [*[(f"sim-{i}", _model(i + 1), 1.0) for i in range(6)], ("sim-9", _model(99, scale=1e4), 1.0)]
    first = _run_round(spec, glob, ups, state, rnd=1)
    assert first.newly_quarantined == []
    save_checkpoint(tmp_path / "c.pt", {"aggregation": first.state.to_dict()})
    restored = AggregationState.from_dict(load_checkpoint(tmp_path / "c.pt")["aggregation"])  # type: ignore[index]
    second = _run_round(spec, glob, ups, restored, rnd=2)
    assert second.newly_quarantined == ["sim-9"]
    assert byzantine.is_quarantined(second.state.reputation, "sim-9", 3)
    assert byzantine.is_quarantined(second.state.reputation, "sim-9", 6)
    assert not byzantine.is_quarantined(second.state.reputation, "sim-9", 7)
    assert not byzantine.is_quarantined(second.state.reputation, "sim-1", 3)


def test_state_round_trips_with_reference(tmp_path: Path) -> None:
    st = AggregationState(reference=torch.arange(5.0))
    save_checkpoint(tmp_path / "c.pt", {"aggregation": {**st.to_dict(), "replay": {"sim-2": torch.ones(5)}}})
    back = AggregationState.from_dict(load_checkpoint(tmp_path / "c.pt")["aggregation"])  # type: ignore[index]
    assert back.reference is not None and torch.equal(back.reference, st.reference)  # type: ignore[arg-type]
    assert "replay" not in back.to_dict()  # replay attackers remember their update themselves now
    assert AggregationState.from_dict({}).reference is None  # a checkpoint from before the pipeline


def test_buffer_memory_is_checked_with_the_number() -> None:
    assert buffer_bytes(10, 1000) == 40_000
    spec = _spec(aggregation={"rule": "median", "maxBufferBytes": 39_999})
    msg = buffer_problem(spec, 1000)
    assert msg is not None and "aggregation.maxBufferBytes=39999" in msg and "40000 bytes" in msg
    assert buffer_problem(_spec(aggregation={"rule": "median", "maxBufferBytes": 40_000}), 1000) is None
    assert buffer_problem(_spec(aggregation={"maxBufferBytes": 1}), 10**9) is None  # fedavg streams
    with pytest.raises(ValueError, match="maxBufferBytes"):
        AggregationPipeline(spec, {"w": torch.zeros(1000)})


def test_attackers_are_chosen_by_count_or_fraction_with_the_seed() -> None:
    a = choose_attackers(_spec(byzantine={"attack": {"type": "sign_flip", "count": 3, "seed": 1}}))
    b = choose_attackers(_spec(byzantine={"attack": {"type": "sign_flip", "fraction": 0.3, "seed": 1}}))
    c = choose_attackers(_spec(byzantine={"attack": {"type": "sign_flip", "count": 3, "seed": 2}}))
    assert a == b and len(a) == 3 and len(set(a)) == 3 and a != c
    assert all(x.startswith("sim-") and 0 <= int(x[4:]) < 10 for x in a)
    assert choose_attackers(_spec()) == ()


def test_attack_rows_rewrite_only_the_attackers() -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    clients = [f"sim-{i}" for i in range(5)]
    bad = frozenset({"sim-1", "sim-3"})
    spec = _spec(byzantine={"attack": {"type": "ipm", "count": 2, "parameters": {"epsilon": 0.5}}})
    assert spec.byzantine.attack is not None
    out = attack_rows(x, clients, bad, spec.byzantine.attack)
    honest = x[[0, 2, 4]]
    torch.testing.assert_close(out[1], -0.5 * honest.mean(0))
    assert torch.equal(out[[0, 2, 4]], honest)
    for client_side in ("sign_flip", "scaled", "gaussian", "replay", "label_flip"):  # done by the clients
        attack = _spec(byzantine={"attack": {"type": client_side, "count": 2}}).byzantine.attack
        assert attack is not None and attack_rows(x, clients, bad, attack) is x


def test_label_flip_poisons_only_the_attackers_data() -> None:
    spec = _spec(byzantine={"attack": {"type": "label_flip", "count": 3}})
    attackers = choose_attackers(spec)
    data = ArrayDataset(torch.zeros(4, 2).numpy(), torch.tensor([0, 1, 2, 9]).numpy(), 10)
    flipped = local_data(spec, attackers[0], data)
    assert flipped.y.tolist() == [9, 8, 7, 0]
    honest = next(f"sim-{i}" for i in range(10) if f"sim-{i}" not in attackers)
    assert local_data(spec, honest, data) is data
    assert not AggregationPipeline(spec, _model(0)).buffered  # label flip needs nothing of the server


def test_the_banner_names_the_attackers_and_the_attack() -> None:
    from federator.runtime.aggregation.attacks import attack_banner

    spec = _spec(byzantine={"attack": {"type": "gaussian", "fraction": 0.2, "parameters": {"std": 2}}})
    banner = attack_banner(spec)
    attackers = choose_attackers(spec)
    assert "ATTACK SIMULATION: 2 of 10 clients attack with gaussian (std=2)" in banner
    assert ", ".join(attackers) in banner and "rewritten by the attacking clients" in banner
    alie = attack_banner(_spec(byzantine={"attack": {"type": "alie", "count": 2}}))
    assert "rewritten by the server" in alie and "simulation of an omniscient attacker" in alie
    flip = attack_banner(_spec(byzantine={"attack": {"type": "label_flip", "count": 1}}))
    assert "poisoned local labels (client side)" in flip


def test_a_buffered_round_gives_the_same_result_whatever_the_arrival_order_and_missing_clients() -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1), float(i + 1)) for i in range(6)]
    spec = _spec(aggregation={"rule": "geometric_median"})
    pipe = AggregationPipeline(spec, glob)
    results = []
    for order, sampled in ((ups, None), (ups[::-1], [c for c, *_ in ups]), (ups[3:] + ups[:3], None)):
        agg = pipe.begin_round(1, glob, 7, sampled)
        for c, p, w in order:
            agg.add(c, p, w)
        results.append(_flat(agg.finish(AggregationState()).aggregate))
    assert all(torch.equal(results[0], r) for r in results[1:])
    # one sampled client never reports: the others' rows are used, in client order
    agg = pipe.begin_round(1, glob, 7, [c for c, *_ in ups] + ["sim-9"])
    for c, p, w in ups[::-1]:
        agg.add(c, p, w)
    assert torch.equal(_flat(agg.finish(AggregationState()).aggregate), results[0])
    with pytest.raises(ValueError, match="not sampled or already reported"):
        agg.add("sim-5", ups[5][1], 1.0)
    with pytest.raises(ValueError, match="not sampled"):
        agg.add("sim-7", ups[0][1], 1.0)


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "median", "geometric_median", "centered_clipping",
                                  "trimmed_mean"])
def test_a_round_of_one_or_two_updates_still_aggregates(rule: str) -> None:
    glob = _model(0)
    spec = _spec(aggregation={"rule": rule}, byzantine={"detection": {"method": "krum"}})
    for n in (1, 2, 3):
        ups = [(f"sim-{i}", _model(i + 1), 1.0) for i in range(n)]
        out = _run_round(spec, glob, ups)
        assert out.used == n and torch.isfinite(_flat(out.aggregate)).all()
        assert out.scores == [] if n < 3 else len(out.scores) == 3
    two = [(f"sim-{i}", _model(i + 1), 1.0) for i in range(2)]
    if rule in ("krum", "multi_krum"):  # nothing to choose between: their mean
        torch.testing.assert_close(_flat(_run_round(spec, glob, two).aggregate),
                                   _flat(weighted_average([u for _, u, _ in two], [1.0, 1.0])))


def test_alie_uses_the_papers_z_and_survives_an_attacker_majority() -> None:
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    clients = [f"sim-{i}" for i in range(10)]
    attack = _spec(byzantine={"attack": {"type": "alie", "count": 3}}).byzantine.attack
    assert attack is not None
    out = attack_rows(x, clients, frozenset(clients[:3]), attack)
    torch.testing.assert_close(out[0], byzantine.alie(x[3:], 10, 3))
    majority = attack_rows(x, clients, frozenset(clients[:7]), attack)
    torch.testing.assert_close(majority[0], x[7:].mean(0) - x[7:].std(0))
