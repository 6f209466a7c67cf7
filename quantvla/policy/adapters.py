"""From a LIBERO observation to model inputs, and from an action chunk to 7-D LIBERO actions.

Per model family, as each model's own LIBERO pipeline does it (the facts are in the family's
record, quantvla.families; shared/docs/models.md has the sources):
  openpi (pi0.5)    both images rotated 180 deg, resized with padding to the model's image size,
                    [-1, 1]; prompt = the task's language; openpi's LIBERO config never feeds the state;
                    actions: the first 7 dims, quantile-unnormalized with q01/q99 (openpi
                    norm_stats.json); the gripper is LIBERO's own (-1 open, +1 closed).
  Isaac-GR00T       images rotated 180 deg, center crop 0.95, resized; state = eef_pos, axis-angle,
  (GR00T N1.5)      gripper_qpos (8-D), min-max normalized, padded; actions: the first 7 dims,
                    unnormalized (min-max, or mean/std), gripper g in [0, 1] -> sign(1 - 2g).
Tokenizers: a small word-level tokenizer ships with the tiny checkpoints; the real PaliGemma
SentencePiece and Qwen3 tokenizer.json load through the optional `tokenizers` extra.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantvla import families
from quantvla.errors import QuantVLAError
from quantvla.io import write_json_atomic
from quantvla.models.observation import ModelInputs

PAD, BOS, UNK = 0, 1, 2


class WordTokenizer:
    """Lower-cased words to ids; 0 pad, 1 bos, 2 unknown. Saved as JSON beside tiny checkpoints."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.ids = {w: i + 3 for i, w in enumerate(self.words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    @classmethod
    def fit(cls, texts) -> WordTokenizer:
        return cls(sorted({w for t in texts for w in cls.split(t)}))

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def encode(self, text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [BOS] + [self.ids.get(w, UNK) for w in self.split(text)]
        ids = ids[:max_len]
        mask = [True] * len(ids) + [False] * (max_len - len(ids))
        return torch.tensor(ids + [PAD] * (max_len - len(ids))), torch.tensor(mask)

    def save(self, path) -> None:
        write_json_atomic(path, {"kind": "word", "words": self.words})

    @classmethod
    def load(cls, path) -> WordTokenizer:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "word":
            raise QuantVLAError(f"{path} is not a word tokenizer file (kind={data.get('kind')!r})")
        return cls(data["words"])


class HFTokenizer:
    """The real tokenizers: PaliGemma's SentencePiece model or Qwen3's tokenizer.json."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            if path.suffix == ".model":
                import sentencepiece
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
                self._encode = lambda text: [self._sp.bos_id()] + self._sp.encode(text)
            else:
                import tokenizers
                tok = tokenizers.Tokenizer.from_file(str(path))
                self._encode = lambda text: tok.encode(text).ids
        except ImportError as err:
            raise QuantVLAError(f"loading {path.name} needs the '{err.name}' package: "
                                "pip install 'pytest-quantvla[tokenizers]'") from None

    def encode(self, text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._encode(text)[:max_len]
        mask = [True] * len(ids) + [False] * (max_len - len(ids))
        return torch.tensor(ids + [PAD] * (max_len - len(ids))), torch.tensor(mask)


def resize_with_pad(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, size, size] in [-1, 1]: aspect kept (bilinear), zero padded."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
    h, w = img.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    img = F.pad(img, (left, size - nw - left, top, size - nh - top))
    return img[0] * 2 - 1


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's quat2axisangle for an xyzw quaternion."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


def libero_state(obs: dict) -> np.ndarray:
    """8-D state: eef position, axis-angle orientation, gripper joint positions."""
    return np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]),
                           obs["robot0_gripper_qpos"]]).astype(np.float32)


@dataclass
class NormStats:
    """Per-dimension statistics for one quantity (state or actions)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    def normalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        lo, hi = self._range(mode)
        if mode == "mean_std":
            return (x - self.mean) / (self.std + 1e-6)
        return (x - lo) / (hi - lo + 1e-8) * 2.0 - 1.0

    def unnormalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        n = len(self.mean)
        x = x[..., :n]
        if mode == "mean_std":
            return x * (self.std + 1e-6) + self.mean
        lo, hi = self._range(mode)
        return (x + 1.0) / 2.0 * (hi - lo + 1e-8) + lo

    def _range(self, mode: str):
        if mode == "quantile":
            return self.q01, self.q99
        if mode == "min_max":
            return self.min, self.max
        if mode == "mean_std":
            return None, None
        raise QuantVLAError(f"unknown normalization {mode!r}; use quantile, min_max or mean_std")

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        arr = lambda k: None if d.get(k) is None else np.asarray(d[k], dtype=np.float64)  # noqa: E731
        return cls(arr("mean"), arr("std"), arr("q01"), arr("q99"), arr("min"), arr("max"))


def load_openpi_norm_stats(path) -> dict[str, NormStats]:
    """openpi's assets/<repo>/norm_stats.json: {"norm_stats": {"state": {...}, "actions": {...}}}."""
    data = json.loads(Path(path).read_text())
    try:
        return {k: NormStats.from_dict(v) for k, v in data["norm_stats"].items()}
    except (KeyError, TypeError) as err:
        raise QuantVLAError(f"{path} is not an openpi norm_stats.json ({err})") from None


class LiberoAdapter:
    """Observation dict + instruction -> ModelInputs; action chunk -> [T, 7] LIBERO actions."""

    def __init__(self, family: str, image_size: int, max_tokens: int, tokenizer, stats: dict[str, NormStats],
                 action_norm: str = "quantile", state_norm: str = "min_max", state_dim: int = 0,
                 discrete_state: bool = False):
        self.family, self.image_size, self.max_tokens = family, image_size, max_tokens
        self.tokenizer, self.stats = tokenizer, stats
        self.action_norm, self.state_norm, self.state_dim = action_norm, state_norm, state_dim
        self.discrete_state = discrete_state  # pi0.5's own protocol: the state is written into the prompt
        self.crop = families.get(family).image_crop

    @classmethod
    def for_config(cls, family: str, config, tokenizer, stats: dict[str, NormStats]) -> LiberoAdapter:
        """The adapter of a model config: its image size, token budget and (where the family's
        protocol has one) state size, with the family's action normalisation."""
        if getattr(config, "discrete_state_input", False):  # pi0.5: quantile-normalized, as openpi does
            return cls(family, config.vision.image, config.max_token_len, tokenizer, stats,
                       action_norm=families.get(family).action_norm, state_norm="quantile", discrete_state=True)
        return cls(family, config.vision.image, config.max_token_len, tokenizer, stats,
                   action_norm=families.get(family).action_norm, state_dim=getattr(config, "state_dim", 0))

    def prompt(self, instruction: str, state: np.ndarray) -> str:
        """The text the model reads: the instruction, and with a discrete-state protocol also the
        state (raw 8-D LIBERO state, normalized here)."""
        if not self.discrete_state:
            return instruction
        return state_prompt(instruction, self.stats["state"].normalize(state, self.state_norm))

    def images(self, obs: dict) -> torch.Tensor:
        out = []
        for key in ("agentview_image", "robot0_eye_in_hand_image"):
            img = np.asarray(obs[key])[::-1, ::-1]  # LIBERO renders upside down
            if self.crop < 1.0:  # GR00T's eval transform: a center crop (0.95) before resizing
                h, w = img.shape[:2]
                ch, cw = round(h * self.crop), round(w * self.crop)
                img = img[(h - ch) // 2: (h - ch) // 2 + ch, (w - cw) // 2: (w - cw) // 2 + cw]
            out.append(resize_with_pad(img, self.image_size))
        return torch.stack(out)

    def inputs(self, obs: dict, instruction: str, n_images: int) -> ModelInputs:
        images = self.images(obs)[:n_images]
        text = self.prompt(instruction, libero_state(obs)) if self.discrete_state else instruction
        tokens, mask = self.tokenizer.encode(text, self.max_tokens)
        state = None
        if self.state_dim:
            s = self.stats["state"].normalize(libero_state(obs), self.state_norm)
            state = torch.zeros(1, self.state_dim)
            state[0, : len(s)] = torch.from_numpy(s.astype(np.float32))
        return ModelInputs(images[None], torch.ones(1, images.shape[0], dtype=torch.bool), tokens[None], mask[None],
                           state)

    def actions(self, chunk: torch.Tensor) -> np.ndarray:
        """[1, T, action_dim] model output -> [T, 7] environment actions."""
        return chunk_to_actions(chunk, self.stats["actions"], self.action_norm, self.family)


STATE_BINS = 256


def state_prompt(instruction: str, normalized_state: np.ndarray) -> str:
    """pi0.5's prompt with the state in it (openpi's tokenizer with discrete_state_input, LeRobot's
    pi05 processor): each normalized dimension cut into 256 equal bins over [-1, 1], written as a
    number: "Task: <instruction>, State: 12 200 ...;\nAction: ". Values outside [-1, 1] take the end
    bins (openpi would write -1 below the range; a word tokenizer has no minus sign)."""
    bins = np.digitize(normalized_state, np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1
    bins = np.clip(bins, 0, STATE_BINS - 1)
    text = instruction.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {text}, State: {' '.join(map(str, bins.tolist()))};\nAction: "


def state_prompt_words() -> list[str]:
    """The words a word tokenizer needs for state prompts, beside the instructions'."""
    return ["task", "state", "action"] + [str(b) for b in range(STATE_BINS)]


def chunk_to_actions(chunk: torch.Tensor, stats: NormStats, norm: str, family: str) -> np.ndarray:
    """[1, T, action_dim] model output -> [T, 7] environment actions: unnormalized; a "unit" gripper
    (GR00T's g in [0, 1]) binarized to sign(1 - 2g)."""
    a = stats.unnormalize(chunk[0, :, :7].double().cpu().numpy(), norm)
    if families.get(family).gripper == "unit":
        a = a.copy()
        a[:, 6] = np.sign(1.0 - 2.0 * a[:, 6])
    return a.astype(np.float32)
