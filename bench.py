"""bench.py: what a step of m2distill costs, as ratios measured in one run on one machine.

    python bench.py                                  # b: M2Distill step / ER step;  c: peak memory / uint8 images
    python bench.py --libero-dir DIR [--libero-site SITE]   # a: ours vs LIBERO's own BCTransformerPolicy
    python bench.py --results runs/<run>/results.json       # d: a finished run's time, collect / data / train / eval
    python bench.py --only e --eval-workers 2 --max-steps 60  # e: rollout env steps/s, bare simulator vs 1 vs N workers

a. runs LIBERO's unmodified policy code from a checkout outside this repository (DIR holds its
   `libero/lifelong`; SITE holds what that code imports and we do not: robomimic==0.2.0, einops,
   torchvision), with the config of its bc_transformer_policy.yaml, the same batch and threads.
   Steps of the two policies alternate, so both see the same load on the machine.
e. runs the simulator, so it runs only when asked for (--only e).
"""
import argparse
import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch

import data
import m2distill
from model import ResNetT, fold_batchnorm


def fake_batch(B, T, img, d_lang, seed=0):
    """A training batch as the loader yields it: uint8 images (B, T, H, W, 3), floats, actions in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    obs = {c: torch.randint(0, 256, (B, T, img, img, 3), generator=g, dtype=torch.uint8) for c in data.CAMERAS}
    obs.update({k: torch.randn(B, T, d, generator=g) for k, d in data.LOW_DIM.items()})
    return {"obs": obs, "actions": torch.rand(B, T, 7, generator=g) * 2 - 1, "task_emb": torch.randn(B, d_lang, generator=g)}


def timed_steps(step, n, warmup=2):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


class AttrDict(dict):
    """The attribute access LIBERO's code expects of its hydra config."""

    def __getattr__(self, k):
        return self[k]

    def __setattr__(self, k, v):
        self[k] = v


def libero_policy(libero_dir, img, d_lang):
    """LIBERO's BCTransformerPolicy built from its own yaml files (defaults composed by hand)."""
    import yaml
    from libero.lifelong.models.bc_transformer_policy import BCTransformerPolicy
    conf = os.path.join(libero_dir, "libero", "configs", "policy")
    load = lambda *p: yaml.safe_load(open(os.path.join(conf, *p)))
    to_attr = lambda x: AttrDict({k: to_attr(v) for k, v in x.items()}) if isinstance(x, dict) else x
    pol = load("bc_transformer_policy.yaml")
    for entry in pol.pop("defaults"):
        (key, file), = entry.items()  # "data_augmentation@color_aug": "x.yaml"
        group, _, name = key.partition("@")
        pol[name or group] = load(group, file)
    pol["language_encoder"]["network_kwargs"]["input_size"] = d_lang
    cfg = to_attr({"device": "cpu", "policy": pol, "train": {"use_augmentation": True},
                   "data": {"use_joint": True, "use_gripper": True, "use_ee": False,
                            "obs": {"modality": {"rgb": list(data.CAMERAS), "low_dim": list(data.LOW_DIM)}}}})
    shape_meta = {"ac_dim": 7, "all_shapes": {"agentview_rgb": (3, img, img), "eye_in_hand_rgb": (3, img, img),
                                              "gripper_states": (2,), "joint_states": (7,)}}
    return BCTransformerPolicy(cfg, shape_meta)


def bench_vs_libero(args):
    sys.path[:0] = [args.libero_dir] + ([args.libero_site] if args.libero_site else [])
    import libero
    libero.__path__.insert(0, os.path.join(args.libero_dir, "libero"))  # its lifelong/ beside the simulator
    B, img, d = args.batch_size, args.img_size, 768
    batch = fake_batch(B, 10, img, d)
    ours = ResNetT(d_lang=d, img_size=img)
    theirs = libero_policy(args.libero_dir, img, d)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=1e-4)
    ns = argparse.Namespace(grad_clip=100.0)
    # LIBERO's loader hands the policy float images (B, T, 3, H, W) in [0, 1]; its step is Sequential.observe.
    libero_obs = {k: (v.permute(0, 1, 4, 2, 3).float() / 255 if k in data.CAMERAS else v) for k, v in batch["obs"].items()}

    def step_theirs():
        theirs.train()
        opt_theirs.zero_grad()
        loss = theirs.compute_loss({"obs": dict(libero_obs), "task_emb": batch["task_emb"], "actions": batch["actions"]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 100.0)
        opt_theirs.step()

    step_ours = lambda: m2distill.train_step(ours, None, batch, opt_ours, ns)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    t_ours, t_theirs = [], []
    step_ours(), step_theirs()  # warm-up
    for _ in range(args.steps):
        t_theirs += timed_steps(step_theirs, 1, 0)
        t_ours += timed_steps(step_ours, 1, 0)
    m_ours, m_theirs = np.median(t_ours), np.median(t_theirs)
    print(f"\n## a. training step, batch {B} x T 10, {img} px, {torch.get_num_threads()} threads, "
          f"median of {args.steps} alternating steps")
    print("| policy | parameters | s/step | samples/s |\n|---|---|---|---|")
    print(f"| LIBERO BCTransformerPolicy | {n_theirs:,} | {m_theirs:.2f} | {B / m_theirs:.1f} |")
    print(f"| m2distill ResNetT | {n_ours:,} | {m_ours:.2f} | {B / m_ours:.1f} |")
    print(f"| **speed-up ours / LIBERO** | | | **{m_theirs / m_ours:.2f}x** |")


def bench_distill(args):
    B, img = args.batch_size, args.img_size
    d = 384
    cur, rep = fake_batch(B, 10, img, d, 0), fake_batch(B, 10, img, d, 1)
    batch = {k: (torch.cat([cur[k], rep[k]]) if k != "obs" else {o: torch.cat([cur["obs"][o], rep["obs"][o]])
                                                                   for o in cur["obs"]}) for k in cur}  # (2B, ...)
    policy = ResNetT(d_lang=d, img_size=img)
    old = m2distill.freeze(ResNetT(d_lang=d, img_size=img))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=1e-4)
    ns = m2distill.parse_args(["--device", "cpu"])
    t_er, t_m2 = [], []
    for _ in range(2):
        m2distill.train_step(policy, None, batch, opt, ns), m2distill.train_step(policy, old, batch, opt, ns)
    for _ in range(args.steps):
        t_er += timed_steps(lambda: m2distill.train_step(policy, None, batch, opt, ns), 1, 0)
        t_m2 += timed_steps(lambda: m2distill.train_step(policy, old, batch, opt, ns), 1, 0)
    e, m = np.median(t_er), np.median(t_m2)
    print(f"\n## b. M2Distill step vs ER step, the same batch ({B} current + {B} replayed) x T 10, {img} px")
    print("| step | s/step |\n|---|---|")
    print(f"| ER (L_BC) | {e:.3f} |\n| M2Distill (L_BC + 4 distillation terms, teacher forward) | {m:.3f} |")
    print(f"| **M2Distill / ER** | **{m / e:.2f}x** |")


def bench_memory(args):
    """Peak RSS of loading a suite's tasks, then of training on them (M2Distill + replay), against the
    bytes of their images as uint8. `--steps 0` measures loading alone."""
    bench_ = data.suite_benchmark(args.suite)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss0 = peak()
    sets = [data.SequenceDataset.from_hdf5(data.task_file(args.data_dir, args.suite, bench_.get_task(k).name), k,
                                           img_size=args.img_size) for k in range(args.n_tasks)]
    loaded = peak()
    img_bytes = sum(ds.obs[c].nbytes for ds in sets for c in data.CAMERAS)
    rows = [("images of the loaded demos, uint8", img_bytes), ("process peak before loading (torch, LIBERO)", rss0),
            ("peak after loading", loaded)]
    if args.steps:
        embs, _ = data.task_embeddings([bench_.get_task(k).language for k in range(args.n_tasks)], "hash")
        policy = ResNetT(d_lang=embs.shape[1], img_size=args.img_size)
        old = m2distill.freeze(policy)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        ns = m2distill.parse_args(["--device", "cpu"])
        memory = data.ReplayMemory(1000)
        for ds in sets[:-1]:
            memory.add(ds)
        for _ in range(args.steps):
            idx = torch.randint(len(sets[-1]), (args.batch_size,))
            b = m2distill.to_device(m2distill.make_batch(sets[-1], idx, memory, args.batch_size), embs, "cpu")
            m2distill.train_step(policy, old, b, opt, ns)
        rows.append((f"peak after {args.steps} M2Distill steps, batch {args.batch_size} + {args.batch_size} replayed",
                     peak()))
    print(f"\n## c. memory, {args.n_tasks} tasks of {args.suite} ({sum(ds.n_demos for ds in sets)} demos) at "
          f"{args.img_size} px")
    print("| what | MB |\n|---|---|")
    for name, b in rows:
        print(f"| {name} | {b / 2**20:.0f} |")
    print(f"| **(peak after loading - before) / uint8 images** | **{(loaded - rss0) / img_bytes:.2f}x** |")
    if args.steps:
        print(f"| **(peak after training - before) / uint8 images** | **{(rows[-1][1] - rss0) / img_bytes:.2f}x** |")


def time_split(path):
    path = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        res = json.load(open(path))
        s = res["seconds"]
        assert isinstance(s, dict) and isinstance(res["tasks"], list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise SystemExit(f"--results {path}: not a results.json of m2distill.py with its seconds; pass a run folder "
                         "or its results.json.") from None
    total = sum(s.values())
    copied = f"; task 0 copied from {res['first_task_from']}, its time not counted" if res.get("first_task_from") else ""
    print(f"\n## d. time of the run in {path} ({len(res['tasks'])} tasks{copied}; start-up not counted)")
    print("| part | minutes | share |\n|---|---|---|")
    for k in ("collect", "data", "train", "eval"):
        print(f"| {k} | {s.get(k, 0) / 60:.1f} | {s.get(k, 0) / total:.0%} |")
    print(f"| sum of the parts | {total / 60:.1f} | |")


class TimedPolicy:
    """A policy that also counts the seconds spent in its get_action."""

    def __init__(self, policy):
        self.policy, self.seconds = policy, 0.0

    def reset(self):
        self.policy.reset()

    def get_action(self, obs, task_emb):
        t0 = time.time()
        action = self.policy.get_action(obs, task_emb)
        self.seconds += time.time() - t0
        return action


def rollout_speed(args):
    """e. Env steps per second with rendering over whole episodes (reset, init state, 5 settle steps, `max_steps`
    steps, at most 100, of a fresh policy of `img_size` px). The bare simulator's rate comes from the same
    episodes run in this process (one torch thread, as in a worker) with the time inside get_action taken
    out, so it simulates the very same arm motions; then the policy through 1 worker and through N workers
    (--eval-workers), each after one warm-up round."""
    from evaluate import N_SETTLE, Evaluator, make_env, run_episode
    args.max_steps = min(args.max_steps, 100)
    torch.set_num_threads(1)
    n_eps = 2
    embs, _ = data.task_embeddings([data.suite_benchmark(args.suite).get_task(0).language], "hash")
    policy = ResNetT(d_lang=embs.shape[1], img_size=args.img_size)
    timed = TimedPolicy(fold_batchnorm(copy.deepcopy(policy)))  # as in a worker
    env, init_states = make_env(args.suite, 0)
    run_episode(env, timed, embs[0], init_states[0], 5, args.img_size)  # warm-up
    timed.seconds, t0 = 0.0, time.time()
    steps = sum(run_episode(env, timed, embs[0], init_states[i], args.max_steps, args.img_size)[1]  # a success ends
                for i in range(n_eps))  # early: the steps that ran
    total = time.time() - t0
    env.close()
    bare = steps / (total - timed.seconds)
    rows = [("bare simulator (the same episodes, time in get_action removed)", bare),
            (f"policy in this process ({args.img_size} px, {1000 * timed.seconds / steps:.0f} ms per get_action)",
             steps / total)]
    for n in (1, args.eval_workers):
        ev = Evaluator(args.suite, n_eval=n_eps * n, max_steps=args.max_steps, workers=n)
        ev(policy, [0], embs)  # warm-up: spawn, imports, env creation
        ev.episodes.clear()
        t0 = time.time()
        ev(policy, [0], embs)
        wall = time.time() - t0
        steps = sum(e[3] for e in ev.episodes)
        rows.append((f"{n} worker(s): per worker", steps / sum(e[4] for e in ev.episodes)))
        if n > 1:
            rows.append((f"{n} worker(s): all together, wall clock", steps / wall))
        ev.close()
    print(f"| {args.suite} task 0, episodes of reset + {N_SETTLE} settle + {args.max_steps} steps "
          "| env steps/s | bare rate / this rate |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {bare / rate:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libero-dir", help="a LIBERO checkout (a.); omitted: a. is skipped")
    p.add_argument("--libero-site", help="folder with robomimic==0.2.0, einops, torchvision for LIBERO's code")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (medians are reported)")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--data-dir", default="data", help="c.: demonstrations to load (skipped when absent)")
    p.add_argument("--n-tasks", type=int, default=3)
    p.add_argument("--results", help="d.: a results.json to split into collect / data / train / eval time")
    p.add_argument("--eval-workers", type=int, default=os.cpu_count(), help="e.: N, the most workers measured")
    p.add_argument("--max-steps", type=int, default=100, help="e.: policy steps per episode (at most 100)")
    p.add_argument("--only", choices=["a", "b", "c", "d", "e"], help="run one measurement (e. runs only so)")
    args = p.parse_args()
    if args.only == "d" and not args.results:
        p.error("d. splits a run's time: pass --results runs/<run> (or its results.json)")
    if args.steps < 1 and args.only != "c":  # a. and b. would print the median of no steps (nan)
        p.error("--steps 0 measures loading alone: pass it with --only c (a. and b. time at least one step)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.only in (None, "a") and args.libero_dir:
        bench_vs_libero(args)
    if args.only in (None, "b"):
        bench_distill(args)
    if args.only in (None, "c"):
        if os.path.isdir(os.path.join(args.data_dir, args.suite)):
            bench_memory(args)
        else:
            print(f"\n(c. skipped: no {args.data_dir}/{args.suite}; pass --data-dir)")
    if args.only in (None, "d") and args.results:
        time_split(args.results)
    if args.only == "e":
        rollout_speed(args)


if __name__ == "__main__":
    main()
