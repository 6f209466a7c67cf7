"""QuantLinear: an nn.Linear replacement that really computes in integers.

forward(x) = restore( dequant( int_gemm( quant_act( T(x) ), W_q ) ) ) + bias
  T          the optional DuQuant transform (smoothing, rotations, permutation)
  quant_act  per-token dynamic or per-tensor static activation grid (int8 container)
  int_gemm   int8 x int8 -> int32, exact (kernels.py); W_q is int8 or packed int4
  dequant    acc * s_x[m] * s_w[n] in fp32, after the zero-point correction
             acc -= z_x[m] * sum_k W_q[n, k] for asymmetric activations
The source nn.Linear is never modified.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from quantvla.errors import QuantInputError
from quantvla.quant import fused, grids, kernels
from quantvla.quant.config import LinearQuantConfig
from quantvla.quant.duquant import HALF, DuQuantTransform
from quantvla.quant.packing import pack_int4, unpack_int4

# int32 accumulator headroom: K * max|x_q - z| * max|w_q| must stay below 2^31.
ACC_LIMIT = 2**31 - 1


class QuantLinear(nn.Module):
    # buffers (register_buffer below); None where the config has no use for them
    qweight: torch.Tensor
    w_scale: torch.Tensor
    w_sum: torch.Tensor | None
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None
    act_zero: torch.Tensor | None
    _prepacked: kernels.PrepackedWeight | None

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LinearQuantConfig,
                 name: str = ""):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise QuantInputError(f"layer {name or '?'}: empty weight ({out_features} x {in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.name = name
        wb, ab = config.weight.bits, config.act.bits
        x_span = (1 << ab) - 1 if not config.act.symmetric else 1 << (ab - 1)
        if in_features * x_span * (1 << (wb - 1)) > ACC_LIMIT:
            raise QuantInputError(f"layer {self.name_for_errors}: in_features={in_features} overflows the int32 "
                                  f"accumulator at {config.tag}; split the layer or use fewer bits")
        if wb <= 4:
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        # sum_k W_q[n, k], needed only to correct for an asymmetric activation zero point
        self.register_buffer("w_sum", None if config.act.symmetric else torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        static = config.act.granularity == "per_tensor"
        self.register_buffer("act_scale", torch.ones(1) if static else None)
        self.register_buffer("act_zero", torch.zeros(1, dtype=torch.int32) if static and not config.act.symmetric
                             else None)
        self.transform = (DuQuantTransform(in_features, out_features, config.transform)
                          if config.transform is not None else None)
        self._prepacked: kernels.PrepackedWeight | None = None  # onednn backend's cache (W8 only)

    @property
    def name_for_errors(self) -> str:
        return self.name or f"QuantLinear({self.in_features}->{self.out_features})"

    # ---------------------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config: LinearQuantConfig, calib: torch.Tensor | None = None,
                    name: str = "") -> QuantLinear:
        """Quantize `linear` (left untouched). `calib` [T, in_features] are calibration activations,
        needed for static activation scales and for the DuQuant smoothing / greedy rotations."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, name)
        where = layer.name_for_errors
        if w.dim() != 2 or w.shape != (linear.out_features, linear.in_features):
            raise QuantInputError(f"layer {where}: weight has shape {tuple(w.shape)}, expected "
                                  f"({linear.out_features}, {linear.in_features})")
        if not w.is_floating_point():
            raise QuantInputError(f"layer {where}: weight dtype {w.dtype} is not floating point")
        if not torch.isfinite(w).all():
            raise QuantInputError(f"layer {where}: weight contains NaN or Inf; fix the checkpoint before quantizing")
        if linear.bias is not None and not torch.isfinite(linear.bias).all():
            raise QuantInputError(f"layer {where}: bias contains NaN or Inf")
        if calib is not None:
            calib = layer._check_input(calib, "calibration activations").reshape(-1, linear.in_features)
        layer.to(w.device)
        w_t = w.detach().to(torch.float64)
        if layer.transform is not None:
            w_t = layer.transform.fit(w_t, calib).fold_weight(w_t)
        q, scale = grids.quantize_weight(w_t, config.weight)
        if config.weight.rounding == "gptq":
            if calib is None:
                raise QuantInputError(f"layer {where}: GPTQ rounding needs calibration activations "
                                      "(calib=[T, in_features]); or use rounding='nearest'")
            if layer.transform is not None and layer.transform.out_rot is not None:
                raise QuantInputError(f"layer {where}: GPTQ rounding is not supported with the output-side "
                                      "'restore' rotation; use rotation='greedy' or restore_output=False")
            x_t = calib.to(torch.float32)
            x_t = layer.transform.apply_act(x_t) if layer.transform is not None else x_t
            if not bool(torch.isfinite(x_t).all()):
                raise QuantInputError(f"layer {where}: calibration activations contain NaN or Inf")
            q = grids.gptq_round(w_t, scale, x_t, config.weight.bits, config.weight.gptq_damp)
        layer.qweight.copy_(pack_int4(q) if config.weight.bits <= 4 else q)
        layer.w_scale.copy_(scale)
        if layer.w_sum is not None:
            layer.w_sum.copy_(q.to(torch.int32).sum(dim=1))
        if linear.bias is not None:
            cast(torch.Tensor, layer.bias).copy_(linear.bias.detach().to(torch.float32))
        if layer.act_scale is not None:
            if calib is None:
                raise QuantInputError(f"layer {where}: per-tensor activation quantization needs calibration "
                                      "activations (calib=[T, in_features]); or use granularity='per_token'")
            x_t = calib.to(torch.float32)
            if layer.transform is not None:
                x_t = layer.transform.apply_act(x_t)
            s, z = grids.calibrate_static(x_t, config.act)
            layer.act_scale.copy_(s)
            if z is not None:
                cast(torch.Tensor, layer.act_zero).copy_(z)
        return layer

    # --------------------------------------------------------------------------- runtime
    def _check_input(self, x: torch.Tensor, what: str = "input") -> torch.Tensor:
        where = self.name_for_errors
        if not isinstance(x, torch.Tensor):
            raise QuantInputError(f"layer {where}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise QuantInputError(f"layer {where}: {what} dtype {x.dtype} is not floating point; "
                                  "pass float32, float16 or bfloat16")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise QuantInputError(f"layer {where}: {what} has shape {tuple(x.shape)}, expected (..., "
                                  f"{self.in_features})")
        if x.numel() == 0:
            raise QuantInputError(f"layer {where}: {what} is empty (shape {tuple(x.shape)})")
        return x

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, grids.QuantizedActivation]:
        """[M, K] fp32 (or bf16 / fp16, see forward) -> (transformed activations, their integer form)."""
        if self.transform is not None:
            x2 = self.transform.apply_act(x2)
        qa = grids.quantize_activation(x2, self.config.act, self.act_scale, self.act_zero)
        # Any NaN/Inf in a row makes its scale non-finite (per token), or survives the transform.
        if not bool(torch.isfinite(qa.scale).all()) or (
                self.act_scale is not None and not bool(torch.isfinite(x2).all())):
            raise QuantInputError(f"layer {self.name_for_errors}: input contains NaN or Inf")
        return x2, qa

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        # Every line below is one pass or none: no work here is the same on every call (the rotations'
        # index work is cached in their plans), and no-op conversions are not dispatched.
        x = self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = backend or self.config.backend
        if fused._forward == "fused":  # widened once, for the fused call and, if it declines, the eager one
            x2 = x2 if x2.dtype == torch.float32 else x2.to(torch.float32)
            y = fused.run(self, x2, backend)
            if y is not None:  # the same bits in one C++ call (fused.py); None: this layer runs eagerly
                return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*lead, self.out_features)
        # bf16 / fp16 activations stay as they are where the first step on them (the smoothing
        # division, or the activation grid) widens them to fp32 in its own pass: the same bits as a
        # widening pass first (it is exact), one [M, K] pass and its fp32 copy fewer
        if x2.dtype != torch.float32 and not (x2.dtype in HALF and (
                self.transform is None or self.transform.smooth is not None)):
            x2 = x2.to(torch.float32)
        _, qa = self.quantize_input(x2)
        acc = kernels.int_linear(qa.q, self.qweight, self.in_features, self.config.weight.bits, backend,
                                 self._prepacked_weight() if backend == "onednn" else None)
        if qa.zero is not None:  # acc -= z_x (outer) w_sum, exact in int32 (asymmetric grids keep w_sum)
            w_sum = cast(torch.Tensor, self.w_sum)
            if acc.is_cpu:  # one pass, no [M, N] temporary
                acc.addr_(qa.zero.view(-1).expand(acc.shape[0]), w_sum, alpha=-1)
            else:
                acc.sub_(qa.zero * w_sum)
        # fixed epilogue order, shared by every backend: ((float(acc) * s_x) * s_w) (restore) + bias;
        # int32 * float32 promotes in the same pass as the cast (bit-identical to cast, then multiply)
        y = torch.mul(acc, qa.scale).mul_(self.w_scale)
        if self.transform is not None:
            y = self.transform.restore_output(y)
        if self.bias is not None:
            y.add_(self.bias)
        # a half-precision model's output is narrowed in a pass of its own: folding it into the last
        # epilogue pass (out=) was 1.4-1.6x slower per pass on CPU (ATen's mixed-dtype loop, measured)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*lead, self.out_features)

    def _prepacked_weight(self) -> kernels.PrepackedWeight | None:
        """The oneDNN copy of qweight, built on first use and rebuilt if qweight changed in place."""
        if self.config.weight.bits <= 4 or not self.qweight.is_cpu or not kernels.onednn_ok():
            return None
        pk = self._prepacked
        if pk is None or pk.source != kernels.weight_identity(self.qweight):
            self._prepacked = pk = kernels.onednn_prepack(self.qweight)
        return pk

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:  # .to(), .cuda(): the cache follows qweight lazily
        self._prepacked = None
        self.__dict__.pop("_fused_args", None)
        return cast(QuantLinear, super()._apply(fn, recurse))  # type: ignore[no-untyped-call]

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: the opaque oneDNN tensor is a cache, not state
        state = {**self.__dict__, "_prepacked": None}
        state.pop("_fused_args", None)  # the fused forward's argument cache (fused.py), rebuilt on use
        return state

    # ---------------------------------------------------------------------- inspection
    def int_weight(self) -> torch.Tensor:
        """The integer weight as int8 [N, K] (unpacked for int4)."""
        if self.config.weight.bits <= 4:
            return unpack_int4(self.qweight, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """W_q * s_w in the transformed basis, float32 [N, K]."""
        return self.int_weight().to(torch.float32) * self.w_scale[:, None]

    @property
    def nbytes(self) -> dict[str, int]:
        """Exact bytes this layer stores (its state_dict), by part, plus 'total'."""
        parts = {name: t.numel() * t.element_size() for name, t in self.state_dict().items()}
        parts["total"] = sum(parts.values())
        return parts

    def footprint(self) -> dict[str, int]:
        """Storage (what is saved and loaded) and resident (what stays alive between calls) bytes.

        Resident adds two caches: the opt-in 'onednn' backend's prepacked W8 weight (about N*K
        bytes), and the DuQuant rotations' reflection plans (two vectors of n_blocks per reflection
        step, built on the first call). Nothing else is cached: no unpacked weight or
        rotation matrix; W4 weights are unpacked tile by tile into a per-thread scratch shared by
        all layers (kernels.scratch_nbytes(), at most 1.5 x kernels.CPU_SCRATCH_BYTES: the u8_weight GEMM
        adds a half-size nibble temporary)."""
        storage = self.nbytes["total"]
        resident = sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))
        if self.transform is not None:
            resident += self.transform.cache_nbytes()
        if self._prepacked is not None:
            resident += self._prepacked.nbytes
        return {"storage": storage, "resident": resident}

    def extra_repr(self) -> str:
        c = self.config
        act = f"{c.act.granularity}-{'sym' if c.act.symmetric else 'asym'}"
        packed = ", int4-packed" if c.weight.bits <= 4 else ""
        name = f"name={self.name}, " if self.name else ""
        return (f"{name}in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {c.tag}{packed}, act={act}, backend={c.backend}, "
                f"bytes={self.nbytes['total']}")
