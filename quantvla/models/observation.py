"""What a policy model consumes: already-preprocessed tensors (images resized and normalized,
instruction tokens, state). Turning a LIBERO observation into this is the policy adapter's job."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelInputs:
    images: torch.Tensor  # [B, n_images, 3, H, W] float in [-1, 1]
    image_mask: torch.Tensor  # [B, n_images] bool
    tokens: torch.Tensor  # [B, L] int64
    token_mask: torch.Tensor  # [B, L] bool
    state: torch.Tensor | None = None  # [B, state_dim] (GR00T; openpi's LIBERO config feeds none)
    # [B, n_objects, object_dim]: object-state tokens, the state-based stand-in for the camera of
    # the small trained policies (models whose config has object_dim > 0); never a real VLA input
    objects: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> ModelInputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ModelInputs(move(self.images), move(self.image_mask), move(self.tokens), move(self.token_mask),
                           move(self.state), move(self.objects))


def random_inputs(n_images: int, image: int, vocab: int, tokens: int, batch: int = 1, state_dim: int = 0,
                  seed: int = 0, objects: tuple[int, int] = (0, 0)) -> ModelInputs:
    """Deterministic synthetic inputs (for tests, benchmarks and calibration smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, n_images, 3, image, image, generator=g) * 2 - 1
    ids = torch.randint(1, vocab, (batch, tokens), generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, tokens - max(1, tokens // 4):] = False  # some padding, as real prompts have
    state = torch.randn(batch, state_dim, generator=g) if state_dim else None
    n_obj, obj_dim = objects
    obj = torch.randn(batch, n_obj, obj_dim, generator=g) if obj_dim else None
    return ModelInputs(images, torch.ones(batch, n_images, dtype=torch.bool), ids, mask, state, obj)


def initial_noise(config, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The flow-matching start: standard normal [batch, action_horizon, action_dim] (seeded by `generator`)."""
    return torch.randn(batch, config.action_horizon, config.action_dim, generator=generator).to(device)
