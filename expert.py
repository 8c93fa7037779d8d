"""expert.py: scripted LIBERO experts that read privileged sim state, and demo collection in the official layout.

The official LIBERO datasets live on a hub these machines cannot reach, so this module makes real
demonstrations in the simulator instead: a scripted pick-and-place expert (object poses and collision
boxes read from MuJoCo, OSC_POSE delta actions in [-1, 1]) drives the robot, and every successful
episode is written as one `demo_i` of `<data_dir>/<suite>/<task.name>_demo.hdf5` (SPEC.md section 8).

    python expert.py collect --suite libero_object --demos-per-task 50 [--data-dir data] [--tasks 0 1] [--dart-noise 0.1]
    python expert.py measure --suite libero_object [--tasks 0 1] [--n-init 50] [--dart-noise 0.1]

Episode design (matches LIBERO's evaluation loop): env.reset() with random placements, 5 unrecorded
zero actions (objects settle), then every step records (obs, sim state) *before* the action and the
action itself, until the task's success check fires. `init_state` is the first recorded state, so
`env.reset(); env.set_init_state(init_state)` then stepping `actions` replays the demo. (LIBERO's own
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
    "libero_goal": {1, 2, 4, 6, 8},  # the put-X-on-Y tasks
}
UNSUPPORTED = {  # suite -> {task_id: why}
    "libero_goal": {
        0: "open the middle drawer: pulling an articulated drawer is not scripted",
        3: "open the top drawer and put the bowl inside: drawer opening is not scripted",
        5: "push the plate to the front of the stove: pushing is not scripted",
        7: "turn on the stove: knob turning is not scripted",
        9: "put the wine bottle on the rack: inserting into the rack is not scripted",
    },
}
MAX_STEPS = {"libero_object": 300, "libero_spatial": 400, "libero_goal": 400}
N_SETTLE = data.N_SETTLE  # unrecorded zero actions after reset (LIBERO's evaluation does the same)
CAMERAS = ("agentview", "robot0_eye_in_hand")
MJ_BOX = 6  # mujoco.mjtGeom.mjGEOM_BOX


# ----------------------------------------------------------------------------- geometry from the sim
def wrap_half_pi(a):
    """Angle in [-pi/2, pi/2): a parallel gripper is symmetric under a half turn."""
    return (a + np.pi / 2) % np.pi - np.pi / 2


def body_boxes(env, body):
    """[(half_sizes (3,), rotation (3, 3), centre (3,))] of the collision boxes of object `body`."""
    m, d = env.sim.model._model, env.sim.data._data
    bid = env.env.obj_body_id[body]
    return [(m.geom_size[g].copy(), d.geom_xmat[g].reshape(3, 3).copy(), d.geom_xpos[g].copy())
            for g in range(m.ngeom)
            if m.geom_bodyid[g] == bid and m.geom_contype[g] != 0 and m.geom_type[g] == MJ_BOX]


def horizontal_axes(env, body):
    """[(half_length, unit xy axis)] of the biggest collision box's roughly horizontal axes."""
    boxes = body_boxes(env, body)
    if not boxes:
        return []
    half, rot, _ = max(boxes, key=lambda b: np.prod(b[0]))
    axes = []
    for i in range(3):
        if abs(rot[2, i]) < 0.7:  # this box axis lies (mostly) in the table plane
            ax = np.array([rot[0, i], rot[1, i]])
            axes.append((half[i], ax / np.linalg.norm(ax)))
    return axes


def finger_yaw(env):
    """World yaw of the line from the left to the right finger (the gripper's closing axis)."""
    m, d = env.sim.model._model, env.sim.data._data
    v = d.xpos[m.body("gripper0_rightfinger").id] - d.xpos[m.body("gripper0_leftfinger").id]
    return np.arctan2(v[1], v[0])


def other_objects_xy(env, obs, body):
    """xy positions of every other object in the scene (for clearance)."""
    return [obs[n + "_pos"][:2] for n in env.env.obj_body_id if n != body and n + "_pos" in obs]


def clearance(p, others):
    return min((np.linalg.norm(q - p) for q in others), default=1.0)


# ----------------------------------------------------------------------------- grasp choices
def box_grasp(env, obs, body, rng):
    """Grasp a box-like object (cans, bottles, cartons) at its centre height.

    Yaw: close across the narrowest horizontal side of its main collision box. Point: shifted up to
    2.5 cm along its longest horizontal side, towards whichever end is farthest from other objects,
    so the wide Panda hand does not hit neighbours. Returns (xy offset from the object, yaw or None, dz).
    """
    axes = horizontal_axes(env, body)
    if not axes:
        return np.zeros(2), None, 0.0
    _, narrow = min(axes, key=lambda a: a[0])
    yaw = np.arctan2(narrow[1], narrow[0]) + rng.uniform(-0.05, 0.05)
    long_half, long_ax = max(axes, key=lambda a: a[0])
    offset = np.zeros(2)
    if long_half >= 0.03:  # only tall-ish/long objects have room to slide the grasp
        o, others = obs[body + "_pos"][:2], other_objects_xy(env, obs, body)
        offset = max((s * long_ax for s in (-0.025, 0.0, 0.025)), key=lambda off: clearance(o + off, others))
    return offset, yaw, 0.0


def rim_grasp(env, obs, body, rng, radius=0.045, dz=0.035):
    """Grasp a bowl by its rim: one finger inside, one outside the wall at `radius` from its centre.

    The rim point is the one (of 12 around the bowl) farthest from other objects, preferring the side
    facing the robot; the gripper closes radially across the wall.
    """
    o, others = obs[body + "_pos"][:2], other_objects_xy(env, obs, body)
    best, best_score = None, -np.inf
    for th in np.linspace(-np.pi, np.pi, 12, endpoint=False):
        u = np.array([np.cos(th), np.sin(th)])
        score = clearance(o + (radius + 0.03) * u, others) - 0.02 * u[0]  # small bonus for the robot side (-x)
        if score > best_score:
            best, best_score = th, score
    th = best + rng.uniform(-0.1, 0.1)
    u = np.array([np.cos(th), np.sin(th)])
    return radius * u, th, dz


# ----------------------------------------------------------------------------- the expert
class PickPlace:
    """Pick `body` and release it above `target` (a body name), as a small phase machine.

    Phases: 0 hover above the grasp point while turning the yaw, 1 descend, 2 close while still
    approaching slowly, 3 lift to `lift_z` (world z), 4 carry until the object is above the target,
    5 lower until the object's origin is at `release_z` (world z), 6 open while rising slowly, 7 retreat
    up. Every phase ends on what the robot can see or feel, never on a timer alone: closing ends when the
    fingers stop (`Gripper.held`; fully shut means the grasp missed and it starts over), opening ends
    when the fingers are wide open. If the object slips out during the lift, it starts over. Randomness
    (from `rng`): hover and lift heights, gain, release point.
    """

    def __init__(self, env, obs, body, target, rng, grasp=box_grasp, release_z=None, lift_z=0.30):
        self.env, self.body, self.target, self.rng, self.grasp = env, body, target, rng, grasp
        self.z0 = obs[body + "_pos"][2]  # resting height of the object
        self.release_z = None if release_z is None else release_z + rng.uniform(-0.005, 0.005)
        self.hover = 0.12 + rng.uniform(-0.02, 0.02)
        self.lift_z = lift_z + rng.uniform(-0.02, 0.02)
        self.gain = rng.uniform(8.0, 12.0)
        self.place_noise = rng.uniform(-0.008, 0.008, 2)
        self.retries = 0
        self.hand = Hand(env, obs)
        self.start(obs)

    def start(self, obs):
        self.offset, self.yaw, self.grasp_dz = self.grasp(self.env, obs, self.body, self.rng)
        self.phase, self.t = 0, 0

    def next_phase(self):
        self.phase, self.t = self.phase + 1, 0


    def act(self, obs):
        eef, o, tgt_obj = obs["robot0_eef_pos"], obs[self.body + "_pos"], target_pos(self.env, obs, self.target)
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
        else:  # retreat up and wait for the success check
            goal = np.array([eef[0], eef[1], self.lift_z])

        if self.phase == 5:
            self.release_gap = self.hand.gap  # the finger gap on the object when opening starts
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
    shut) and `robot0_eef_quat`. `action` returns a LIBERO OSC_POSE delta action (7,) in [-1, 1]:
    translation towards `goal` (gain per m, capped at `speed`), a rotation that keeps the gripper
    pointing straight down and its closing axis at `self.yaw` (world, rad), and the gripper command +-1.
    """
    OPEN, SHUT, STILL = 0.07, 0.004, 5e-4  # gap wide open, gap with nothing between the fingers, m/step

    def __init__(self, env, obs):
        self.env, self.yaw = env, finger_yaw(env)
        self.gap = self.prev_gap = obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1]
        self.still, self.quat = 0, obs["robot0_eef_quat"]

    def see(self, obs):
        q = obs["robot0_gripper_qpos"]
        self.prev_gap, self.gap, self.quat = self.gap, q[0] - q[1], obs["robot0_eef_quat"]
        self.still = self.still + 1 if abs(self.gap - self.prev_gap) < self.STILL else 0

    def held(self):
        """The closing fingers have stopped on something for two steps."""
        return self.still >= 2 and self.SHUT < self.gap < self.OPEN

    def shut(self):
        return self.still >= 2 and self.gap <= self.SHUT

    def opened(self):
        return self.gap >= self.OPEN

    def yaw_error(self):
        return wrap_half_pi(self.yaw - finger_yaw(self.env))

    def aligned(self):
        return abs(self.yaw_error()) < 0.05

    def action(self, goal, eef, gain, grip, speed=1.0):
        from robosuite.utils.transform_utils import quat2mat
        down = quat2mat(self.quat)[:, 2]  # the hand's approach axis, (0, 0, -1) when vertical
        tilt = np.cross(down, [0.0, 0.0, -1.0])  # world rotation vector (sin of the angle) that rights it
        a = np.zeros(7)
        a[:3] = np.clip(gain * (goal - eef), -speed, speed)
        a[3:5] = np.clip(2.0 * tilt[:2], -1, 1)
        a[5] = np.clip(2.0 * self.yaw_error(), -1, 1)
        a[6] = grip
        return a


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
    (pred, body, where), = goal_of(env)
    z0 = obs[body + "_pos"][2]
    if suite == "libero_object":  # (In <object> basket_1_contain_region), on the floor (z = 0)
        # release low inside the basket: 8 cm above where the object rested on the floor
        return PickPlace(env, obs, body, "basket_1", rng, grasp=box_grasp, release_z=z0 + 0.08, lift_z=0.30)
    if suite == "libero_spatial":  # (On akita_black_bowl_k plate_1), on a table (z about 0.9)
        # rim grasp; set the bowl down 2-3 cm above the plate's origin; lift clear of everything
        plate_z = obs[where + "_pos"][2]
        return PickPlace(env, obs, body, where, rng, grasp=rim_grasp, release_z=plate_z + 0.025,
                         lift_z=max(z0, plate_z) + 0.25)
    if suite == "libero_goal" and pred == "on":  # put X on Y: set it down until Y supports it
        tz = target_pos(env, obs, where)[2]
        grasp = rim_grasp if body.startswith("akita_black_bowl") else box_grasp
        return PickPlace(env, obs, body, where, rng, grasp=grasp, release_z=None, lift_z=max(z0, tz) + 0.25)
    raise NotImplementedError(f"{suite} task {task_id}: no scripted expert")


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
    """Wall seconds for one collected demo with both cameras (env creation excluded; failures included)."""
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
    return (time.time() - t0) if ok else float("nan")


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
    lines = [f"Scripted expert on {args.suite}, official init states 0..{args.n_init - 1} (no cameras{noise}).", "",
             "| task | name | success | mean steps | s / collected demo (2 cameras) |",
             "|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    rates = []
    for t in tasks:
        name = bm.get_task(t).name
        if t not in SUPPORTED.get(args.suite, ()):
            row = f"| {t} | {name} | unsupported: {UNSUPPORTED.get(args.suite, {}).get(t, 'no expert')} | | |"
        else:
            t0 = time.time()
            rate, steps = evaluate_expert(args.suite, t, args.n_init, dart_noise=args.dart_noise)
            rates.append(rate)
            sec = "" if args.no_timing else f"{time_one_demo(args.suite, t):.1f}"
            row = f"| {t} | {name} | {rate:.0%} ({round(rate * args.n_init)}/{args.n_init}) | {steps:.0f} | {sec} |"
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
