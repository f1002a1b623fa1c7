"""In the cluster, gRPC runs over TLS with the operator's generated CA and server certificate."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from federator.api.models import Federation
from federator.operator.secrets import CA_CERT, TLS_CERT, TLS_KEY, generate_tls
from federator.runtime.client import Worker
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import FederationServer
from tests.helpers.manifests import manifest


def test_round_over_tls_with_operator_certificates(tmp_path: Path) -> None:
    pem = generate_tls(["fed-server", "fed-server.team.svc"])
    fed = Federation.model_validate(manifest(rounds=2, clients={"count": 2, "perRound": 2, "minPerRound": 2}))
    server = FederationServer(fed, tmp_path, ["t"], tls=(pem[TLS_CERT].encode(), pem[TLS_KEY].encode())).start()
    worker = Worker(fed, f"127.0.0.1:{server.port}", "t", tls_ca=pem[CA_CERT].encode(),
                    tls_server_name="fed-server.team.svc")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        # a plaintext client cannot talk to the TLS port
        plain = pb_grpc.FederatorStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as err:
            plain.Join(pb.JoinRequest(token="t"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # nor can a client that trusts another CA
        other = generate_tls(["fed-server"])
        creds = grpc.ssl_channel_credentials(root_certificates=other[CA_CERT].encode())
        channel = grpc.secure_channel(f"127.0.0.1:{server.port}", creds,
                                      options=[("grpc.ssl_target_name_override", "fed-server")])
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.FederatorStub(channel).Join(pb.JoinRequest(token="t"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.run() == 0
        thread.join(30)
    finally:
        worker.close()
        server.stop()
    assert server.completed == 2 and worker.tasks_done == 4
