"""The committed stubs match protos/ (run `make protos` after editing), and the API keeps to
buf's STANDARD lint conventions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from callshield.v1 import detection_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO = "callshield/v1/detection.proto"
STUBS = ("detection_pb2.py", "detection_pb2.pyi", "detection_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "protos" / PROTO)],
        check=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "callshield" / "v1" / name).read_text()
        committed = (ROOT / "callshield" / "v1" / name).read_text()
        assert fresh == committed, f"callshield/v1/{name} is stale: run `make protos`"


def test_buf_standard_style() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "callshield.v1"
    for enum in file.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), zero
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert all(v.name.startswith(prefix + "_") for v in enum.values), enum.name
    for service in file.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
