"""The state-based policies' observation: object-state tokens, a stand-in for the camera
(labelled as such everywhere: these policies never see an image), and their adapter.

Three tokens of OBJECT_DIM numbers each, read from the LIBERO observation dict and the task's goal:
  robot      eef position, eef orientation (first two rotation columns), gripper joints
  object     the goal object's position and orientation, its offset from the eef
  container  the container's position, its offsets from the eef and from the object
A family whose protocol has a proprioceptive state (a config with state_dim) also reads the robot
token's first ROBOT_DIM numbers as its state. Orientations are two rotation-matrix columns, not
axis-angle: a top-down gripper sits at a 180-degree rotation, where axis-angle flips sign.
"""

from __future__ import annotations

import numpy as np
import torch

from quantvla import families
from quantvla.errors import QuantVLAError
from quantvla.models.observation import ModelInputs
from quantvla.policy.adapters import NormStats, WordTokenizer, chunk_to_actions

NUM_OBJECTS, OBJECT_DIM, ROBOT_DIM = 3, 12, 11


def quat_to_mat(q_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = q_xyzw
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def goal_objects(env) -> tuple[str, str, str]:
    """(predicate, object, container object) of a single-predicate goal, e.g.
    ("in", "ketchup_1", "basket_1") for the region basket_1_contain_region. `env`: a LIBERO
    OffScreenRenderEnv (its parsed BDDL problem)."""
    inner = env.env
    goal = inner.parsed_problem["goal_state"]
    if len(goal) != 1 or goal[0][0] != "in":
        raise QuantVLAError(f"the scripted expert handles one 'in' goal (libero_object); this task's goal is {goal}")
    _, obj, region = goal[0]
    owner = next((name for name in inner.objects_dict if region.startswith(name + "_")), None)
    if owner is None:
        raise QuantVLAError(f"no object owns the goal region {region!r}")
    return "in", obj, owner


def _rot6(quat_xyzw) -> np.ndarray:
    return quat_to_mat(np.asarray(quat_xyzw, dtype=np.float64))[:, :2].T.reshape(-1)


def object_tokens(obs: dict, goal: tuple[str, str]) -> np.ndarray:
    """[NUM_OBJECTS, OBJECT_DIM] float32 for goal = (object, container)."""
    obj, container = goal
    eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
    o = np.asarray(obs[f"{obj}_pos"], dtype=np.float64)
    c = np.asarray(obs[f"{container}_pos"], dtype=np.float64)
    robot = np.concatenate([eef, _rot6(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"], [0.0]])
    target = np.concatenate([o, _rot6(obs[f"{obj}_quat"]), o - eef])
    place = np.concatenate([c, c - eef, c - o, np.zeros(3)])
    return np.stack([robot, target, place]).astype(np.float32)


def robot_state(tokens: np.ndarray) -> np.ndarray:
    """The proprioceptive state: the robot token without its padding."""
    return tokens[0, :ROBOT_DIM]


def model_actions(family: str, actions: np.ndarray) -> np.ndarray:
    """Environment actions in the family's own gripper convention, before normalization: a "unit"
    gripper is stored as g in [0, 1] (-1 open -> 1), binarized to sign(1 - 2g) at run time."""
    a = np.asarray(actions, dtype=np.float64).copy()
    if families.get(family).gripper == "unit":
        a[..., 6] = (1.0 - a[..., 6]) / 2.0
    return a


class StateAdapter:
    """LIBERO observation -> ModelInputs with object-state tokens (no images); action chunk -> [T, 7].
    `goal` = (object, container), the task's BDDL goal objects."""

    def __init__(self, family: str, config, tokenizer: WordTokenizer, stats: dict[str, NormStats],
                 goal: tuple[str, str] | None = None):
        self.family, self.config, self.tokenizer, self.stats, self.goal = family, config, tokenizer, stats, goal
        self.action_norm = families.get(family).action_norm

    def normalize(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[..., NUM_OBJECTS, OBJECT_DIM] raw tokens -> normalized objects and (where the family's
        protocol has one) the proprioceptive state."""
        shape = tokens.shape
        flat = self.stats["objects"].normalize(tokens.reshape(*shape[:-2], -1), "mean_std")
        objects = torch.from_numpy(flat.reshape(shape).astype(np.float32))
        state = None
        if getattr(self.config, "state_dim", 0):
            robot = self.stats["state"].normalize(tokens[..., 0, :ROBOT_DIM], "mean_std")
            state = torch.zeros(*shape[:-2], self.config.state_dim)
            state[..., :ROBOT_DIM] = torch.from_numpy(robot.astype(np.float32))
        return objects, state

    def encode(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.tokenizer.encode(t, self.config.max_token_len) for t in instructions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def batch(self, tokens: np.ndarray, instructions: list[str]) -> ModelInputs:
        """Model inputs for a batch of raw object tokens [B, N, D] and their instructions."""
        b = tokens.shape[0]
        objects, state = self.normalize(tokens)
        ids, mask = self.encode(instructions)
        return ModelInputs(torch.zeros(b, 0, 3, 1, 1), torch.zeros(b, 0, dtype=torch.bool), ids, mask, state, objects)

    def inputs(self, obs: dict, instruction: str, n_images: int = 0) -> ModelInputs:
        if self.goal is None:
            raise QuantVLAError("this state-based policy needs the task's goal objects (StateAdapter(goal=...))")
        return self.batch(object_tokens(obs, self.goal)[None], [instruction])

    def target(self, actions: np.ndarray) -> np.ndarray:
        """Environment actions [..., 7] -> the model's normalized training target [..., 7]."""
        a = model_actions(self.family, actions)
        return self.stats["actions"].normalize(a, self.action_norm).astype(np.float32)

    def actions(self, chunk: torch.Tensor) -> np.ndarray:
        a = chunk_to_actions(chunk, self.stats["actions"], self.action_norm, self.family)
        return np.clip(a, -1.0, 1.0)
