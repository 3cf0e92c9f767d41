"""Encoder-only ONNX graphs: fp32 from PyTorch, fp16 and int8 variants derived from it.

The graph takes standardised tiles ``tiles [N, 1, t, t]`` (float32; dynamic ``N``)
and returns ``latents [N, L, D]`` (float32), the MAE's deterministic ``embed``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch

from emmae.io.atomic import atomic_path
from emmae.trainer.model import Encoder, MaskedAutoencoder

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
OPSET = 17
INPUT, OUTPUT = "tiles", "latents"


def export_fp32(mae: MaskedAutoencoder, path: Path, opset: int = OPSET) -> Path:
    """Trace ``mae.embed`` to an ONNX graph with a dynamic batch axis."""
    encoder = Encoder(mae).eval().cpu()
    example = torch.zeros(2, 1, mae.arch.tile_px, mae.arch.tile_px)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            encoder, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}}, opset_version=opset, dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


def convert_fp16(src: Path, dst: Path) -> Path:
    """Weights and arithmetic in float16; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    return save_model(model, dst)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of the matrix multiplications (for CPUs).

    Weights use 7 bits (``reduce_range``): on CPUs without VNNI the u8 x s8 kernels
    saturate 16-bit sums with full-range weights (relative latent error 0.12 on such a CPU
    in the parity test, under its 0.1 bound with 7 bits).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], reduce_range=True)
    return dst


def export_variant(mae: MaskedAutoencoder, path: Path, precision: Precision, workdir: Path) -> Path:
    """Export ``mae``'s encoder at ``precision`` to ``path`` (fp16/int8 go through an fp32 graph in ``workdir``)."""
    if precision == "fp32":
        return export_fp32(mae, path)
    fp32 = export_fp32(mae, workdir / "encoder-fp32.onnx")
    return convert_fp16(fp32, path) if precision == "fp16" else quantize_int8(fp32, path)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write an ONNX model atomically."""
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path
