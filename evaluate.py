"""evaluate.py: rollouts in the real LIBERO simulator, the success matrix, and FWT / NBT / AUC.

    python evaluate.py --checkpoint runs/libero_object_m2distill_s10000/task2.pt --suite libero_object
    python evaluate.py --aggregate 'runs/*' --png table.png      # the paper-style table of many runs (aggregate.py)

An episode follows LIBERO's protocol (libero/lifelong/metric.py, evaluate_one_task_success): `env.reset()`,
`env.set_init_state` with one of the task's 50 fixed init states (episode i takes state i mod 50), 5 zero actions,
then the policy acts, its latent queue reset, until the env says `done` (success) or `max_steps`. Episodes run in `spawn` worker processes, each
with its own policy (one thread, batch norms folded: ~33 ms at batch 1 and 128 px against ~170 ms of simulation
and rendering per step) and one env, kept until the task changes; a broken simulator stops them (Evaluator)."""
import argparse
import contextlib
import math
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import textwrap
import threading
import time
import traceback
from multiprocessing.connection import wait

import numpy as np
import torch
from tqdm import tqdm

import data
from data import CAMERAS, N_SETTLE

# dataset key -> env observation key (LIBERO's obs_key_mapping)
ENV_KEYS = {"agentview_rgb": "agentview_image", "eye_in_hand_rgb": "robot0_eye_in_hand_image",
            "joint_states": "robot0_joint_pos", "gripper_states": "robot0_gripper_qpos"}


# ----------------------------------------------------------------------------- one episode
def make_env(suite, task_id):
    """LIBERO's OffScreenRenderEnv for one task (128x128 agentview and eye-in-hand) and its init states."""
    bench = data.suite_benchmark(suite)
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    task = bench.get_task(task_id)
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                         task.bddl_file), camera_heights=128, camera_widths=128)
    env.seed(0)
    return env, bench.get_task_init_states(task_id)


def policy_obs(obs, img_size):
    """One env observation -> the policy's input: dataset keys, batch 1, images uint8 (1, s, s, 3)."""
    x = {k: np.asarray(obs[e]) for k, e in ENV_KEYS.items()}
    x = {k: data.resize_images(v, img_size) if k in CAMERAS else v.astype(np.float32) for k, v in x.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in x.items()}


def run_episode(env, policy, task_emb, init_state, max_steps, img_size, frames=None):
    """One rollout; returns (success, steps). `frames` (a list) collects agentview images, upright."""
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(N_SETTLE):
        obs, _, _, _ = env.step(np.zeros(7))
    policy.reset()
    for t in range(max_steps):
        if frames is not None:
            frames.append(obs["agentview_image"][::-1])  # the env renders upside down; flip for the eye only
        action = policy.get_action(policy_obs(obs, img_size), task_emb[None])[0]  # (7,)
        obs, _, done, _ = env.step(action)
        if done:
            return True, t + 1
    return False, max_steps


def write_video(path, frames, fps=20):
    """MP4 through OpenCV (installed with LIBERO), written to a temp name then renamed."""
    import cv2
    out = cv2.VideoWriter(path + ".tmp.mp4", cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[1::-1])  # (W, H)
    for f in frames:
        out.write(np.ascontiguousarray(f[..., ::-1]))  # RGB -> BGR
    out.release()
    os.replace(path + ".tmp.mp4", path)


# ----------------------------------------------------------------------------- worker processes
class EnvError(RuntimeError):
    """The simulator could not run (renderer, crash, hang): a failure of the machine, never of the policy."""


STOP_AFTER = 3  # tries in a row that could not run, with no episode finished between them: the machine is broken


def episode_seed(seed, task, ep, stream=0):
    """The seed of episode `ep` of LIBERO task `task`, from (seed, task, ep, stream) alone: the same in any worker.
    Stream 1 draws other episodes from the same init states (m2distill.py scores a chosen checkpoint on them)."""
    return int(np.random.SeedSequence([seed, task, ep] + ([stream] if stream else [])).generate_state(1)[0])


def renderer_problem(error):
    """One line: the simulator cannot start or render, under which backend, and the fix."""
    gl, dev = os.environ.get("MUJOCO_GL", "egl"), os.environ.get("MUJOCO_EGL_DEVICE_ID")
    fix = {"egl": ("set MUJOCO_EGL_DEVICE_ID to a GPU of this machine or unset it, and " if dev else "")
                  + "install the EGL libraries (`bash .ci/install`)",
           "osmesa": "install OSMesa (`apt-get install libosmesa6`), or unset MUJOCO_GL to render with EGL"}.get(
        gl, f"unset MUJOCO_GL (headless EGL) or set MUJOCO_GL=osmesa; {gl} needs a display")
    return (f"The simulator cannot start or render in a rollout worker (MUJOCO_GL={gl}"
            + (f", MUJOCO_EGL_DEVICE_ID={dev}" if dev else "") + f"): {error.rstrip('.')}. Fix: {fix}. "
            "(m2distill.py --n-eval 0 trains without rollouts.) No success rate was measured.")


def _end_with_parent(parent_pid):
    """The kernel kills this worker when its parent dies (Linux PR_SET_PDEATHSIG); elsewhere, and if the
    parent died already, a thread that checks the parent's pid every second ends it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def _worker(conn, parent_pid, suite, max_steps, video_dir, env_fn, seed, low_eval_noise):
    """Serve ("policy", config, state_dict, task_embs), which replaces the policy, and (kind, task, ep, call, stream):
    kind "check" creates the task's env, resets it, sets init state 0 and steps once; "episode" runs one
    rollout seeded by episode_seed(seed, task, ep, stream). Replies (task, ep, success, steps, seconds, traceback
    or None)."""
    _end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it ends the workers
    sys.unraisablehook = lambda *_: None  # a half-made renderer's destructors; the error itself is sent back
    from model import ResNetT, fold_batchnorm
    torch.set_num_threads(1)
    env, env_task, init_states, policy, task_embs = None, None, None, None, None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the main process is gone
        if msg[0] == "policy":
            policy, task_embs = ResNetT(**msg[1]), msg[3]
            policy.load_state_dict(msg[2])
            fold_batchnorm(policy).head.low_eval_noise = low_eval_noise  # folded: the same outputs, ~10% less time
            continue
        kind, task, ep, call, stream = msg
        try:
            if task != env_task:
                if env is not None:
                    env.close()
                env, env_task = None, None
                (env, init_states), env_task = env_fn(suite, task), task
            if kind == "check":  # the simulator starts and renders
                env.reset()
                env.set_init_state(init_states[0])
                env.step(np.zeros(7))
                result = (task, ep, False, 0, 0.0, None)
            else:
                torch.manual_seed(episode_seed(seed, task, ep, stream))  # the GMM sampling in get_action
                np.random.seed(episode_seed(seed, task, ep, stream))
                frames = [] if video_dir else None
                t0 = time.time()
                success, steps = run_episode(env, policy, task_embs[task], init_states[ep % len(init_states)],
                                             max_steps, policy.config["img_size"], frames)
                seconds = time.time() - t0
                if frames:
                    write_video(os.path.join(video_dir, f"eval{call}_task{task}_ep{ep}_"
                                             f"{'success' if success else 'fail'}.mp4"), frames)
                result = (task, ep, success, steps, seconds, None)
        except Exception:
            result = (task, ep, False, 0, 0.0, traceback.format_exc())
            with contextlib.suppress(Exception):
                env.close()
            env, env_task = None, None  # a fresh env for the next episode
        try:
            conn.send(result)
        except OSError:
            break


class Evaluator:
    """Success rates of a policy on tasks of a suite, `n_eval` episodes each, over `workers` processes (alive until
    close() or the end of a `with` block).

    evaluator(policy, task_ids, task_embs, stream=0) -> {task_id: (success rate, episodes)}: successes / episodes
    over the 1..n_eval episodes that ran (a success, or a policy failure: `max_steps` reached). An episode that could
    not run (the env raised; the worker died, or hung for `episode_timeout` s, default 300 + 2 max_steps) is retried
    once in a fresh env, then left out, never counted as a failure. EnvError, no result, when the simulator cannot
    start or render (check), after STOP_AFTER tries in a row that could not run, or when no episode of a task ran.
    Episode ep of task t is seeded by episode_seed(seed, t, ep, stream), starts from init state ep mod 50;
    `low_eval_noise`: GMMHead."""

    def __init__(self, suite, n_eval, max_steps, workers=None, video_dir=None, episode_timeout=None,
                 env_fn=None, seed=10000, low_eval_noise=False):
        self.n_eval, self.worker_args = n_eval, (suite, max_steps, video_dir, env_fn or make_env, seed, low_eval_noise)
        self.n_workers = max(1, min(workers or os.cpu_count(), n_eval))
        self.timeout = episode_timeout or 300 + 2 * max_steps
        self.ctx = mp.get_context("spawn")
        self.procs, self.conns, self.policy_msg = [None] * self.n_workers, [None] * self.n_workers, None
        # errors: problems; episodes: (task, ep, success, steps, seconds) per episode that ran
        self.errors, self.episodes, self.calls, self.checked = [], [], 0, False
        if video_dir:
            os.makedirs(video_dir, exist_ok=True)

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, os.getpid(), *self.worker_args), daemon=True)
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # inherited: deaf to Ctrl-C from birth
        try:
            p.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        child.close()
        self.procs[i], self.conns[i] = p, parent
        if self.policy_msg is not None:
            parent.send(self.policy_msg)

    def _kill(self, i):
        self.procs[i].kill()
        self.procs[i].join()
        self.conns[i].close()
        self.procs[i] = None

    def check(self, task=0):
        """Create `task`'s env in a worker, reset it, set init state 0 and step it once (the env is kept for the
        rollouts); EnvError (renderer_problem) if that fails. Once per Evaluator; its first call does it."""
        if self.checked:
            return
        if self.procs[0] is None or not self.procs[0].is_alive():
            self._start(0)
        problem = "interrupted"
        try:
            self.conns[0].send(("check", task, 0, None, 0))
            problem = (self.conns[0].recv()[5] if self.conns[0].poll(self.timeout)
                       else f"no answer within {self.timeout:.0f} s")
        except (EOFError, OSError):
            problem = "the worker died"
        finally:
            if problem is not None:
                self._kill(0)
        if problem is not None:
            raise EnvError(renderer_problem(problem.strip().splitlines()[-1]))
        self.checked = True

    def __call__(self, policy, task_ids, task_embs, stream=0):
        self.check(task_ids[0])
        cfg, state = policy.config, {k: v.detach().cpu() for k, v in policy.state_dict().items()}
        self.policy_msg = ("policy", cfg, state, task_embs.detach().cpu())
        for i in range(self.n_workers):
            if self.procs[i] is None or not self.procs[i].is_alive():
                self._start(i)
            else:
                self.conns[i].send(self.policy_msg)
        todo = [(t, ep, 0) for t in task_ids for ep in range(self.n_eval)]  # (task, episode, tries so far)
        busy, wins, ran, streak = {}, {t: 0 for t in task_ids}, {t: 0 for t in task_ids}, 0
        bar = tqdm(total=len(todo), desc=f"rollouts of task {' '.join(map(str, task_ids))}", unit="episode",
                   leave=False, dynamic_ncols=True, disable=None)  # on a terminal only: logs get the results
        try:
            while todo or busy:
                for i in [i for i in range(self.n_workers) if i not in busy][:len(todo)]:
                    busy[i] = (todo.pop(0), time.time())
                    with contextlib.suppress(OSError):  # a dead worker: found below
                        self.conns[i].send(("episode", *busy[i][0][:2], self.calls, stream))
                ready = wait([self.conns[i] for i in busy], timeout=1.0)
                for i in list(busy):
                    (task, ep, tries), t0 = busy[i]
                    reply, problem = None, None
                    if self.conns[i] in ready:
                        with contextlib.suppress(EOFError, OSError):
                            reply = self.conns[i].recv()
                    elif self.procs[i].is_alive():
                        if time.time() - t0 <= self.timeout:
                            continue
                        problem = f"worker {i} hung for more than {self.timeout:.0f} s"
                    problem = reply[5] if reply else problem or f"worker {i} died (exit code {self.procs[i].exitcode})"
                    del busy[i]
                    if problem is None:
                        wins[task], ran[task], streak = wins[task] + reply[2], ran[task] + 1, 0
                        self.episodes.append(reply[:5])
                        bar.update()
                        bar.set_postfix(successes=sum(wins.values()))
                        continue
                    msg = f"task {task} episode {ep}: {problem.strip().splitlines()[-1]}"
                    self.errors.append(msg)
                    streak += 1
                    if reply is None:  # dead or hung: a fresh process
                        self._kill(i)
                        self._start(i)
                    if streak >= STOP_AFTER:
                        raise EnvError(f"Rollouts stopped: {streak} tries in a row could not run, so the simulator "
                                       f"or the machine is failing, not the policy (last: {msg}). No success rate of "
                                       "this evaluation was recorded; finished work stays on disk.")
                    tqdm.write(f"[evaluate] {msg}; " + ("retrying it in a fresh env" if tries == 0 else
                                                        "it could not run twice: left out of its cell"))
                    if tries == 0:
                        todo.insert(0, (task, ep, 1))
                    else:
                        bar.update()
            empty = [t for t in task_ids if ran[t] == 0]
            if empty:
                raise EnvError(f"Rollouts stopped: no episode of task(s) {empty} could run (last problem: "
                               f"{self.errors[-1]}). No success rate was recorded; finished work stays on disk.")
        except BaseException:  # stopped or interrupted: the episodes still running are abandoned
            for i in busy:
                self._kill(i)
            raise
        finally:
            bar.close()
        self.calls += 1  # numbers the videos of each evaluation
        return {t: (wins[t] / ran[t], ran[t]) for t in task_ids}

    def close(self):
        """End the workers, at once: they hold nothing worth saving (their envs die with them)."""
        for i, p in enumerate(self.procs):
            if p is not None:
                self._kill(i)

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # `with Evaluator(...) as ev:` closes it however the block ends
        self.close()


# ----------------------------------------------------------------------------- LIBERO's metrics
def lifelong_metrics(conf_mat, fwt_k):
    """FWT, NBT and AUC (SPEC.md section 6) from the success matrix and the per-task FWT_k.

    conf_mat[k][tau] = c_{k,tau}: success on task tau after learning task k (row k needs tau <= k;
    a ragged list of rows is fine). fwt_k[k] = FWT_k, the mean over the curve's points c_{k,k,e}
    (epochs 0, eval_every, ..., E; 11 with LIBERO's 50 and 5) of the curve held at its best.
    With tasks indexed 1..K as in the paper and c_{k,k} the diagonal (the best checkpoint of task k):

        FWT = (1/K) sum_k FWT_k
        NBT_k = 1/(K-k) sum_{tau=k+1}^{K} (c_{k,k} - c_{tau,k}),   NBT = 1/(K-1) sum_{k=1}^{K-1} NBT_k
        AUC_k = 1/(K-k+1) (FWT_k + sum_{tau=k+1}^{K} c_{tau,k}),  AUC = (1/K) sum_k AUC_k

    NBT is averaged over k < K only (the last task has no later task to forget it); with K = 1 it is None."""
    K = len(fwt_k)
    c = np.array([list(row) + [None] * (K - len(row)) for row in conf_mat], dtype=float)  # (K, K), None: NaN
    nbt_k = [np.mean([c[k, k] - c[tau, k] for tau in range(k + 1, K)]) for k in range(K - 1)]
    auc_k = [(fwt_k[k] + sum(c[tau, k] for tau in range(k + 1, K))) / (K - k) for k in range(K)]
    return {"fwt": float(np.mean(fwt_k)), "nbt": float(np.mean(nbt_k)) if nbt_k else None,
            "auc": float(np.mean(auc_k))}


@contextlib.contextmanager
def write_png(path, dpi, **subplots):
    """matplotlib's subplots(**subplots) -> (fig, axes), off-screen; the PNG `path` is written atomically at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(**subplots)
    yield fig, axes
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def draw_matrix(ax, c, labels, texts, fontsize, label_size=None):
    """A success matrix c (K, K) (NaN: no value) on `ax`: rows after learning task k, columns the evaluated
    task, both labelled `labels`; texts {(k, tau): the cell's text}."""
    ax.imshow(c, vmin=0, vmax=1, cmap="viridis")
    for (k, tau), text in texts.items():
        ax.text(tau, k, text, ha="center", va="center", fontsize=fontsize, color="k" if c[k, tau] >= 0.6 else "w")
    ax.set_xticks(range(len(c)), labels)
    ax.set_yticks(range(len(c)), labels)
    ax.set_xlabel("evaluated task", fontsize=label_size)
    ax.set_ylabel("after learning task", fontsize=label_size)


def plot_success_matrix(conf_mat, metrics, path, title="", task_ids=None, episodes=None):
    """The success matrix as a PNG heatmap (rows: after learning the k-th task; columns: evaluated task), the
    metrics and the episodes per cell (`episodes`, the same shape as conf_mat) in the title; `task_ids` label
    the tasks on the axes with their LIBERO ids (default 0..K-1). Sized to stay readable from 1 to 10 tasks."""
    K = len(conf_mat)
    c = np.array([list(row) + [None] * (K - len(row)) for row in conf_mat], dtype=float)  # (K, K), None: NaN
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = textwrap.wrap(title, 40) + [f"FWT {fmt(metrics['fwt'])}  NBT {fmt(metrics['nbt'])}  AUC {fmt(metrics['auc'])}"]
    counts = sorted({n for row in (episodes or []) for n in row or [] if n is not None})  # None: not recorded
    if counts:
        lines.append(f"{counts[0]}{'' if len(counts) == 1 else f'-{counts[-1]}'} episodes per cell")
    side = max(3.0, 0.6 * K)  # inches of the matrix; at least room for the title
    with write_png(path, 100, figsize=(side + 1.4, side + 1.6)) as (fig, ax):
        draw_matrix(ax, c, [str(t) for t in (task_ids or range(K))], {(k, tau): "n/a" if np.isnan(c[k, tau]) else
                    f"{c[k, tau]:.2f}" for k in range(K) for tau in range(len(conf_mat[k]))}, 9)
        ax.set_title("\n".join(lines), fontsize=9)


# ----------------------------------------------------------------------------- command line
def load_policy(path):
    """A checkpoint written by m2distill.py -> (policy, task embeddings, its suite, the tasks it has learned).
    Raises FileNotFoundError or ValueError, one line naming the file and the fix (model.read_checkpoint)."""
    from model import ResNetT, read_checkpoint
    ckpt = read_checkpoint(path)
    policy = ResNetT(**ckpt["config"])
    policy.load_state_dict(ckpt["state_dict"])
    return policy.eval(), ckpt["task_embs"], ckpt.get("suite"), ckpt.get("tasks", list(range(ckpt["task"] + 1)))


def cli(main):
    """Run a command's main(): a user-facing error (SystemExit with a message, EnvError, a loss gone NaN) prints as
    short lines, no traceback, exit status 1; Ctrl-C: one line, exit status 130 (the Evaluator ends the workers; work
    done stays)."""
    try:
        main()
    except KeyboardInterrupt:
        sys.unraisablehook = lambda *_: None  # the simulator's renderers, freed with the interrupted frames, raise
        print("\nInterrupted (Ctrl-C). Work finished before stays on disk; rerun the same command to resume.",
              file=sys.stderr)
        sys.exit(130)
    except (SystemExit, EnvError, FloatingPointError) as e:  # FloatingPointError: a loss gone NaN (m2distill.py)
        msg = e.code if isinstance(e, SystemExit) else str(e)
        if not isinstance(msg, str):
            raise
        print(textwrap.fill(msg, 100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
        sys.exit(1)


def check_flags(args, ranges, positive=()):
    """SystemExit naming the flag and its allowed values unless every `ranges` flag of `args` is finite and within
    (least, most) (None: no bound), and > 0 for the `positive` ones; and unless --device names a device this
    torch can use."""
    for flag, (lo, hi) in ranges.items():
        v = getattr(args, flag)
        if not (math.isfinite(v) and lo <= v and (hi is None or v <= hi) and (v > 0 or flag not in positive)):
            allowed = "a number > 0" if flag in positive else f"{lo} or more" if hi is None else f"{lo} to {hi}"
            raise SystemExit(f"--{flag.replace('_', '-')} {v}: out of range; allowed: {allowed}.")
    device = getattr(args, "device", "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"--device {device}: not a torch device; use cpu or cuda.") from None
    if kind != "cpu" and not getattr(torch, kind).is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) has no usable {kind} device here; "
                         "use --device cpu (a run trained on a GPU resumes on the CPU).")


@contextlib.contextmanager
def exits(prefix="", suffix=""):
    """The one-line FileNotFoundError/ValueError of a check (data.py, model.py) -> SystemExit(prefix + it + suffix)."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(prefix + str(e) + suffix) from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a task<k>.pt written by m2distill.py")
    p.add_argument("--suite", default=None, help="default: the checkpoint's suite")
    p.add_argument("--tasks", type=int, nargs="+", help="task ids to evaluate (default: the LIBERO ids of the tasks the checkpoint has learned)")
    p.add_argument("--n-eval", type=int, default=20, help="episodes per task")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--eval-workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=10000, help="episode i of task t is seeded by (seed, t, i)")
    p.add_argument("--low-eval-noise", action="store_true",
                   help="LIBERO's GMMHead option: act with the drawn mode's mean (min std), not a full sample")
    p.add_argument("--video-dir", help="write an MP4 of every episode here")
    p.add_argument("--aggregate", metavar="GLOB", nargs="+", help="print the paper-style table of these runs (e.g. "
                   "'runs/*'; several globs: their union)")
    p.add_argument("--png", help="--aggregate: also draw the metrics and mean matrices here")
    args = p.parse_args(argv)
    if args.png and os.path.isdir(args.png):
        raise SystemExit(f"--png {args.png} is a folder; pass a file name, e.g. {os.path.join(args.png, 'table.png')}.")
    if args.aggregate:  # many runs' table: aggregate.py (nothing in a run needs it)
        return __import__("aggregate").aggregate(args.aggregate, args.png)
    if not args.checkpoint:
        p.error("--checkpoint is required (or --aggregate)")
    if args.video_dir and os.path.exists(args.video_dir) and not os.path.isdir(args.video_dir):
        raise SystemExit(f"--video-dir {args.video_dir} is a file; pass a folder for the MP4s.")
    check_flags(args, {"n_eval": (1, None), "max_steps": (1, None), "eval_workers": (1, None), "seed": (0, 2**32 - 1)})
    with exits("--checkpoint "):
        policy, embs, suite, learned = load_policy(args.checkpoint)
    if args.suite not in (None, suite):  # its task embeddings are the instructions of its own suite
        raise SystemExit(f"--suite {args.suite}: {args.checkpoint} was trained on {suite}, and its task embeddings "
                         f"are that suite's instructions; drop --suite (or pass --suite {suite}).")
    args.suite = suite
    bench = data.suite_benchmark(args.suite)
    n = bench.get_num_tasks()
    tasks = args.tasks or [t for t in learned if t < n]
    bad = [t for t in tasks if not 0 <= t < min(n, len(embs))]
    if bad:
        raise SystemExit(f"--tasks {bad}: {args.suite} has tasks 0..{n - 1}, the checkpoint embeds {len(embs)}.")
    if len(set(tasks)) < len(tasks):  # its seeded episodes would run twice and count as 2 x --n-eval
        raise SystemExit(f"--tasks {' '.join(map(str, tasks))}: give each task once.")
    with Evaluator(args.suite, args.n_eval, args.max_steps, args.eval_workers, args.video_dir, seed=args.seed,
                   low_eval_noise=args.low_eval_noise) as ev:
        rates = ev(policy, tasks, embs)  # the simulator is checked first (Evaluator.check)
    print("| task | instruction | success | episodes |\n|---|---|---|---|")
    for t in tasks:
        print(f"| {t} | {bench.get_task(t).language} | {rates[t][0]:.2f} | {rates[t][1]} |")
    print(f"| mean | | {np.mean([r for r, _ in rates.values()]):.2f} | {sum(n for _, n in rates.values())} |")


if __name__ == "__main__":
    cli(main)
