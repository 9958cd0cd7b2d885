"""A faster CPU runtime for the CNN stages: ONNX Runtime, exported and parity-checked.

The detector, the verifier, the memory bank, the defect classifier, the category
router and the reranker's image tower each split their work into :meth:`forward`
(the network, and the memory bank's nearest-neighbour search: nearly all the
time) and ``answer`` (a few tensor operations on its output; the
reranker's: its image embeddings against its trained descriptions, what its
parity check compares, while serving ranks them against the descriptions of the
moment). :func:`export_runtime`
exports ``forward`` to ONNX when a version is registered, runs the version's
validation images through both torch and ONNX Runtime, and stores the model
beside the weights with a record of the check (``runtime.json``): the largest
difference of the answer's probabilities, the images it was measured on, and
the time per image of each runtime. An export whose difference is above
``TOLERANCE`` is stored refused, and that version is served in torch.

:func:`attach_runtime` gives a loaded stage the exported forward pass when the
serving configuration asks for ``onnxruntime``, the record accepted it and the
file's sha256 still matches the record (a changed file is refused, as changed
weights are). Grad-CAM heatmaps need gradients, so explained detections run in
torch whatever the runtime.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.artifacts import ArtifactError, ArtifactRegistry, Manifest

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
RECORD_FILE = "runtime.json"
TOLERANCE = 1e-4  # the largest |Δ probability| on the validation split an export may have
OPSET = 17


class OnnxForward:
    """A model's forward pass in ONNX Runtime: a ``(B, 3, S, S)`` batch in, a tensor out.

    Args:
        blob: the ONNX model.
        threads: intra-op threads (the deployment's ``torch_threads``).
    """

    def __init__(self, blob: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            blob, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The forward pass's output for a batch (a tuple where ``forward`` returns one)."""
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        outputs = [torch.from_numpy(x) for x in self.session.run(None, {self.input: array})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def export_onnx(model: torch.nn.Module, input_size: int) -> bytes:
    """``model.forward`` as ONNX, with a dynamic batch axis (on each output too)."""
    model = model.float().eval()
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad():
        traced = model(example)
    count = len(traced) if isinstance(traced, tuple) else 1
    names = ["output"] if count == 1 else [f"output{i}" for i in range(count)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter warns it is the older one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch"}} | {name: {0: "batch"} for name in names},
        )
    return buffer.getvalue()


def _ms_per_image(forward: Callable[[torch.Tensor], Any], batch: torch.Tensor) -> float:
    forward(batch)  # warm
    started = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        forward(batch)
    return round((time.perf_counter() - started) * 1000.0 / (rounds * len(batch)), 3)


def export_runtime(
    registry: ArtifactRegistry,
    manifest: Manifest,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export a registered version to ONNX and check it on ``inputs``; store both.

    Args:
        registry: where the version lives.
        manifest: the version.
        model: its model (eval mode, CPU).
        inputs: preprocessed validation images ``(N, 3, S, S)``.
        tolerance: the largest |Δ probability| accepted.

    Returns:
        The record stored as ``runtime.json``: ``accepted``, ``max_abs_diff``,
        ``images``, ``tolerance``, ``sha256``, ``ms_per_image`` (torch and
        onnxruntime, batch of 8, one thread) and the library versions.
    """
    import onnxruntime as ort

    if not hasattr(model, "answer"):
        raise ArtifactError(f"the {manifest.stage} has no forward pass to export")
    if len(inputs) == 0:
        raise ArtifactError(f"{manifest.category}/{manifest.stage}: no validation images")
    model = model.cpu().float().eval()
    inputs = inputs.float().contiguous()
    blob = export_onnx(model, int(inputs.shape[-1]))
    runner = OnnxForward(blob)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            diffs = []
            for start in range(0, len(inputs), 16):
                batch = inputs[start : start + 16]
                ours = model.answer(model(batch)).probabilities
                theirs = model.answer(runner(batch)).probabilities
                diffs.append(float((ours - theirs).abs().max()))
            sample = inputs[:8] if len(inputs) >= 8 else inputs.repeat(8, 1, 1, 1)[:8]
            speed = {
                "torch": _ms_per_image(model, sample),
                "onnxruntime": _ms_per_image(runner, sample),
            }
    finally:
        torch.set_num_threads(threads)
    max_diff = max(diffs)
    record = {
        "runtime": "onnxruntime",
        "file": ONNX_FILE,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "accepted": max_diff <= tolerance,
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "images": len(inputs),
        "ms_per_image": speed,
        "opset": OPSET,
        "libraries": {"onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]},
    }
    registry.write_extra(manifest, ONNX_FILE, blob)
    registry.write_extra(manifest, RECORD_FILE, json.dumps(record, indent=2).encode())
    return record


def runtime_record(registry: ArtifactRegistry, manifest: Manifest) -> dict[str, Any] | None:
    """A version's export record, or None when it has none."""
    blob = registry.read_extra(manifest, RECORD_FILE)
    return None if blob is None else json.loads(blob)


def attach_runtime(
    registry: ArtifactRegistry, manifest: Manifest, runtime: str, threads: int = 1
) -> OnnxForward | None:
    """The exported forward pass to serve a version with, or None to serve it in torch.

    None when ``runtime`` is ``torch``, the version has no export (its stage
    has none, or it was registered before exports), or its parity check refused it.

    Raises:
        ArtifactError: an unknown runtime, or an exported file that does not match
            its record (a changed file).
    """
    if runtime == "torch":
        return None
    if runtime != "onnxruntime":
        raise ArtifactError(f"unknown runtime {runtime!r}: torch or onnxruntime")
    record = runtime_record(registry, manifest)
    if record is None or not record.get("accepted"):
        return None
    blob = registry.read_extra(manifest, record["file"]) or b""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record["sha256"]:
        raise ArtifactError(
            f"{manifest.category}/{manifest.stage} {manifest.version}: the exported model does "
            f"not match its record (sha256 {digest[:12]}...): refusing a modified file"
        )
    return OnnxForward(blob, threads)
