"""A scripted LIBERO expert that reads privileged simulator state (object poses and collision
geometry, the BDDL goal), for generating demonstrations. It is not a policy under test.

    expert = PickPlaceExpert(env)          # env: a LIBERO ControlEnv / OffScreenRenderEnv
    expert.reset(obs)
    action = expert.act(obs)               # 7-D delta-pose action for the OSC_POSE controller

Goals: one `in` predicate (object into a container region, libero_object). The state machine:
approach -> descend -> close -> lift -> (grasp check, retry) -> move -> lower -> release -> retreat.
Position: a[:3] = clip(25 (target - eef)) (1 = a 5 cm goal offset); orientation: a P-controller
on a top-down grasp frame Rz(yaw) diag(1, -1, -1); gripper -1 open, +1 closed. The fingers close
along the hand's y axis, so yaw puts that axis across the object's narrowest horizontal width.
"""

from __future__ import annotations

import math

import numpy as np

from quantvla.policy.state import goal_objects, quat_to_mat

APPROACH_HEIGHT = 0.10  # above the grasp point
LIFT_CLEARANCE = 0.05  # object bottom above the container's top
RELEASE_HEIGHT = 0.02  # object bottom above the container's top when opening
CLOSE_STEPS, RELEASE_STEPS = 8, 10
TIMEOUTS = {"approach": 60, "descend": 30, "lift": 40, "move": 60, "lower": 40, "retreat": 30}
MAX_RETRIES = 2


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis * angle of a rotation matrix (angle in [0, pi])."""
    cos = np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    if angle > math.pi - 1e-4:  # near pi the antisymmetric part vanishes: take the axis from r + I
        axis = np.sqrt(np.clip((np.diag(r) + 1) / 2, 0, None))
        i = int(np.argmax(axis))
        axis = (r[:, i] + np.eye(3)[:, i]) / 2
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def top_down(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, -1.0, -1.0])


class Geometry:
    """World bounding boxes of an object's collision geoms, read live from MuJoCo."""

    def __init__(self, env):
        import mujoco
        inner = env.env
        self.m, self.d = inner.sim.model._model, inner.sim.data._data
        self._geoms = {}
        for name, obj in inner.objects_dict.items():
            root = mujoco.mj_name2id(self.m, mujoco.mjtObj.mjOBJ_BODY, obj.root_body)
            self._geoms[name] = [g for g in range(self.m.ngeom)
                                 if self.m.body_rootid[self.m.geom_bodyid[g]] == root
                                 and (self.m.geom_contype[g] or self.m.geom_conaffinity[g])]
        self._signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)

    def corners(self, name: str) -> np.ndarray:
        out = []
        for g in self._geoms[name]:
            centre, half = self.m.geom_aabb[g][:3], self.m.geom_aabb[g][3:]
            local = centre + self._signs * half
            out.append(self.d.geom_xpos[g] + local @ self.d.geom_xmat[g].reshape(3, 3).T)
        return np.concatenate(out)

    def box(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        c = self.corners(name)
        return c.min(0), c.max(0)


class PickPlaceExpert:
    def __init__(self, env):
        self.kind, self.obj, self.container = goal_objects(env)
        self.geometry = Geometry(env)
        self.reset()

    def reset(self, obs: dict | None = None) -> None:
        self.phase, self.phase_steps, self.retries = "plan", 0, 0
        self.grasp = self.yaw = self.start_bottom = self.carry_z = self.hold = None
        self.gripper = -1.0
        self.history: list[np.ndarray] = []

    # -------------------------------------------------------------------- planning
    def _plan_grasp(self) -> None:
        corners = self.geometry.corners(self.obj)
        lo, hi = corners.min(0), corners.max(0)
        height = hi[2] - lo[2]
        z = max(hi[2] - 0.035, lo[2] + height / 2, lo[2] + 0.02)
        # the closing axis across the narrowest horizontal width (15-degree candidates)
        angles = np.deg2rad(np.arange(0, 180, 15))
        widths = [np.ptp(corners[:, :2] @ np.array([math.cos(a), math.sin(a)])) for a in angles]
        theta = angles[int(np.argmin(widths))]
        yaw = (theta + math.pi / 2 + math.pi / 2) % math.pi - math.pi / 2  # hand y axis along theta
        centre = (lo + hi) / 2
        self.grasp = np.array([centre[0], centre[1], z])
        self.yaw, self.start_bottom = yaw, lo[2]

    def _goto(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0
        self.history.clear()

    # --------------------------------------------------------------------- control
    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        if self.phase == "plan":
            self._plan_grasp()
            self._goto("approach")
        target = self._step(eef)
        self.phase_steps += 1
        self.history.append(eef)
        pos = np.clip(25.0 * (target - eef), -1.0, 1.0)
        r_err = top_down(self.yaw) @ quat_to_mat(obs["robot0_eef_quat"]).T
        rot = np.clip(2.0 * rotation_vector(r_err) / 0.5, -1.0, 1.0)
        return np.concatenate([pos, rot, [self.gripper]]).astype(np.float32)

    def _reached(self, eef, target, tol=0.008) -> bool:
        return bool(np.linalg.norm(target - eef) < tol)

    def _stalled(self, eef, target) -> bool:
        """Less than 1 mm of motion over 3 steps while within 3 cm of the target."""
        return (len(self.history) >= 3 and np.linalg.norm(self.history[-3] - eef) < 1e-3
                and np.linalg.norm(target - eef) < 0.03)

    def _timed_out(self) -> bool:
        return self.phase_steps >= TIMEOUTS.get(self.phase, 10 ** 9)

    def _step(self, eef: np.ndarray) -> np.ndarray:
        g = self.geometry
        above = self.grasp + np.array([0, 0, APPROACH_HEIGHT])
        if self.phase == "approach":
            self.gripper = -1.0
            if self._reached(eef, above, 0.01) or self._timed_out():
                self._goto("descend")
            return above
        if self.phase == "descend":
            if self._reached(eef, self.grasp) or self._stalled(eef, self.grasp) or self._timed_out():
                self._goto("close")
            return self.grasp
        if self.phase == "close":
            self.gripper = 1.0
            if self.phase_steps >= CLOSE_STEPS:
                lo, _ = g.box(self.obj)
                _, top = g.box(self.container)
                self.carry_z = eef[2] + (top[2] + LIFT_CLEARANCE - lo[2])
                self._goto("lift")
            return self.grasp
        if self.phase == "lift":
            target = np.array([self.grasp[0], self.grasp[1], self.carry_z])
            if self._reached(eef, target, 0.01) or self._timed_out():
                lo, _ = g.box(self.obj)
                if lo[2] - self.start_bottom > 0.02:
                    self._goto("move")
                elif self.retries < MAX_RETRIES:  # closed on air: open and plan again
                    self.retries += 1
                    self.gripper = -1.0
                    self._plan_grasp()
                    self._goto("approach")
                else:
                    self._goto("retreat")
            return target
        if self.phase in ("move", "lower"):
            lo, hi = g.box(self.obj)
            c_lo, c_hi = g.box(self.container)
            obj_centre = (lo + hi) / 2
            goal_xy = (c_lo[:2] + c_hi[:2]) / 2 + (eef[:2] - obj_centre[:2])
            if self.phase == "move":
                target = np.array([goal_xy[0], goal_xy[1], self.carry_z])
                if self._reached(eef, target, 0.01) or self._timed_out():
                    self._goto("lower")
                return target
            target = np.array([goal_xy[0], goal_xy[1], eef[2] - (lo[2] - (c_hi[2] + RELEASE_HEIGHT))])
            if self._reached(eef, target, 0.008) or self._stalled(eef, target) or self._timed_out():
                self._goto("release")
                self.hold = eef.copy()
            return target
        if self.phase == "release":
            self.gripper = -1.0
            if self.phase_steps >= RELEASE_STEPS:
                self._goto("retreat")
            return self.hold
        # retreat
        self.gripper = -1.0
        return np.array([eef[0], eef[1], self.carry_z or eef[2] + 0.1])
