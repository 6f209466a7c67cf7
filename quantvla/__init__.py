"""quantvla: the reference QuantVLA quantizer with real integer kernels, the pi0.5 and GR00T N1.5
model families, calibration (ATM, OHB) and LIBERO evaluation.

    from quantvla import quantize, CalibrationBuffer
    q = quantize(model, CalibrationBuffer.synthetic(model, 8), "quantvla-w4a8")
"""

__version__ = "0.1.0"  # the one place it is written (pyproject reads it; goldens and reports carry it)

from quantvla.api import QuantizationReport, calibrate, layout_filter, quantize, quantized_layer_names
from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.presets import PRESETS, QuantConfig, preset

__all__ = ["__version__", "quantize", "calibrate", "quantized_layer_names", "layout_filter", "QuantizationReport",
           "CalibrationBuffer", "QuantConfig", "PRESETS", "preset"]
