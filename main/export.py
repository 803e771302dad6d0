"""ONNX export of pruned networks, checked against PyTorch with onnxruntime.

    python -m main run=export path=outputs/.../model.pt      # writes model.onnx and export.json next to it
    python -m main run=pruning_final ... export_onnx=true    # the same, right after the final fine-tuning

:func:`export_checked` writes the ONNX file (atomically; batch size dynamic), runs it with onnxruntime's
CPU provider on a batch of real inputs and fails when any logit differs from PyTorch's by more than
``atol`` (1e-4). It also times both runtimes on that batch with the same number of threads. A pruned
network is an ordinary dense network with fewer channels, so it exports as it is; an N:M or unstructured
network exports dense with its zeros (onnxruntime's CPU provider has no sparse kernels).

``onnx``, ``onnxruntime`` and ``onnxscript`` (torch's ONNX exporter) come with the ``export`` extra:
``pip install -c constraints.txt -e ".[export]"``.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from main.run_modes import RUN_MODES, prepare_run
from main.stages import data_for
from utils.checkpoint import load_model
from utils.config_schema import ConfigError
from utils.io import atomic_write_json, make_tempfile
from utils.latency import measure_latency, time_calls

log = logging.getLogger(__name__)

ATOL = 1e-4


class ExportMismatchError(RuntimeError):
    """onnxruntime's logits differ from PyTorch's by more than the tolerance: the exported file is wrong."""


def require_export_extra():
    """The ``onnxruntime`` module; a :class:`ConfigError` saying what to install when the extra is missing."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"ONNX export needs the optional `export` extra ({err.name} is missing): "
                          "pip install -c constraints.txt -e \".[export]\"") from None
    return onnxruntime


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``model`` (eval mode, on CPU) to ``path`` as one ONNX file with a dynamic batch dimension."""
    require_export_extra()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # its per-pass INFO lines would fill the run log
    tmp = make_tempfile(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing notes
            torch.onnx.export(model, (example.cpu(),), tmp, dynamo=True, external_data=False, verbose=False,
                              input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def export_checked(model: torch.nn.Module, inputs: torch.Tensor, path: str | os.PathLike, atol: float = ATOL,
                   repeats: int = 20) -> Dict[str, Any]:
    """Export, check onnxruntime's logits against PyTorch's on ``inputs``, and time both on that batch."""
    ort = require_export_extra()
    model = model.cpu().eval()
    inputs = inputs.cpu()
    path = export_onnx(model, inputs[:2], path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.numpy()}
    with torch.no_grad():
        expected = model(inputs)
    got = torch.from_numpy(session.run(None, feed)[0])
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not diff <= atol:
        raise ExportMismatchError(f"{path}: onnxruntime's logits differ from PyTorch's by {diff:.3g} (> {atol:g}) on "
                                  f"a batch of {inputs.shape[0]}; the exported graph is not the network")
    ort_time = time_calls(lambda: session.run(None, feed), warmup=3, repeats=repeats)
    torch_time = measure_latency(model, inputs, repeats=repeats)
    return {"path": str(path), "bytes": path.stat().st_size, "batch": int(inputs.shape[0]), "max_abs_diff": diff,
            "atol": atol, "threads": torch.get_num_threads(),
            "onnxruntime_ms": ort_time["latency_ms"], "onnxruntime_iqr_ms": ort_time["latency_iqr_ms"],
            "pytorch_ms": torch_time["latency_ms"], "pytorch_iqr_ms": torch_time["latency_iqr_ms"],
            "onnxruntime_version": ort.__version__, "torch_version": torch.__version__}


def real_batch(loader, size: int) -> torch.Tensor:
    """The first ``size`` images of ``loader`` (an evaluation loader: fixed order)."""
    parts, count = [], 0
    for images, _ in loader:
        parts.append(images)
        count += len(images)
        if count >= size:
            break
    return torch.cat(parts)[:size]


@RUN_MODES.register("export")
def export(cfg: DictConfig) -> Dict[str, Any]:
    """``run=export path=<model.pt>``: ``model.onnx`` and ``export.json`` next to ``model.pt``."""
    ctx = prepare_run(cfg)
    if cfg.get("path") is None:
        raise ConfigError("run=export needs the model file as path=..., e.g. "
                          "path=outputs/resnet20_on_digits/pruning_final/<run_name>/<stage>/model.pt")
    source = Path(str(cfg.path))
    require_export_extra()  # before loading anything
    model, payload = load_model(source)
    _, loaders = data_for(cfg, ctx)
    inputs = real_batch(loaders["val"], int(cfg.task.eval_batch_size))
    try:
        with torch.no_grad():
            model.eval()(inputs[:1])
    except RuntimeError as err:
        raise ConfigError(f"{source} does not take task {cfg.task.name}'s inputs {tuple(inputs.shape[1:])} "
                          f"({str(err).splitlines()[0][:120]}); pass the task it was trained on, task=...") from None
    result = export_checked(model, inputs, source.with_suffix(".onnx"))
    atomic_write_json(result, source.with_name("export.json"))
    log.info("exported %s: max |logit difference| %.2g; latency on %d images, %d threads: onnxruntime %.2f ms, "
             "PyTorch %.2f ms", result["path"], result["max_abs_diff"], result["batch"], result["threads"],
             result["onnxruntime_ms"], result["pytorch_ms"])
    return result
