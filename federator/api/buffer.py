"""The memory a buffered round needs, and the check of `aggregation.maxBufferBytes` built on it.

Pure Python (no torch), so `federator validate` and the start of `federator run` (federator/preflight.py)
and the server (the aggregation pipeline) give the same message. Which rules stream is stated here as in
the rule registry (`federator.runtime.aggregation.rules`, `Rule.streaming`); a test keeps the two equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federator.api.models import FederationSpec

FLOAT32_BYTES = 4
STREAMING_RULES = ("fedavg",)  # summed as updates arrive: O(model) memory, never buffered


def buffer_bytes(updates: int, parameters: int) -> int:
    """Memory of a buffered round: one float32 row per update."""
    return updates * parameters * FLOAT32_BYTES


SERVER_ATTACKS = ("alie", "ipm")  # simulated by the server from the round's honest updates (omniscient attackers)


def needs_buffer(spec: FederationSpec) -> bool:
    """True when the round's updates are held together: a robust rule, NNM, detection, or an attack that the
    server simulates (ALIE, IPM: they need the round's honest updates). The other attacks happen on the
    attacking clients, so FedAvg under them still streams."""
    attack = spec.byzantine.attack
    server_attack = attack is not None and attack.type in SERVER_ATTACKS
    return (spec.aggregation.rule not in STREAMING_RULES or spec.aggregation.nnm is not None
            or spec.byzantine.detection is not None or server_attack)


def buffer_problem(spec: FederationSpec, parameters: int) -> str | None:
    """None when a round's buffer fits `aggregation.maxBufferBytes`, else the message with the numbers.

    A round trains at most clients.perRound updates (joined silos are sampled from the same pool)."""
    if not needs_buffer(spec):
        return None
    n = spec.clients.per_round
    need = buffer_bytes(n, parameters)
    limit = spec.aggregation.maxBufferBytes
    if need <= limit:
        return None
    return (f"aggregation.maxBufferBytes={limit} is too small: rule {spec.aggregation.rule} buffers "
            f"clients.perRound={n} updates x {parameters} parameters x 4 bytes = {need} bytes per round; raise "
            f"aggregation.maxBufferBytes to at least {need}, lower clients.perRound, or use rule fedavg without "
            "detection (it streams)")
