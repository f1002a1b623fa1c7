"""The server's `GET /status` payload: one model for the runtime that writes it and the operator that
reads it (and the tests that fake it), so the two ends cannot drift apart.

Extra fields are allowed and kept: a newer server may report more (a byzantine table, warnings) and an
older operator still reads what it knows; `model_dump()` returns them with the declared ones. The
declared fields are what the operator copies into a Federation's and a FederatedClient's status.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from federator.api.models import FlaggedClient, Phase


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SiloStatus(_Open):
    """One silo (FederatedClient) as the server sees it."""

    joined: bool = False
    roundsParticipated: Annotated[int, Field(ge=0)] = 0
    lastUpdateTime: str | None = None
    flagged: bool = False


class ClientCountsStatus(_Open):
    connected: Annotated[int, Field(ge=0, description="Workers connected now.")] = 0
    participants: Annotated[int, Field(ge=0, description="Updates accepted in the last round.")] = 0


class ServerStatus(_Open):
    """What the server reports about its federation."""

    federation: str = ""
    phase: Phase
    round: Annotated[int, Field(ge=0, description="Rounds completed.")]
    rounds: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    epsilon: float | None = None
    clients: ClientCountsStatus = ClientCountsStatus()
    byzantineFlagged: Annotated[int, Field(ge=0)] = 0
    flaggedClients: list[FlaggedClient] = []
    compressionRatio: float | None = None
    pendingTasks: Annotated[int, Field(ge=0)] = 0
    message: str = ""
    roundStartedAt: float | None = None
    silos: dict[str, SiloStatus] = {}

    def payload(self) -> dict[str, Any]:
        """The JSON the server sends (extra fields included)."""
        return self.model_dump(mode="json")
