"""The small trained policies' observation: object-state tokens, a state-based stand-in for the
camera (labelled as such everywhere: these policies never see an image).

Three tokens of OBJECT_DIM numbers each, read from the LIBERO observation dict and the task's goal:
  robot      eef position, eef orientation (first two rotation columns), gripper joints
  object     the goal object's position and orientation, its offset from the eef
  container  the container's position, its offsets from the eef and from the object
GR00T additionally reads the robot token's first 11 numbers as its proprioceptive state.
Orientations are two rotation-matrix columns, not axis-angle: a top-down gripper sits at a
180-degree rotation, where axis-angle flips sign.
"""

from __future__ import annotations

import numpy as np

from quantvla.eval.expert import quat_to_mat

NUM_OBJECTS, OBJECT_DIM, ROBOT_DIM = 3, 12, 11


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
    """GR00T's proprioceptive state: the robot token without its padding."""
    return tokens[0, :ROBOT_DIM]
