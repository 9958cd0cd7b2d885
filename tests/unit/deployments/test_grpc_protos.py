"""The gRPC modules are what the proto generates, and they describe the Inspect call."""

import sys
from pathlib import Path

from grpc_tools import protoc

from deployments.protos import inspection_pb2, inspection_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]
PROTO = "deployments/protos/inspection.proto"


def test_the_committed_modules_are_what_the_proto_generates(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["protoc", "-I.", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO]
    assert protoc.main(argv) == 0, "protoc failed"
    for name in ("inspection_pb2.py", "inspection_pb2_grpc.py"):
        fresh = (tmp_path / "deployments" / "protos" / name).read_text()
        committed = (ROOT / "deployments" / "protos" / name).read_text()
        assert fresh == committed, f"regenerate {name}: {sys.executable} -m grpc_tools.protoc ..."


def test_the_service_has_the_inspect_call_with_its_fields():
    service = inspection_pb2.DESCRIPTOR.services_by_name["Inspection"]
    assert [m.name for m in service.methods] == ["Inspect"]
    request = inspection_pb2.InspectRequest(image=b"png", category="brushed_metal", boxes=True)
    again = inspection_pb2.InspectRequest.FromString(request.SerializeToString())
    assert (again.image, again.category, again.explain, again.boxes) == (
        b"png",
        "brushed_metal",
        False,
        True,
    )
    assert callable(inspection_pb2_grpc.add_InspectionServicer_to_server)
