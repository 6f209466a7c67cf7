"""Quantizers built with the libraries people use, restricted to the QuantVLA layout (every LLM
linear and the DiT MLPs; DiT attention and the vision tower stay in floating point), as callables
of the quantvla.quantizer protocol with their bit-width declared:

    pytest --quantvla-model=<family> --quantvla-quantizer=quantvla.thirdparty:torchao_int8_dynamic

Needs the optional extra: pip install 'pytest-quantvla[third-party]' (torchao, optimum-quanto).
What runs on CPU (torchao 0.18, optimum-quanto 0.2.7):

* torchao Int8DynamicActivationInt8WeightConfig (w8a8), Int8WeightOnlyConfig (w8a16), and the int4
  weights of IntxWeightOnlyConfig / Int8DynamicActivationIntxWeightConfig (w4a16 / w4a8; torchao
  keeps those int4 values unpacked in int8, which the memory check sees). Int4WeightOnlyConfig has
  no CPU float32 path there (plain and preshuffled need mslk, plain_int32 refuses the CPU,
  tile_packed_to_4d takes bfloat16 only), so it is not offered.
* optimum-quanto qint8 / qint4 weights (w8a16 / w4a16; qint4 packed two per byte, groups of 128),
  and qint8 weights with qint8 activations (w8a8, activation scales calibrated on the buffer).
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from quantvla.api import layout_filter, quantized_layer_names
from quantvla.errors import QuantVLAError
from quantvla.presets import preset

INT4_GROUP = 32  # torchao's intx int4 groups; quanto's qint4 uses its own default (128)


def _library(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise QuantVLAError(f"this quantizer needs {name} ({err}); install it with: "
                            "pip install 'pytest-quantvla[third-party]'") from None


def _declare(bits: str, name: str):
    def mark(fn):
        fn.bits, fn.name = bits, name
        return fn
    return mark


def _torchao(model: nn.Module, config) -> nn.Module:
    quantization = _library("torchao.quantization")
    student = copy.deepcopy(model)
    quantization.quantize_(student, config(quantization), filter_fn=layout_filter(student))
    return student


@_declare("w8a8", "torchao Int8DynamicActivationInt8WeightConfig")
def torchao_int8_dynamic(model, calibration, bits):
    return _torchao(model, lambda q: q.Int8DynamicActivationInt8WeightConfig())


@_declare("w8a16", "torchao Int8WeightOnlyConfig")
def torchao_int8_weight_only(model, calibration, bits):
    return _torchao(model, lambda q: q.Int8WeightOnlyConfig())


def _per_group():
    return _library("torchao.quantization.granularity").PerGroup(INT4_GROUP)


@_declare("w4a16", "torchao IntxWeightOnlyConfig(int4)")
def torchao_int4_weight_only(model, calibration, bits):
    return _torchao(model, lambda q: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=_per_group()))


@_declare("w4a8", "torchao Int8DynamicActivationIntxWeightConfig(int4)")
def torchao_int4_weight_int8_dynamic(model, calibration, bits):
    return _torchao(model, lambda q: q.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                             weight_granularity=_per_group()))


def _quanto(model: nn.Module, calibration, weights: str, activations: str | None) -> nn.Module:
    quanto = _library("optimum.quanto")
    student = copy.deepcopy(model)
    names = quantized_layer_names(student, preset("quantvla-w4a8"))
    quanto.quantize(student, weights=getattr(quanto, weights),
                    activations=None if activations is None else getattr(quanto, activations), include=names)
    if activations is not None:  # static activation scales, recorded over the calibration buffer
        with torch.no_grad(), quanto.Calibration():
            for i in range(len(calibration)):
                student.sample_actions(calibration.inputs[i], calibration.noise[i])
    quanto.freeze(student)
    return student


@_declare("w8a16", "optimum-quanto qint8 weights")
def quanto_qint8(model, calibration, bits):
    return _quanto(model, calibration, "qint8", None)


@_declare("w4a16", "optimum-quanto qint4 weights")
def quanto_qint4(model, calibration, bits):
    return _quanto(model, calibration, "qint4", None)


@_declare("w8a8", "optimum-quanto qint8 weights, qint8 activations")
def quanto_w8a8(model, calibration, bits):
    return _quanto(model, calibration, "qint8", "qint8")


ADAPTERS = {fn.__name__: fn for fn in (torchao_int8_dynamic, torchao_int8_weight_only, torchao_int4_weight_only,
                                       torchao_int4_weight_int8_dynamic, quanto_qint8, quanto_qint4, quanto_w8a8)}
