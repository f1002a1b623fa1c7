"""The generated gRPC code is committed; it must match what federator.proto generates (like Flower's check)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "federator" / "runtime" / "proto"


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    work = tmp_path / "federator" / "runtime" / "proto"
    work.mkdir(parents=True)
    shutil.copy(PROTO_DIR / "federator.proto", work)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.", "--pyi_out=.",
         "federator/runtime/proto/federator.proto"],
        cwd=tmp_path, check=True,
    )
    for name in ("federator_pb2.py", "federator_pb2.pyi", "federator_pb2_grpc.py"):
        assert (work / name).read_text() == (PROTO_DIR / name).read_text(), f"{name} drifted: run `make protos`"
