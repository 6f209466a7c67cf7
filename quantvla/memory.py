"""Memory of the quantized components (the paper's "LLM+DiT"), counted one way for every model
and every quantizer:

* the components are every linear with role llm, dit_mlp or dit_attn in the FP model;
* the FP16 baseline counts each one's weight at 2 bytes per parameter (this rule reproduces the
  paper's 4.27 GiB for pi0.5 exactly);
* a component counts as quantized by what it stores, not by its class (`is_quantized`): a replaced
  module, a parametrized one, a weight that is a tensor subclass (torchao, optimum-quanto), or a
  weight whose dtype or values changed (fake quantization in place). An unchanged nn.Linear counts
  the same FP16 bytes as the baseline;
* a quantized component counts every tensor it keeps, a tensor subclass through its flatten
  protocol (the inner integer data, scales, zero points; recursively): storage = its state_dict,
  resident = every parameter and buffer alive between calls plus the caches its footprint()
  reports (QuantLinear's oneDNN prepacked weight under the opt-in 'onednn' backend).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from quantvla.quant.linear import QuantLinear

COMPONENT_ROLES = ("llm", "dit_mlp", "dit_attn")
GIB = 2**30


@dataclass
class MemoryReport:
    fp16_bytes: int
    storage_bytes: int
    resident_bytes: int
    components: int
    quantized: int

    @property
    def saving(self) -> float:
        return 1.0 - self.storage_bytes / self.fp16_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(fp16_gib=self.fp16_bytes / GIB, storage_gib=self.storage_bytes / GIB,
                 resident_gib=self.resident_bytes / GIB, saving=self.saving)
        return d


def _fp16(linear: nn.Linear) -> int:
    return linear.weight.numel() * 2


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores. A wrapper tensor subclass (torchao's Int8Tensor, quanto's
    WeightQBytesTensor, a PackedTensor inside it) reports its logical dtype and shape, not its
    storage, so it is counted through its inner tensors (__tensor_flatten__)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _tensor_bytes(tensors) -> int:
    return sum(tensor_bytes(t) for t in tensors if t is not None)


def is_quantized(fp_linear: nn.Linear, module: nn.Module) -> bool:
    """Whether `module`, standing where `fp_linear` stood, was changed by a quantizer: replaced by
    another class (QuantLinear, quanto's QLinear, a parametrized Linear), or an nn.Linear whose weight
    is now a tensor subclass (torchao) or has other dtype or values (fake quantization in place)."""
    if type(module) is not nn.Linear:
        return True
    w, ref = module.weight, fp_linear.weight
    if type(w) not in (torch.Tensor, nn.Parameter):
        return True
    if w is ref:
        return False
    return w.dtype != ref.dtype or w.shape != ref.shape or w.device.type == "meta" or not torch.equal(w, ref)


def _count(fp_model: nn.Module, replacement) -> MemoryReport:
    """replacement(name, fp_linear) -> the module standing at that name in the quantized model."""
    fp16 = storage = resident = n_quant = 0
    mods = dict(fp_model.named_modules())
    names = [n for n, r in fp_model.linear_roles().items() if r in COMPONENT_ROLES]
    for n in names:
        fp16 += _fp16(mods[n])
        m = replacement(n, mods[n])
        if not is_quantized(mods[n], m):
            storage += _fp16(m)
            resident += _fp16(m)
            continue
        n_quant += 1
        storage += _tensor_bytes(m.state_dict().values())
        if isinstance(m, QuantLinear):  # counts its caches too (the onednn backend's prepacked weight)
            resident += m.footprint()["resident"]
        else:
            resident += _tensor_bytes(list(m.parameters()) + list(m.buffers()))
    return MemoryReport(fp16, storage, resident, len(names), n_quant)


def quantized_component_names(fp_model: nn.Module, quantized: nn.Module) -> list[str]:
    """The FP model's linears (every role) that `quantized` holds changed, in module order."""
    q_mods, fp_mods = dict(quantized.named_modules()), dict(fp_model.named_modules())
    return [n for n in fp_model.linear_roles() if n in q_mods and is_quantized(fp_mods[n], q_mods[n])]


def component_memory(fp_model: nn.Module, quantized: nn.Module) -> MemoryReport:
    """Measured: the components of `quantized` (any quantizer) against `fp_model` in FP16."""
    q_mods = dict(quantized.named_modules())
    return _count(fp_model, lambda n, _lin: q_mods[n])


def projected_memory(fp_model: nn.Module, config) -> MemoryReport:
    """The same report for a QuantConfig applied to a model built on the meta device: each selected
    layer becomes a QuantLinear constructed on meta (nothing allocated) whose exact bytes count."""
    from quantvla.api import quantized_layer_names

    selected = set(quantized_layer_names(fp_model, config)) if config.linear is not None else set()

    def replacement(name, lin):
        if name not in selected:
            return lin
        with torch.device("meta"):
            return QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, config.linear, name=name)

    return _count(fp_model, replacement)
