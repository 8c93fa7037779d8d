"""expert.py: scripted LIBERO experts that read privileged sim state, and demo collection in the official layout.

The official LIBERO datasets live on a hub these machines cannot reach, so this module makes real
demonstrations in the simulator instead: scripted experts, one behaviour per bddl goal predicate
(pick and place, into a drawer after opening it, open a drawer by its handle, turn a knob; object
poses, collision boxes, joints and sites read from MuJoCo, OSC_POSE delta actions in [-1, 1], gripper
+-1) drive the robot, and every successful episode is written as one `demo_i` of
`<data_dir>/<suite>/<task.name>_demo.hdf5` (SPEC.md section 8). Every task of LIBERO-Object, -Spatial
and -Goal is scripted (results/expert_<suite>.md).

    python expert.py collect --suite libero_object --demos-per-task 50 [--data-dir data] [--tasks 0 1] [--dart-noise 0.1]
    python expert.py measure --suite libero_object [--tasks 0 1] [--n-init 50] [--dart-noise 0.1]

Episode design (matches LIBERO's evaluation loop): env.reset() with random placements, 5 unrecorded
zero actions (objects settle), then every step records (obs, sim state) *before* the action and the
action itself, until the task's success check fires. `init_state` is the first recorded state and
`model_file` the scene's XML, so `replay` (the fixtures' poses from the XML, set init_state, step
`actions`) reproduces the demo exactly. (LIBERO's own
create_dataset.py pairs actions[t] with the observation *after* it; here obs[t] is what the expert saw
when it chose actions[t], which is what a policy sees at evaluation.) With --dart-noise the executed
actions are noised and the clean ones recorded (DART), so such demos replay by their states only.
"""
import argparse
import os
import sys
import time

import numpy as np

import data

# Which tasks the expert solves. Tasks not listed are not scripted: `make_expert` raises
# NotImplementedError for them (never a faked demo). Filled from measurements (see README/report).
SUPPORTED = {
    "libero_object": set(range(10)),
    "libero_spatial": set(range(10)),
    "libero_goal": set(range(10)),
}
UNSUPPORTED = {}  # suite -> {task_id: why}
MAX_STEPS = {"libero_object": 300, "libero_spatial": 400, "libero_goal": 600}  # LIBERO evaluates 600
N_SETTLE = data.N_SETTLE  # unrecorded zero actions after reset (LIBERO's evaluation does the same)
CAMERAS = ("agentview", "robot0_eye_in_hand")
MJ_BOX = 6  # mujoco.mjtGeom.mjGEOM_BOX


# ----------------------------------------------------------------------------- geometry from the sim
def body_boxes(env, bid):
    """[(half_sizes (3,), rotation (3, 3), centre (3,))] of the collision boxes of MuJoCo body `bid`."""
    m, d = env.sim.model._model, env.sim.data._data
    return [(m.geom_size[g].copy(), d.geom_xmat[g].reshape(3, 3).copy(), d.geom_xpos[g].copy())
            for g in range(m.ngeom)
            if m.geom_bodyid[g] == bid and m.geom_contype[g] != 0 and m.geom_type[g] == MJ_BOX]


def main_box(env, bid):
    """The biggest collision box of body `bid` (see body_boxes), or None."""
    return max(body_boxes(env, bid), key=lambda b: np.prod(b[0]), default=None)


def horizontal_axes(box):
    """[(half_length, unit xy axis)] of a collision box's roughly horizontal axes."""
    if box is None:
        return []
    half, rot, _ = box
    axes = []
    for i in range(3):
        if abs(rot[2, i]) < 0.7:  # this box axis lies (mostly) in the table plane
            ax = np.array([rot[0, i], rot[1, i]])
            axes.append((half[i], ax / np.linalg.norm(ax)))
    return axes


def scene_boxes(env, exclude=()):
    """World axis-aligned bounding boxes, (N, 2, 3) as [lo, hi], of the collision geoms of every object
    and fixture of the scene (cabinet, stove, rack...) except those named in `exclude`; the robot, the
    table and the floor are not objects."""
    m, d = env.sim.model._model, env.sim.data._data
    roots = {bid: name for name, bid in env.env.obj_body_id.items()}
    out = []
    for g in range(m.ngeom):
        b = m.geom_bodyid[g]
        while b > 0 and b not in roots:
            b = m.body_parentid[b]
        if b == 0 or m.geom_contype[g] == 0 or roots[b] in exclude:
            continue
        rot = d.geom_xmat[g].reshape(3, 3)
        c, h = d.geom_xpos[g] + rot @ m.geom_aabb[g, :3], np.abs(rot) @ m.geom_aabb[g, 3:]
        out.append((c - h, c + h))
    return np.array(out).reshape(-1, 2, 3)


def xy_distance(points, boxes):
    """(P, N) xy distance from each point (P, 2) to each box (N, 2, 3); negative inside a box."""
    dxy = np.maximum(boxes[None, :, 0, :2] - points[:, None], points[:, None] - boxes[None, :, 1, :2])
    return np.linalg.norm(np.maximum(dxy, 0), axis=-1) + np.minimum(dxy.max(-1), 0)


def hand_clearance(boxes, xy, yaw, z):
    """Smallest xy distance (m, negative when overlapping) between the footprint of the open hand pointing
    down with its fingertips' centre at (xy, z) and its closing axis at `yaw`, and the boxes it would hit
    on the way down: the open fingers (10 x 2 cm, tips 9 mm below z) and the palm (21 x 6.5 cm, from
    3 cm above z), as measured on robosuite's Panda hand."""
    u = np.array([np.cos(yaw), np.sin(yaw)])
    v = np.array([-u[1], u[0]])
    room = 1.0
    for along, across, bottom in ((0.05, 0.01, z - 0.009), (0.104, 0.032, z + 0.031)):
        near = boxes[boxes[:, 1, 2] > bottom]
        if len(near):
            pts = np.array([xy + a * u + b * v for a in np.linspace(-along, along, 7) for b in (-across, 0.0, across)])
            room = min(room, float(xy_distance(pts, near).min()))
    return room


# ----------------------------------------------------------------------------- grasp choices
def box_grasp(env, obs, body, rng, place=None):
    """Grasp a box-like object (cans, bottles, cartons) at the centre height of its main collision box, or
    3.5 cm below its top if that is higher.

    Yaw: close across the narrowest horizontal side of that box (either side of a square one). Point:
    shifted up to 2.5 cm along its longest horizontal side. Among these, the choice that leaves the hand
    the most room from other objects and fixtures (hand_clearance) where it picks and, if `place`
    (xyz of the object's origin when placed) is given, where it places. Returns (xy offset from the
    object, yaw or None, dz from its origin).
    """
    box = main_box(env, env.env.obj_body_id[body])
    axes = horizontal_axes(box)
    if not axes:
        return np.zeros(2), None, 0.0
    o, boxes = obs[body + "_pos"], scene_boxes(env, exclude=(body,))
    # mid-body (the origin of some objects, bottles, is at their bottom), but high enough that the palm,
    # 3.1 cm above the fingertips, clears the object's top (a wine bottle is then held by its neck)
    top = max(c[2] + (np.abs(rot) @ half)[2] for half, rot, c in body_boxes(env, env.env.obj_body_id[body]))
    dz = float(max(box[2][2], top - 0.035) - o[2])
    narrow = min(a[0] for a in axes)
    yaws = [np.arctan2(ax[1], ax[0]) for half, ax in axes if half <= narrow + 0.005]
    long_half, long_ax = max(axes, key=lambda a: a[0])
    shifts = (0.0, -0.025, 0.025) if long_half >= 0.03 else (0.0,)  # only long objects have room to slide

    def room(off, yaw):
        r = hand_clearance(boxes, o[:2] + off, yaw, o[2] + dz)
        if place is not None:
            r = min(r, hand_clearance(boxes, place[:2] + off, yaw, place[2] + dz))
        return min(r, 0.08)
    offset, yaw = max(((s * long_ax, yaw) for yaw in yaws for s in shifts), key=lambda c: room(*c))
    return offset, yaw + rng.uniform(-0.05, 0.05), dz


def rim_grasp(env, obs, body, rng, place=None, radius=0.045, dz=0.035):
    """Grasp a bowl by its rim: one finger inside, one outside the wall at `radius` from its centre.

    The rim point is the one (of 12 around the bowl) whose hand footprint has the most room from other
    objects and fixtures (up to 5 cm; hand_clearance) where it picks and, if `place` (xyz of the bowl's
    origin when placed) is given, where it places, preferring the side facing the robot; the gripper
    closes radially across the wall.
    """
    o, boxes = obs[body + "_pos"], scene_boxes(env, exclude=(body,))
    best, best_score = None, -np.inf
    for th in np.linspace(-np.pi, np.pi, 12, endpoint=False):
        u = np.array([np.cos(th), np.sin(th)])
        room = hand_clearance(boxes, o[:2] + radius * u, th, o[2] + dz - 0.01)
        if place is not None:
            room = min(room, hand_clearance(boxes, place[:2] + radius * u, th, place[2] + dz - 0.01))
        score = min(room, 0.05) - 0.02 * u[0]  # small bonus for the robot side (-x)
        if score > best_score:
            best, best_score = th, score
    th = best + rng.uniform(-0.1, 0.1)
    u = np.array([np.cos(th), np.sin(th)])
    return radius * u, th, dz


def is_dish(env, body):
    """A plate: the collision box under its centre is lower than the boxes around it (its rim)."""
    o = env.sim.data.body_xpos[env.env.obj_body_id[body]]
    boxes = body_boxes(env, env.env.obj_body_id[body])
    tops = [c[2] + (np.abs(rot) @ half)[2] for half, rot, c in boxes]
    centre = int(np.argmin([np.linalg.norm(c[:2] - o[:2]) for _, _, c in boxes]))
    return len(boxes) > 2 and tops[centre] < min(t for k, t in enumerate(tops) if k != centre) - 0.005


def dish_grasp(env, obs, body, rng, place=None):
    """Grasp a plate by its rim: the hand over the middle of one of the rim's collision boxes (one finger on
    the floor, one outside), closing radially, fingertips 1 cm below the rim's top; the rim box whose hand
    footprint has the most room (hand_clearance) where it picks and places, preferring the robot side."""
    o, boxes = obs[body + "_pos"], scene_boxes(env, exclude=(body,))
    own = body_boxes(env, env.env.obj_body_id[body])
    rims = [(c[:2] - o[:2], c[2] + (np.abs(rot) @ half)[2]) for half, rot, c in own
            if np.linalg.norm(c[:2] - o[:2]) > 0.02]
    def score(rim):
        (off, top), th = rim, np.arctan2(rim[0][1], rim[0][0])
        room = hand_clearance(boxes, o[:2] + off, th, top - 0.01)
        if place is not None:
            room = min(room, hand_clearance(boxes, place[:2] + off, th, place[2] + top - o[2] - 0.01))
        return min(room, 0.05) - 0.02 * off[0] / (np.linalg.norm(off) + 1e-9)
    off, top = max(rims, key=score)
    return off, float(np.arctan2(off[1], off[0]) + rng.uniform(-0.05, 0.05)), float(top - o[2] - 0.01)


def free_spot(env, obs, body, region=None, around=None, sweep=None):
    """xyz for `body`'s origin where its footprint (its collision boxes, moved there) keeps the most room
    from the other objects (and from the boxes `sweep`): in table region site `region` (LIBERO's
    On(<object>, <table region>) wants it within the region's extent: a 5 x 5 grid inside it, 1.5 cm from
    its edges), or else the nearest of points 8-20 cm from where it is, preferring direction `around`,
    with 1 cm of room."""
    o = obs[body + "_pos"]
    others = scene_boxes(env, exclude=(body,))
    others = others[others[:, 0, 2] < o[2] + 0.05]
    if sweep is not None:
        others = np.concatenate([others, sweep])
    own = np.array([[c_[:2] - o[:2] - (np.abs(r) @ h)[:2], c_[:2] - o[:2] + (np.abs(r) @ h)[:2]]
                    for h, r, c_ in body_boxes(env, env.env.obj_body_id[body])])
    radius = float(np.abs(own).max())

    def room(p):
        return float(xy_distance(np.array([p]), others).min()) - radius if len(others) else 1.0
    if region is not None:
        c, half = target_pos(env, obs, region), np.asarray(env.env.object_sites_dict[region].size[:2]) - 0.015
        best = max((c[:2] + half * [a, b] for a in np.linspace(-1, 1, 5) for b in np.linspace(-1, 1, 5)), key=room)
    else:
        dirs = [np.array([np.cos(a), np.sin(a)]) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
        cands = [o[:2] + d * r for r in (0.08, 0.12, 0.16, 0.2) for d in dirs]
        ok = [p for p in cands if room(p) >= 0.01] or [max(cands, key=room)]
        best = min(ok, key=lambda p: np.linalg.norm(p - o[:2]) - 0.02 * ((p - o[:2]) @ around[:2]) / np.linalg.norm(p - o[:2]))
    return np.array([*best, o[2]])


# ----------------------------------------------------------------------------- the expert
class Script:
    """A scripted behaviour as a phase machine: `phase`, steps `t` spent in it, the `hand`, `done` once
    the behaviour has finished its own motion (a Sequence then starts the next one)."""

    def __init__(self, env, obs, rng):
        self.env, self.rng, self.phase, self.t, self.done, self.retries = env, rng, 0, 0, False, 0
        self.hand = Hand(obs)
        self.gain = rng.uniform(8.0, 12.0)
        self.hover = 0.10 + rng.uniform(-0.02, 0.02)

    def next_phase(self):
        self.phase, self.t = self.phase + 1, 0


class PickPlace(Script):
    """Pick `body` and release it at `target` (a body or site name, or obs -> xyz of the object's origin
    when placed), as a small phase machine.

    Phases: 0 hover above the grasp point while turning the yaw, 1 descend, 2 close while still
    approaching slowly, 3 lift to `lift_z` (world z), 4 carry until the object is above the target,
    5 lower until the object's origin is at `release_z` (world z) or until the target supports it,
    6 open while easing down, 7 retreat up. Every phase ends on what the robot can see or feel, never on
    a timer alone: closing ends when the fingers stop (`Hand.held`; fully shut means the grasp missed
    and it starts over), opening ends when the fingers are wide open. If the object slips out during the
    lift, it starts over. Randomness (from `rng`): hover and lift heights, gain, release point.
    """

    def __init__(self, env, obs, body, target, rng, grasp=box_grasp, release_z=None, lift_z=0.30):
        super().__init__(env, obs, rng)
        self.body, self.grasp = body, grasp
        self.target = target if callable(target) else (lambda o: target_pos(env, o, target))
        self.z0 = obs[body + "_pos"][2]  # resting height of the object
        self.release_z = None if release_z is None else release_z + rng.uniform(-0.005, 0.005)
        self.hover = 0.12 + rng.uniform(-0.02, 0.02)
        self.lift_z = lift_z + rng.uniform(-0.02, 0.02)
        self.place_noise = rng.uniform(-0.008, 0.008, 2)
        self.start(obs)

    def start(self, obs):
        tgt = self.target(obs)
        place = np.array([*tgt[:2], max(tgt[2], self.z0) if self.release_z is None else self.release_z])
        self.offset, self.yaw, self.grasp_dz = self.grasp(self.env, obs, self.body, self.rng, place=place)
        self.phase, self.t = 0, 0

    def act(self, obs):
        eef, o, tgt_obj = obs["robot0_eef_pos"], obs[self.body + "_pos"], self.target(obs)
        grasp_pt = np.array([*(o[:2] + self.offset), o[2] + self.grasp_dz])
        grip, goal, speed = -1.0, eef.copy(), 1.0
        self.hand.see(obs)
        if self.phase in (0, 1) and self.yaw is not None:  # turn the closing axis onto the desired yaw
            self.hand.yaw = self.yaw

        if self.phase == 0:  # hover above the grasp point
            goal = grasp_pt + [0, 0, self.hover]
            if (np.linalg.norm(goal - eef) < 0.01 and self.hand.aligned()) or self.t > 100:
                self.next_phase()
        elif self.phase == 1:  # descend onto it
            goal = grasp_pt
            if np.linalg.norm(goal - eef) < 0.01 or self.t > 30:
                self.next_phase()
        elif self.phase == 2:  # close while still approaching slowly (5 mm below the grasp point)
            grip, goal, speed = 1.0, grasp_pt - [0, 0, 0.005], 0.1
            if self.t >= 2 and self.hand.held():
                self.next_phase()
            elif self.hand.shut() and self.retries < 3:  # closed on nothing: open and try again
                self.retries += 1
                self.start(obs)
        elif self.phase == 3:  # lift straight up, starting slowly
            grip, goal, speed = 1.0, np.array([eef[0], eef[1], self.lift_z]), min(1.0, 0.25 * (self.t + 1))
            if eef[2] > self.lift_z - 0.02:
                self.next_phase()
        elif self.phase == 4:  # carry: put the object's centre over the target
            grip = 1.0
            goal = np.array([*(tgt_obj[:2] + self.place_noise + eef[:2] - o[:2]), self.lift_z])
            self.hold_dz = o[2] - eef[2]  # how the object hangs in the hand (phase 5 watches it change)
            if np.linalg.norm(goal[:2] - eef[:2]) < 0.01 or self.t > 80:
                self.next_phase()
        elif self.phase == 5 and self.release_z is not None:  # lower until the object is at release height
            grip, want = 1.0, self.release_z
            goal = np.array([*(tgt_obj[:2] + self.place_noise + eef[:2] - o[:2]), eef[2] - (o[2] - want)])
            if o[2] - want < 0.01 or self.t > 40:
                self.next_phase()
        elif self.phase == 5:  # lower until the object is supported (it rises in the hand): slowly near the target
            grip, drop = 1.0, max(0.02, o[2] - tgt_obj[2] - 0.04)
            goal = np.array([*(tgt_obj[:2] + self.place_noise + eef[:2] - o[:2]), eef[2] - drop])
            if (o[2] - eef[2]) - self.hold_dz > 0.004 or self.t > 80:
                self.next_phase()
        elif self.phase == 6:  # open while easing down (rising before the fingers are wide open drags it up)
            goal, speed = eef - [0, 0, 0.01], 0.1
            if self.hand.opened():
                self.next_phase()
        else:  # retreat up and wait for the success check (or hand over to the next behaviour)
            goal = np.array([eef[0], eef[1], self.lift_z])
            self.done = eef[2] > self.lift_z - 0.03

        # The object fell out while lifting or carrying: start over (a few times at most).
        if self.phase in (3, 4) and self.t > 15 and o[2] < self.z0 + 0.02 and eef[2] > self.z0 + 0.08 \
                and self.retries < 3:
            self.retries += 1
            self.start(obs)

        self.t += 1
        return self.hand.action(goal, eef, self.gain, grip, speed)


class Hand:
    """What the expert sees of its own hand, and the action that moves it.

    Reads `robot0_gripper_qpos` (the two finger joints, m; gap = q[0] - q[1], 0.08 wide open, about 0.002
    shut) and `robot0_eef_quat` (the hand's y axis is its closing axis, its z axis points from the wrist
    to the fingertips). `action` returns a LIBERO OSC_POSE delta action (7,) in [-1, 1]: translation
    towards `goal` (gain per m, capped at `speed`), a rotation (world axis-angle, as robosuite's OSC
    reads it) towards fingers pointing along `approach` (default straight down) with the closing axis
    along `closing` (or at `yaw` when pointing down; either sign), and the gripper command +-1.
    """
    OPEN, SHUT, STILL = 0.07, 0.004, 5e-4  # gap wide open, gap with nothing between the fingers, m/step
    PAD_OPEN = 0.043  # distance from the hand centre to each finger pad's centre when wide open (m)
    DOWN = np.array([0.0, 0.0, -1.0])
    Q7_MAX = 2.6  # rad: robosuite's Panda joint 7 stops at +-2.9

    def __init__(self, obs):
        self.gap = self.prev_gap = obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1]
        self.still, self.approach, self.chosen = 0, self.DOWN, None
        self.see(obs)
        self.closing = self.rot[:, 1]

    @property
    def yaw(self):
        """World yaw of the current closing axis (rad)."""
        return float(np.arctan2(self.rot[1, 1], self.rot[0, 1]))

    @yaw.setter
    def yaw(self, yaw):
        self.closing = np.array([np.cos(yaw), np.sin(yaw), 0.0])

    def see(self, obs):
        from robosuite.utils.transform_utils import quat2mat
        q = obs["robot0_gripper_qpos"]
        self.prev_gap, self.gap, self.rot = self.gap, q[0] - q[1], quat2mat(obs["robot0_eef_quat"])
        self.q7 = obs["robot0_joint_pos"][6]  # the wrist's last joint turns the hand about its z axis
        self.still = self.still + 1 if abs(self.gap - self.prev_gap) < self.STILL else 0

    def held(self):
        """The closing fingers have stopped on something for two steps."""
        return self.still >= 2 and self.SHUT < self.gap < self.OPEN

    def shut(self):
        return self.still >= 2 and self.gap <= self.SHUT

    def opened(self):
        return self.gap >= self.OPEN

    def rotation_error(self):
        """World rotation vector (rad) from the hand's orientation to the wanted one."""
        from robosuite.utils.transform_utils import mat2quat, quat2axisangle
        z = self.approach / np.linalg.norm(self.approach)
        y = self.closing - (self.closing @ z) * z
        y = y / np.linalg.norm(y)

        def turn(c):  # angle (rad) the hand turns about its own z axis to bring its closing axis onto c
            r1, zh = self.rot[:, 1], self.rot[:, 2]
            return np.arctan2(np.cross(r1, c) @ zh, r1 @ c)
        # A parallel gripper is symmetric under a half turn: of y and -y, the nearer one that keeps the
        # last wrist joint (limits +-2.9 rad, moving with that turn) 0.3 rad inside its range, chosen once
        # per target (never flipped half-way through a turn).
        if self.chosen is None or not np.allclose(self.chosen[0], self.closing):
            best = min((y, -y), key=lambda c: (abs(self.q7 + turn(c)) > self.Q7_MAX, abs(turn(c))))
            self.chosen = (np.array(self.closing, dtype=float), np.sign(best @ y))
        y = y * self.chosen[1]
        want = np.stack([np.cross(y, z), y, z], axis=1)
        return quat2axisangle(mat2quat(want @ self.rot.T))

    def aligned(self):
        return np.linalg.norm(self.rotation_error()) < 0.05

    def action(self, goal, eef, gain, grip, speed=1.0):
        a = np.zeros(7)
        a[:3] = np.clip(gain * (goal - eef), -speed, speed)
        a[3:6] = np.clip(2.0 * self.rotation_error(), -1, 1)
        a[6] = grip
        return a


class Joint:
    """One articulation of a fixture (a drawer's slide, a knob's hinge), read from the simulator.

    `q` is its position (m or rad), `goal` the middle of the range the task's predicate accepts (LIBERO's
    default_open_ranges / default_turnon_ranges of the parent object), `sign` the direction towards it.
    """

    def __init__(self, env, name, ranges, rest=None):
        m = env.sim.model._model
        self.env, self.id = env, m.joint(name).id
        self.adr, self.bid, self.axis = m.jnt_qposadr[self.id], m.jnt_bodyid[self.id], m.jnt_axis[self.id].copy()
        self.goal = float(np.mean(ranges))
        self.rest = self.q() if rest is None else float(rest)  # where it starts from (closed / off)
        self.sign = float(np.sign(self.goal - self.rest))

    def q(self):
        return float(self.env.sim.data._data.qpos[self.adr])

    def reached(self, margin=0.0):
        return self.sign * (self.q() - self.goal) >= margin

    def direction(self):
        """World unit vector along which the joint moves its body towards `goal` (slide joints)."""
        return self.sign * self.env.sim.data._data.xmat[self.bid].reshape(3, 3) @ self.axis


def drawer_of(env, region):
    """The slide Joint of the drawer holding region site `region` (e.g. wooden_cabinet_1_top_region)."""
    site = env.env.object_sites_dict[region]
    arts = env.env.get_object(site.parent_name).object_properties["articulation"]
    return Joint(env, site.joints[0], arts["default_open_ranges"], rest=np.mean(arts["default_close_ranges"]))


class OpenDrawer(Script):
    """Open the drawer of region site `region` (LIBERO's Open predicate) by its handle.

    The handle is the drawer's collision box that sticks out farthest along the opening direction u.
    From above, the hand's 20 cm palm would hit the drawers above, so the hand points its fingers
    horizontally into the drawer (along -u) with its closing axis vertical, as a person does. Phases:
    0 14 cm in front of the handle and above it, pointing down with the closing axis along u (from there
    the turn to horizontal is a pure pitch, clear of the wrist's limits), 1 pitch the fingers horizontal,
    8 cm in front of the handle, 2 slide them over the bar, 3 close on it while already pulling slowly
    (ends when the fingers stop), 4 pull until the slide joint is in the open range, 5 open while easing
    outwards (ends when the fingers are wide open), 6 back off and up, 7 pitch the fingers down again
    (then `done`).
    """

    def __init__(self, env, obs, region, rng):
        super().__init__(env, obs, rng)
        self.joint = drawer_of(env, region)
        self.front = 0.08 + rng.uniform(0.0, 0.02)
        self.depth = rng.uniform(0.002, 0.006)  # how far past the bar's centre the fingertips go

    def handle(self):
        """Centre (3,) of the handle bar (it moves with the drawer)."""
        u = self.joint.direction()
        return max(body_boxes(self.env, self.joint.bid), key=lambda b: b[2] @ u)[2]

    def act(self, obs):
        eef, u = obs["robot0_eef_pos"], self.joint.direction()
        self.hand.see(obs)
        if 1 <= self.phase <= 6:
            self.hand.approach, self.hand.closing = -u, np.array([0.0, 0.0, 1.0])
        else:
            self.hand.approach, self.hand.closing = Hand.DOWN, u
        bar = self.handle()
        grip, speed, goal = -1.0, 1.0, eef.copy()
        if self.phase == 0:  # in front of and above the handle, closing axis along the pull (the palm,
            goal = bar + u * (self.front + 0.06) + [0, 0, 0.05]  # 10 cm to each side of it, clear of the cabinet)
            if (np.linalg.norm(goal - eef) < 0.02 and self.hand.aligned()) or self.t > 100:
                self.next_phase()
        elif self.phase == 1:  # pitch the fingers horizontal, in front of the handle
            goal = bar + u * self.front
            if (np.linalg.norm(goal - eef) < 0.01 and self.hand.aligned()) or self.t > 100:
                self.next_phase()
        elif self.phase == 2:  # slide the fingers over the bar
            goal, speed = bar - u * self.depth, 0.5
            if np.linalg.norm(goal - eef) < 0.005 or self.t > 40:
                self.next_phase()
        elif self.phase == 3:  # close on the bar, already pulling slowly
            grip, goal, speed = 1.0, bar + u * 0.01, 0.15
            if self.t >= 2 and self.hand.held():
                self.next_phase()
            elif self.hand.shut() and self.retries < 3:
                self.retries += 1
                self.phase, self.t = 1, 0
        elif self.phase == 4:  # pull until the joint is in the open range
            grip, goal, speed = 1.0, bar + u * 0.06, 0.3
            if self.joint.reached(0.005):
                self.next_phase()
        elif self.phase == 5:  # let go, easing outwards
            goal, speed = eef + 0.01 * u, 0.1
            if self.hand.opened():
                self.next_phase()
        elif self.phase == 6:  # back off and up
            goal = bar + u * (self.front + 0.04) + [0, 0, 0.08]
            if np.linalg.norm(goal - eef) < 0.02 or self.t > 60:
                self.next_phase()
        else:  # pitch the fingers down again, then hand over
            goal = bar + u * (self.front + 0.04) + [0, 0, 0.08]
            self.done = self.hand.aligned()
        self.t += 1
        return self.hand.action(goal, eef, self.gain, grip, speed)


class TurnKnob(Script):
    """Turn on fixture `body`'s knob (LIBERO's TurnOn predicate: its hinge inside default_turnon_ranges).

    Phases: 0 hover above the knob's hinge axis, closing axis across the knob's main collision box,
    1 descend to 1.2 cm below its top, 2 close (ends when the fingers stop), 3 twist the wrist about the
    hinge axis until the joint is in the on range, 4 open while rising slowly, 5 move up.
    """

    def __init__(self, env, obs, body, rng):
        super().__init__(env, obs, rng)
        obj = env.env.get_object(body)
        self.joint = Joint(env, obj.joints[0], obj.object_properties["articulation"]["default_turnon_ranges"])
        half, rot, c = main_box(env, self.joint.bid)
        _, narrow = min(horizontal_axes((half, rot, c)), key=lambda a: a[0])
        self.yaw = np.arctan2(narrow[1], narrow[0]) + rng.uniform(-0.05, 0.05)
        top = c[2] + (np.abs(rot) @ half)[2]
        self.grip_pt = np.array([*env.sim.data._data.xanchor[self.joint.id][:2], top - 0.012])

    def act(self, obs):
        eef = obs["robot0_eef_pos"]
        self.hand.see(obs)
        grip, goal, speed = -1.0, self.grip_pt.copy(), 1.0
        if self.phase in (0, 1):
            self.hand.yaw = self.yaw
        if self.phase == 0:  # hover above the knob
            goal = self.grip_pt + [0, 0, self.hover]
            if (np.linalg.norm(goal - eef) < 0.01 and self.hand.aligned()) or self.t > 100:
                self.next_phase()
        elif self.phase == 1:  # descend around it
            if np.linalg.norm(goal - eef) < 0.006 or self.t > 40:
                self.next_phase()
        elif self.phase == 2:  # close
            grip, goal, speed = 1.0, self.grip_pt - [0, 0, 0.004], 0.1
            if self.t >= 2 and self.hand.held():
                self.next_phase()
            elif self.hand.shut() and self.retries < 3:
                self.retries += 1
                self.phase, self.t = 0, 0
        elif self.phase == 3:  # twist about the hinge
            grip = 1.0
            self.hand.yaw = self.hand.yaw + self.joint.sign * 0.25
            if self.joint.reached(0.1):
                self.hand.closing = self.hand.rot[:, 1]
                self.next_phase()
        elif self.phase == 4:  # let go
            goal, speed = eef + [0, 0, 0.01], 0.1
            if self.hand.opened():
                self.next_phase()
        else:
            goal = self.grip_pt + [0, 0, self.hover]
            self.done = eef[2] > self.grip_pt[2] + 0.6 * self.hover
        self.t += 1
        return self.hand.action(goal, eef, self.gain, grip, speed)


class Sequence:
    """Experts one after the other: the next is made (from the observation) when the current is `done`."""

    def __init__(self, first, *makers):
        self.current, self.makers = first, list(makers)

    @property
    def phase(self):
        return self.current.phase

    @property
    def done(self):
        return self.current.done and not self.makers

    def act(self, obs):
        if self.current.done and self.makers:
            self.current = self.makers.pop(0)(obs)
        return self.current.act(obs)


def target_pos(env, obs, name):
    """World position of an object (from the observation) or of a region site (from the sim)."""
    if name + "_pos" in obs:
        return obs[name + "_pos"]
    return env.sim.data.get_site_xpos(name).copy()


def goal_of(env):
    """The task's goal predicates from its bddl file, e.g. [['in', 'milk_1', 'basket_1_contain_region']]."""
    return env.env.parsed_problem["goal_state"]


def make_expert(suite, task_id, env, obs, rng):
    """The scripted expert for task `task_id` of `suite`; NotImplementedError if it is not scripted."""
    if task_id not in SUPPORTED.get(suite, ()):
        why = UNSUPPORTED.get(suite, {}).get(task_id, "no scripted expert for this suite")
        raise NotImplementedError(f"{suite} task {task_id}: {why}")
    (pred, body, *where), = goal_of(env)
    if pred == "open":  # Open(<drawer region>), after moving aside what the drawer would hit
        return clear_then(env, obs, body, rng, lambda o: OpenDrawer(env, o, body, rng))
    if pred == "turnon":  # TurnOn(<fixture with a knob>)
        return TurnKnob(env, obs, body, rng)
    where, z0 = where[0], obs[body + "_pos"][2]
    if suite == "libero_object":  # (In <object> basket_1_contain_region), on the floor (z = 0)
        # release low inside the basket: 8 cm above where the object rested on the floor
        return PickPlace(env, obs, body, "basket_1", rng, grasp=box_grasp, release_z=z0 + 0.08, lift_z=0.30)
    if suite == "libero_spatial":  # (On akita_black_bowl_k plate_1), on a table (z about 0.9)
        # rim grasp; set the bowl down 2-3 cm above the plate's origin; lift clear of everything
        plate_z = obs[where + "_pos"][2]
        return PickPlace(env, obs, body, where, rng, grasp=rim_grasp, release_z=plate_z + 0.025,
                         lift_z=max(z0, plate_z) + 0.25)
    site, grasp = env.env.object_sites_dict.get(where), grasp_for(env, body)
    if site is not None and site.parent_name is None:  # On(X, <table region>): set X down in the region
        spot = free_spot(env, obs, body, where)
        return PickPlace(env, obs, body, lambda o: spot, rng, grasp=grasp, lift_z=z0 + 0.15)
    target = (lambda o: on_site(env, o, where)) if site is not None else where
    lift_z = max(z0, target_pos(env, obs, where)[2]) + 0.25
    if site is not None and site.joints:  # In(X, <drawer region>): open the drawer, then put X inside
        put = lambda o: PickPlace(env, o, body, lambda o2: into_drawer(env, o2, where), rng, grasp=grasp,
                                  lift_z=target_pos(env, o, where)[2] + 0.12)
        return clear_then(env, obs, where, rng, lambda o: Sequence(OpenDrawer(env, o, where, rng), put))
    return PickPlace(env, obs, body, target, rng, grasp=grasp, release_z=None, lift_z=lift_z)


def grasp_for(env, body):
    """Bowls by the rim, plates by their rim's collision boxes, anything else across its main box."""
    return rim_grasp if body.startswith("akita_black_bowl") else dish_grasp if is_dish(env, body) else box_grasp


def clear_then(env, obs, region, rng, then):
    """`then(obs)`, or first, if an object stands where the drawer of `region` will slide or under it (its
    collision boxes swept over the opening travel), a PickPlace that moves that object to the nearest spot
    clear of it and of the other objects."""
    joint = drawer_of(env, region)
    u, travel = joint.direction(), abs(joint.goal - joint.q()) + 0.02
    sweep = []
    for half, rot, c in body_boxes(env, joint.bid):
        h = np.abs(rot) @ half
        h = h + 0.005  # a rim 1 mm into the drawer front's path jams it
        sweep.append((np.minimum(c - h, c - h + u * travel), np.maximum(c + h, c + h + u * travel)))
    for name in env.env.objects_dict:
        boxes = scene_boxes(env, exclude=[n for n in env.env.obj_body_id if n != name])
        # in the way, or under the pulled-out drawer where the hand could not reach it from above
        if any(np.all(b[1][:2] > lo[:2]) and np.all(b[0][:2] < hi[:2]) and b[0][2] < hi[2]
               for b in boxes for lo, hi in sweep):
            spot, z0 = free_spot(env, obs, name, around=u, sweep=np.array(sweep)), obs[name + "_pos"][2]
            return Sequence(PickPlace(env, obs, name, lambda o: spot, rng, grasp=grasp_for(env, name),
                                      release_z=z0 + 0.015, lift_z=z0 + 0.12), then)
    return then(obs)


def on_site(env, obs, where):
    """xyz for an object's origin on region site `where` (a fixture's top, a rack's slot).

    LIBERO's On check for a site (SiteObject.under) wants the origin within the site's extent and 0..10 cm
    above it along the site's z axis. A flat site: its centre (the object is lowered until it rests). A
    tilted one (a wine rack's slot, whose z axis points up the slope): 5 cm up that axis and half-way
    to the side nearer the hand, clear of the rack's central post.
    """
    c = target_pos(env, obs, where)
    mat = env.sim.data.get_site_xmat(where)
    if abs(mat[2, 2]) > 0.9:
        return c
    half_x = env.env.object_sites_dict[where].size[0]
    points = [c + mat.T @ np.array([s * half_x, 0.0, 0.05]) for s in (-0.5, 0.5)]  # under() reads mat @ (p - c)
    return min(points, key=lambda p: np.linalg.norm(p[:2] - obs["robot0_eef_pos"][:2]))


def into_drawer(env, obs, where):
    """xyz for an object's origin in drawer region site `where`: the middle of the part of the drawer
    that is pulled out of the cabinet (the site box spans the whole drawer, most of it inside)."""
    joint, c = drawer_of(env, where), target_pos(env, obs, where)
    u = joint.direction()
    site = env.env.object_sites_dict[where]
    half_u = (np.abs(env.sim.data.get_site_xmat(where)) @ np.asarray(site.size)) @ np.abs(u)
    return c + u * (half_u - abs(joint.q() - joint.rest) / 2)


# ----------------------------------------------------------------------------- envs and episodes
def bddl_path(task):
    from libero.libero import get_libero_path
    return os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)


def camera_env_kwargs(task, img_size=128):
    return dict(bddl_file_name=bddl_path(task), camera_heights=img_size, camera_widths=img_size,
                camera_names=list(CAMERAS))


def make_env(task, cameras, img_size=128):
    """OffScreenRenderEnv with both 128x128 cameras, or the cheap ControlEnv without any rendering."""
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv
    if cameras:
        return OffScreenRenderEnv(**camera_env_kwargs(task, img_size))
    return ControlEnv(bddl_file_name=bddl_path(task), use_camera_obs=False, has_offscreen_renderer=False)


def run_episode(env, suite, task_id, rng, init_state=None, max_steps=None, record=False, dart_noise=0.0):
    """One expert episode. Returns (success, n_steps, recorded demo dict or None).

    reset (and set_init_state if given), N_SETTLE zero actions, then the expert acts until `done`
    (the task's success check) or `max_steps`. With record=True, obs and sim state before each action
    are kept with the action, in the official keys.

    dart_noise > 0 is DART (Laskey et al. 2017, "DART: Noise Injection for Robust Imitation Learning"):
    the env executes the expert's action plus Gaussian noise N(0, dart_noise) on the arm dims 0..5
    (clipped to [-1, 1]; the gripper is not noised), the closed-loop expert corrects the drift, and the
    expert's clean action is what is recorded. Such a demo is NOT replayable by its recorded actions
    (its recorded states are what happened).
    """
    obs = env.reset()
    if init_state is not None:
        obs = env.set_init_state(init_state)
    for _ in range(N_SETTLE):
        obs, _, _, _ = env.step(np.zeros(7))
    if record:  # a recorded demo starts as its replay will: its actions then reproduce its states exactly
        obs = restart(env, env.sim.model.get_xml(), env.get_sim_state())
    expert = make_expert(suite, task_id, env, obs, rng)
    noise = np.random.default_rng(rng.integers(2**63)) if dart_noise > 0 else None
    frames, done = [], False
    for t in range(max_steps or MAX_STEPS[suite]):
        action = expert.act(obs)
        if record:
            frames.append((obs, env.get_sim_state().copy(), action))
        executed = action
        if noise is not None:
            executed = action.copy()
            executed[:6] = np.clip(action[:6] + noise.normal(0.0, dart_noise, 6), -1, 1)
        obs, _, done, _ = env.step(executed)
        if done:
            break
    return bool(done), t + 1, (to_demo(env, frames) if record and done else None)


def restart(env, model_file, state):
    """Start `env` from a recorded flattened MuJoCo `state` (qpos, qvel, time; e.g. a demo's init_state) in the scene
    of the demo's `model_file` XML. Returns the observation. The flattened state does not hold the fixtures (cabinet,
    stove, wine rack): LIBERO places them in the model at every reset, up to ~1.6 cm apart, so `reset()` +
    `set_init_state` alone moves a drawer or a knob under the recorded actions. LIBERO's replay
    (scripts/create_dataset.py) reloads the whole model from the XML, but MuJoCo's saved XML does not keep how
    the inertias were computed (reloaded, the bowl weighs 46 g instead of 5.6 g), so only the poses of the
    jointless bodies under the world are taken from it, after a reset. `run_episode` starts every recorded demo
    this way too, so the solver's warm start and the controller's cached pose are a replay's: the actions then
    reproduce the recorded states exactly. Raises ValueError if the XML names a body this env does not have."""
    import xml.etree.ElementTree as ET
    env.reset()
    model = env.sim.model
    for body in ET.fromstring(model_file).find("worldbody").findall("body"):
        if body.find("joint") is None and body.find("freejoint") is None:
            i = model.body_name2id(body.get("name"))
            for key, values in (("pos", model.body_pos), ("quat", model.body_quat)):
                if body.get(key):
                    values[i] = np.array(body.get(key).split(), dtype=float)
    return env.set_init_state(state)


def replay(env, model_file, init_state, actions):
    """Step a demo's `actions` (T, 7) from its `init_state` in its scene (`restart`). Returns the index of the first
    step after which the env's success check fires, or None if it never does."""
    restart(env, model_file, init_state)
    for t, action in enumerate(actions):
        if env.step(action)[2]:
            return t
    return None


def to_demo(env, frames):
    """Recorded (obs, state, action) steps -> one demo dict in the official keys (data.DEMO_KEYS)."""
    from robosuite.utils.transform_utils import quat2axisangle
    obs = [f[0] for f in frames]
    stack = lambda key: np.stack([o[key] for o in obs])
    ee_pos = stack("robot0_eef_pos")
    ee_ori = np.stack([quat2axisangle(o["robot0_eef_quat"]) for o in obs])
    n = len(frames)
    last = np.zeros(n, dtype=np.uint8)
    last[-1] = 1
    states = np.stack([f[1] for f in frames])
    return {
        "obs": {"agentview_rgb": stack("agentview_image"), "eye_in_hand_rgb": stack("robot0_eye_in_hand_image"),
                "joint_states": stack("robot0_joint_pos"), "gripper_states": stack("robot0_gripper_qpos"),
                "ee_pos": ee_pos, "ee_ori": ee_ori, "ee_states": np.concatenate([ee_pos, ee_ori], 1)},
        "actions": np.stack([f[2] for f in frames]), "states": states,
        "robot_states": np.stack([env.env.get_robot_state_vector(o) for o in obs]),
        "rewards": last.copy(), "dones": last,
        "model_file": env.sim.model.get_xml(), "init_state": states[0],
    }


# ----------------------------------------------------------------------------- collection
def save_partial(folder, i, demo):
    """One finished demo of an unfinished task, as <folder>/demo_<i>.npz (written atomically)."""
    os.makedirs(folder, exist_ok=True)
    flat = {("obs/" + k): v for k, v in demo["obs"].items()}
    flat.update({k: v for k, v in demo.items() if k != "obs"})
    flat["model_file"] = np.array(demo["model_file"])
    tmp = os.path.join(folder, f"demo_{i}.tmp.npz")
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, os.path.join(folder, f"demo_{i}.npz"))


def load_partial(folder):
    """The demos saved by save_partial, in order (an empty list if none)."""
    if not os.path.isdir(folder):
        return []
    demos, i = [], 0
    while os.path.exists(os.path.join(folder, f"demo_{i}.npz")):
        with np.load(os.path.join(folder, f"demo_{i}.npz")) as z:
            d = {"obs": {}}
            for k in z.files:
                if k.startswith("obs/"):
                    d["obs"][k[4:]] = z[k]
                else:
                    d[k] = z[k]
        d["model_file"] = str(d["model_file"])
        demos.append(d)
        i += 1
    return demos


def collect(suite, data_dir, demos_per_task, task_ids=None, seed=0, img_size=128, max_steps=None,
            max_tries_factor=3, stats=None, dart_noise=0.0):
    """Collect `demos_per_task` successful expert demos per task into the official layout.

    Writes `<data_dir>/<suite>/<task.name>_demo.hdf5` per task and returns the list of paths. A task
    whose file exists is skipped. Finished demos of an unfinished task are kept in
    `<path>.partial/demo_<i>.npz`, so an interrupted run resumes where it stopped; the hdf5 file is
    written atomically at the end and the side folder removed. Each attempt is seeded from
    (seed, task_id, attempt), so a resumed run continues the same sequence of placements.
    If `stats` is a dict, it gets {task_id: seconds per collected demo} for the demos made now.
    dart_noise > 0 collects DART demos (see run_episode): their recorded actions are the expert's clean
    ones, so they cannot be replayed by their actions; the file's env_args then carry "dart_noise".
    """
    import shutil
    from tqdm import tqdm
    bm = data.suite_benchmark(suite)
    from libero.libero.envs.bddl_utils import get_problem_info
    task_ids = list(range(bm.n_tasks)) if task_ids is None else list(task_ids)
    check_tasks(suite, bm, task_ids)
    paths = []
    for task_id in task_ids:
        task = bm.get_task(task_id)
        path = data.task_file(data_dir, suite, task.name)
        paths.append(path)
        if os.path.exists(path):
            print(f"[expert] {path} exists: skipped")
            continue
        side = path + ".partial"
        demos = load_partial(side)
        env = make_env(task, cameras=True, img_size=img_size) if len(demos) < demos_per_task else None
        attempt = len(demos) * max_tries_factor  # attempts of finished demos are not replayed
        bar = tqdm(total=demos_per_task, initial=len(demos), desc=f"{suite} task {task_id}", unit="demo")
        t0, made, fails = time.time(), 0, 0
        while len(demos) < demos_per_task:
            if fails > max_tries_factor * demos_per_task + 10:  # never loop forever on a task it cannot do
                env.close()
                raise RuntimeError(f"{suite} task {task_id}: the expert failed {fails} times; "
                                   f"only {len(demos)} demos were collected (kept in {side}).")
            np.random.seed([seed, task_id, attempt])  # robosuite's placement samplers draw from np.random
            rng = np.random.default_rng([seed, task_id, attempt])
            attempt += 1
            ok, _, demo = run_episode(env, suite, task_id, rng, max_steps=max_steps, record=True,
                                      dart_noise=dart_noise)
            if not ok:
                fails += 1
                continue
            save_partial(side, len(demos), demo)
            demos.append(demo)
            made += 1
            bar.update(1)
        bar.close()
        if env is not None:
            env.close()
        # env_args as LIBERO's create_dataset.py writes them (the kwargs this module's env was made with)
        problem_name = get_problem_info(bddl_path(task))["problem_name"]
        env_name = "_".join(w.capitalize() for w in problem_name.split("_"))  # e.g. Libero_Floor_Manipulation
        env_args = {"type": 1, "env_name": env_name, "problem_name": problem_name,
                    "bddl_file": bddl_path(task), "env_kwargs": camera_env_kwargs(task, img_size)}
        if dart_noise > 0:
            env_args["dart_noise"] = dart_noise  # actions are the clean expert's, not the executed ones
        data.write_demo_file(path, demos, language=task.language, bddl_file_name=bddl_path(task),
                             env_args=env_args, problem_name=problem_name)
        shutil.rmtree(side, ignore_errors=True)
        if stats is not None and made:
            stats[task_id] = (time.time() - t0) / made
        print(f"[expert] {path}: {len(demos)} demos ({fails} failed attempts)")
    return paths


# ----------------------------------------------------------------------------- measurement
def evaluate_expert(suite, task_id, n_init=50, seed=0, max_steps=None, dart_noise=0.0):
    """Expert success over the first `n_init` official init states of a task (no cameras), optionally
    with DART noise on the executed actions (see run_episode).

    Returns (success rate, mean episode length in steps, excluding the 5 settle steps)."""
    bm = data.suite_benchmark(suite)
    check_tasks(suite, bm, [task_id])
    init_states = bm.get_task_init_states(task_id)[:n_init]
    env = make_env(bm.get_task(task_id), cameras=False)
    results = []
    for i, s in enumerate(init_states):
        np.random.seed([seed, task_id, i])
        ok, n, _ = run_episode(env, suite, task_id, np.random.default_rng([seed, task_id, i]), init_state=s,
                               max_steps=max_steps, dart_noise=dart_noise)
        results.append((ok, n))
    env.close()
    return float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))


def time_one_demo(suite, task_id, seed=0, img_size=128):
    """Wall seconds for one collected demo with both cameras (env creation excluded; failures included); None if 5
    attempts in a row failed."""
    bm = data.suite_benchmark(suite)
    env = make_env(bm.get_task(task_id), cameras=True, img_size=img_size)
    t0, attempt = time.time(), 0
    while True:
        np.random.seed([seed, task_id, 10_000 + attempt])
        ok, _, _ = run_episode(env, suite, task_id, np.random.default_rng([seed, task_id, 10_000 + attempt]),
                               record=True)
        attempt += 1
        if ok or attempt >= 5:
            break
    env.close()
    return (time.time() - t0) if ok else None


def check_tasks(suite, bm, task_ids):
    for t in task_ids:
        if not 0 <= t < bm.n_tasks:
            raise SystemExit(f"--tasks {t}: {suite} has tasks 0..{bm.n_tasks - 1}.")


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="write expert demos in the official hdf5 layout")
    c.add_argument("--suite", required=True)
    c.add_argument("--demos-per-task", type=int, required=True)
    c.add_argument("--data-dir", default="data")
    c.add_argument("--tasks", type=int, nargs="+")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dart-noise", type=float, default=0.0, metavar="SIGMA",
                   help="DART: add N(0, SIGMA) to the executed arm actions; the clean expert action is "
                        "recorded (demos then replay by states, not by actions)")
    m = sub.add_parser("measure", help="expert success over the official init states, as a markdown table")
    m.add_argument("--suite", required=True)
    m.add_argument("--tasks", type=int, nargs="+")
    m.add_argument("--n-init", type=int, default=50)
    m.add_argument("--no-timing", action="store_true", help="skip timing one collected demo with cameras")
    m.add_argument("--out", help="also write the table to this file")
    m.add_argument("--dart-noise", type=float, default=0.0, metavar="SIGMA", help="measure under DART noise")
    args = p.parse_args(argv)

    if args.suite not in data.SUITES:
        raise SystemExit(f"--suite {args.suite!r}: LIBERO has no such suite; choose one of {', '.join(data.SUITES)}.")
    if not 0 <= args.dart_noise < 1:
        raise SystemExit(f"--dart-noise {args.dart_noise}: must be in [0, 1) (a std on actions in [-1, 1]).")
    if args.cmd == "collect":
        if args.demos_per_task < 1:
            raise SystemExit(f"--demos-per-task {args.demos_per_task}: must be at least 1.")
        bm = data.suite_benchmark(args.suite)
        tasks = args.tasks if args.tasks is not None else list(range(bm.n_tasks))
        check_tasks(args.suite, bm, tasks)
        missing = [t for t in tasks if t not in SUPPORTED.get(args.suite, ())]
        if missing:
            raise SystemExit(f"--tasks: no scripted expert for {args.suite} task(s) {missing}; "
                             f"supported: {sorted(SUPPORTED.get(args.suite, ()))}.")
        for path in collect(args.suite, args.data_dir, args.demos_per_task, tasks, seed=args.seed,
                            dart_noise=args.dart_noise):
            print(path)
        return

    if not 1 <= args.n_init <= 50:
        raise SystemExit(f"--n-init {args.n_init}: LIBERO has 50 init states per task.")
    bm = data.suite_benchmark(args.suite)
    tasks = args.tasks if args.tasks is not None else list(range(bm.n_tasks))
    check_tasks(args.suite, bm, tasks)
    noise = f", DART noise {args.dart_noise} on the executed arm actions" if args.dart_noise else ""
    timing = "" if args.no_timing else " s / collected demo (2 cameras) |"
    lines = [f"Scripted expert on {args.suite}, official init states 0..{args.n_init - 1} (no cameras{noise}).", "",
             "| task | name | success | mean steps |" + timing, "|---:|---|---:|---:|" + ("---:|" if timing else "")]
    print("\n".join(lines), flush=True)
    rates = []
    for t in tasks:
        name = bm.get_task(t).name
        if t not in SUPPORTED.get(args.suite, ()):
            row = f"| {t} | {name} | unsupported: {UNSUPPORTED.get(args.suite, {}).get(t, 'no expert')} | |" + " |" * bool(timing)
        else:
            t0 = time.time()
            rate, steps = evaluate_expert(args.suite, t, args.n_init, dart_noise=args.dart_noise)
            rates.append(rate)
            s = None if args.no_timing else time_one_demo(args.suite, t)
            sec = "" if args.no_timing else " n/a (5 attempts failed) |" if s is None else f" {s:.1f} |"
            row = f"| {t} | {name} | {rate:.0%} ({round(rate * args.n_init)}/{args.n_init}) | {steps:.0f} |{sec}"
            print(f"[expert] task {t}: measured in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        lines.append(row)
        print(row, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    if rates:
        lines += ["", f"Mean success over supported tasks: {np.mean(rates):.1%}"]
        print(lines[-1])
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
