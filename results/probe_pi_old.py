"""Why M2Distill does not learn LIBERO-Goal task 1 after task 8 (README, "The comparison"): four probes of
a checkpoint that has learnt task 1 (or a run's progress.pt, mid-task), against pi_old (the task-8 checkpoint every
run starts from).

    python results/probe_pi_old.py modes DATA_DIR PI_OLD.pt RUN/task1.pt [RUN2/task1.pt ...]
    python results/probe_pi_old.py rollouts RUN/task1.pt N_EPISODES SEED
    python results/probe_pi_old.py language DATA_DIR RUN/task1.pt [RUN2/task1.pt ...]
    python results/probe_pi_old.py gap DATA_DIR PI_OLD.pt RUN/task1.pt [RUN2/task1.pt ...]

modes: on task 1's held-out demos (demo_20..24), at the steps where pi_old's most likely mode is far from the
demo's action (arm x, y, z; actions in [-1, 1]), the new policy's mixture weight on "pi_old-like" modes: modes
whose arm mean is nearer pi_old's most likely mode than the demo's action. Each sequence's first step (it sees
o_t alone, as at an episode's start).
rollouts: the evaluator's seeded episodes of task 1 (stream 0: the curve's), and at each step whether the goal
of task 8 (bowl on the plate), 1 (on the stove) or 4 (on the cabinet) holds: which task the policy carries out.
language: how much the instruction moves the image tokens (the FiLM path) on those demos: the mean over sequences
and steps of ||f_c(o, l_1) - f_c(o, l_8)|| / (mean of the two norms) per camera c, and the same for the text
token g(l).
gap: the four distillation terms (lambda 1) of each policy against pi_old on batches of 16 random held-out sequences
of task 1 and 16 of task 8 (augmented as in training), with the policy in train mode (dropout, stochastic depth, batch
statistics in its batch norms: what training optimises) and in eval mode (the policies themselves). pi_old is
m2distill.freeze's (eval mode, batch norms folded). With a checkpoint as both PI_OLD.pt and the policy, the eval-mode
terms are 0 and the train-mode ones are the gap the modes alone make, at that checkpoint's weights.
An analysis script, not part of a run: it reads checkpoints and demo files as evaluate.py does.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
from model import fold_batchnorm  # noqa: E402

SUITE, TASK, VAL = "libero_goal", 1, [f"demo_{i}" for i in range(20, 25)]


def load(path):
    """evaluate.load_policy, and a run's progress.pt (the weights mid-task, the rest from task0.pt beside it)."""
    if os.path.basename(path) != "progress.pt":
        return evaluate.load_policy(path)
    policy, embs, suite, tasks = evaluate.load_policy(os.path.join(os.path.dirname(path), "task0.pt"))
    policy.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["policy"])
    return policy, embs, suite, tasks


def first_step_outputs(path, ds):
    """The GMM's means (N, M, 7) and logits (N, M) at the first step of each of ds's N sequences."""
    policy, embs, _, _ = load(path)
    outs = []
    with torch.no_grad():
        for idx in torch.arange(len(ds)).split(64):
            b = ds.batch(idx)
            o = policy(b["obs"], embs[TASK].expand(len(idx), -1))
            outs.append((o["means"][:, 0], o["logits"][:, 0]))
    return torch.cat([m for m, _ in outs]), torch.cat([lg for _, lg in outs])


def held_out(data_dir, path, task=TASK):
    """A task's held-out demos (default task 1) at the image size of the checkpoint `path`."""
    name = data.suite_benchmark(SUITE).get_task(task).name
    return data.SequenceDataset.from_hdf5(data.task_file(data_dir, SUITE, name), task, 10, VAL,
                                          load(path)[0].config["img_size"])


def modes(data_dir, pi_old, *runs):
    ds = held_out(data_dir, pi_old)
    a = ds.actions[:, :3]  # (N, 3) the demo's arm action at each sequence's first step
    means, logits = first_step_outputs(pi_old, ds)
    top = means[torch.arange(len(a)), logits.argmax(-1), :3]  # (N, 3) pi_old's most likely mode
    outs = {r: first_step_outputs(r, ds) for r in runs}
    for thr in (0.3, 0.6):
        far = (top - a).norm(dim=-1) > thr  # (N,)
        print(f"steps where pi_old's most likely mode is > {thr} from the demo's arm action: {int(far.sum())} of "
              f"{len(a)}")
        for r, (mu, lg) in outs.items():
            oldlike = (mu[..., :3] - top[:, None]).norm(dim=-1) < (mu[..., :3] - a[:, None]).norm(dim=-1)  # (N, M)
            w = (lg.softmax(-1) * oldlike).sum(-1)  # (N,) weight on pi_old-like modes
            print(f"  {r}: weight on pi_old-like modes {w[far].mean():.3f} there, {w[~far].mean():.3f} elsewhere")


def language(data_dir, *runs):
    ds = held_out(data_dir, runs[0])
    rel = lambda x, y: ((x - y).norm(dim=-1) / ((x.norm(dim=-1) + y.norm(dim=-1)) / 2)).mean().item()
    for r in runs:
        policy, embs, _, _ = load(r)
        sums = {}
        with torch.no_grad():
            for idx in torch.arange(len(ds)).split(64):
                b = ds.batch(idx)
                o1, o8 = (policy(b["obs"], embs[k].expand(len(idx), -1)) for k in (TASK, 8))
                for c in ("agentview_rgb", "eye_in_hand_rgb", "text"):
                    sums[c] = sums.get(c, 0) + rel(o1[c], o8[c]) * len(idx)
        print(f"  {r}: instruction 1 vs 8 moves " + ", ".join(f"{c} by {v / len(ds):.3f}" for c, v in sums.items()))


def gap(data_dir, pi_old, *runs):
    import copy
    import types
    import m2distill
    from model import augment_obs
    ds1, ds8 = held_out(data_dir, pi_old), held_out(data_dir, pi_old, 8)
    old, embs, _, _ = load(pi_old)
    old = m2distill.freeze(old)
    lam = types.SimpleNamespace(lambda_image=1, lambda_text=1, lambda_extra=1, lambda_policy=1, kl_samples=10,
                                kl_direction="forward", kl_timesteps="all")
    for r in runs:
        policy = load(r)[0]
        # a train-mode forward updates the batch norms' running statistics: the train-mode policy is a copy
        twins = {"train": copy.deepcopy(policy).train(), "eval": policy.eval()}
        torch.manual_seed(0)  # batches, augmentation, dropout, KL samples: the same draws for every policy
        order = [torch.randperm(len(d))[:min(len(ds1), len(ds8)) // 16 * 16].view(-1, 16) for d in (ds1, ds8)]
        sums, n = {}, 0
        with torch.no_grad():
            for i1, i8 in zip(*order):  # (16,) random sequences of each task, as training batches are drawn
                b = data.cat_batches([ds1.batch(i1), ds8.batch(i8)])
                b = {**b, "obs": augment_obs(b["obs"]), "task_emb": embs[b["task_id"]]}
                o = old(b["obs"], b["task_emb"])
                for mode, p in twins.items():
                    out = p(b["obs"], b["task_emb"])
                    torch.manual_seed(1000 + n)  # L_policy's action samples: the same in both modes
                    _, terms = m2distill.total_loss(out, o, b, lam)
                    for k, v in terms.items():
                        sums[mode, k] = sums.get((mode, k), 0) + v.item()
                n += 1
        print(f"  {r}: " + "; ".join(f"{mode} mode " + ", ".join(f"{k} {sums[mode, k] / n:.3f}" for k in
                                     ("bc", "image", "text", "extra", "policy")) for mode in ("train", "eval")))


def rollouts(path, n_episodes, seed):
    policy, embs, suite, _ = load(path)
    fold_batchnorm(policy)  # as the evaluator's workers
    goals = {}
    for k in (8, 1, 4):
        env, _ = evaluate.make_env(suite, k)
        goals[k] = env.env.parsed_problem["goal_state"]
        env.close()
    env, inits = evaluate.make_env(suite, TASK)
    for ep in range(int(n_episodes)):
        s = evaluate.episode_seed(int(seed), TASK, ep, 0)
        torch.manual_seed(s)
        np.random.seed(s)
        env.reset()
        obs = env.set_init_state(inits[ep])
        for _ in range(data.N_SETTLE):
            obs, _, _, _ = env.step(np.zeros(7))
        policy.reset()
        first = {k: None for k in goals}
        for t in range(300):
            obs, _, done, _ = env.step(policy.get_action(evaluate.policy_obs(obs, policy.config["img_size"]),
                                                         embs[TASK][None])[0])
            for k, g in goals.items():
                if first[k] is None and all(env.env._eval_predicate(p) for p in g):
                    first[k] = t + 1
            if done:
                break
        print(f"episode {ep}: success {bool(done)}; first step at which each task's goal held: {first}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"modes": modes, "rollouts": rollouts, "language": language, "gap": gap}[sys.argv[1]](*sys.argv[2:])
