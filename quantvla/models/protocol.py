"""How the quantizer sees a model: the only contract between `quant`/calibration and a model.

A model (ours or a third party's) exposes two methods:

    linear_roles() -> dict[str, Role]
        Every nn.Linear by fully qualified name, with its role:
          "llm"       the language backbone's linears (quantized in the QuantVLA layout)
          "dit_mlp"   the action head's MLP linears (quantized)
          "dit_attn"  the action head's attention projections q/k/v/o (kept in floating point)
          "vision"    vision tower and projector (kept; quantized only by the opt-in quantvla-w4a8-vision)
          "other"     embeddings' projections, time/state/action encoders, adaptive-norm denses (kept)

    attention_sites() -> list[AttentionSite]
        One per action-head attention layer. A site lets calibration observe the pre-softmax
        logits per head (masked entries excluded) and the attention output after the output
        projection, and scale them: alpha per head on Q, beta per layer on the output. Both fold
        exactly into weights (rows of W_q for that head and its bias; W_o and its bias), so a
        folded model runs the same operators as the original.

Models implement `AttentionSite` by routing their attention through `attend()` in
`quantvla.models.layers`, which calls the site's observers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

Role = Literal["llm", "dit_mlp", "dit_attn", "vision", "other"]
ROLES: tuple[Role, ...] = ("llm", "dit_mlp", "dit_attn", "vision", "other")

# observer(logits [B, H, Q, K] float32, valid [B or 1, 1 or H, Q, K] bool) -> None
LogitObserver = Callable[[torch.Tensor, torch.Tensor], None]
# observer(z [B, T, D]) -> None, z = the attention output after the output projection
OutputObserver = Callable[[torch.Tensor], None]


@dataclass
class AttentionSite:
    """One action-head attention layer, as calibration sees it."""

    name: str
    num_heads: int
    head_dim: int
    q_proj: nn.Linear
    o_proj: nn.Linear
    logit_observers: list[LogitObserver] = field(default_factory=list)
    output_observers: list[OutputObserver] = field(default_factory=list)
    # run-time scales, applied by attend()/observe_output() when set (calibration and the
    # folded-vs-runtime equivalence test use them; a folded model leaves them None)
    runtime_alpha: torch.Tensor | None = None
    runtime_beta: float | None = None

    @torch.no_grad()
    def fold_alpha(self, alpha: torch.Tensor) -> None:
        """Multiply head h's logits by alpha[h], by scaling that head's rows of W_q (and bias).
        With one shared KV head (pi0.5) this is the only place alpha can go."""
        if alpha.shape != (self.num_heads,):
            raise ValueError(f"{self.name}: alpha must have shape ({self.num_heads},), got {tuple(alpha.shape)}")
        rows = alpha.to(self.q_proj.weight.dtype).repeat_interleave(self.head_dim)
        self.q_proj.weight.mul_(rows[:, None])
        if self.q_proj.bias is not None:
            self.q_proj.bias.mul_(rows)

    @torch.no_grad()
    def fold_beta(self, beta: float) -> None:
        """Multiply the attention output (after W_o) by beta, by scaling W_o and its bias."""
        self.o_proj.weight.mul_(beta)
        if self.o_proj.bias is not None:
            self.o_proj.bias.mul_(beta)


@runtime_checkable
class QuantizableModel(Protocol):
    def linear_roles(self) -> dict[str, Role]: ...

    def attention_sites(self) -> list[AttentionSite]: ...


def count_by_role(model: QuantizableModel) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for role in model.linear_roles().values():
        counts[role] += 1
    return counts
