"""m2distill.py: M2Distill (Roy et al., "Multi-Modal Distillation for Lifelong Imitation Learning",
ICRA 2025) on LIBERO, with its two baselines in the same loop.

    python m2distill.py --suite libero_object                      # M2Distill, preset for this machine
    python m2distill.py --suite libero_object --algo er            # experience replay
    python m2distill.py --suite libero_object --algo sequential    # plain fine-tuning

Tasks T^1..T^K arrive one at a time. After task k the policy pi_theta is frozen into pi_old, and
while learning task k+1 M2Distill keeps pi_theta close to pi_old through four terms:

    L = L_BC + l_img L_image + l_text L_text + l_extra L_extra + l_pol L_policy

Sequential trains on L_BC alone; ER adds replayed past sequences to every batch; M2Distill is ER
plus the four distillation terms (SPEC.md sections 3-5).
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate as rollouts
from data import CAMERAS, LOW_DIM
from model import ResNetT, augment_obs, fold_batchnorm, gmm_log_prob, gmm_sample

PRESETS = {  # flags a preset fills in when they are not given on the command line
    # LIBERO's protocol (SPEC.md section 5): 50 demos, 50 epochs, 128 px, 20 episodes of 600 steps.
    "paper": dict(n_tasks=10, epochs=50, batch_size=32, n_demos=50, val_demos=0, img_size=128, eval_every=5,
                  n_eval=20, max_steps=600),
    # This 2-core CPU (SPEC.md section 10): a small budget that finishes end to end within the hour.
    # Episodes of 300 steps: twice the scripted expert's mean demo (134-166 steps on LIBERO-Object).
    "cpu": dict(n_tasks=3, epochs=3, batch_size=16, n_demos=6, val_demos=2, img_size=32, eval_every=3,
                n_eval=2, max_steps=300),
}


# ----------------------------------------------------------------------------- the losses
def loss_bc(out, actions):
    """Behaviour cloning, the GMM negative log-likelihood of the demonstrated actions:

        L_BC = - mean_{b,t} log pi_theta(a_t | o_{<=t}, l)
    """
    return -gmm_log_prob(out["means"], out["stds"], out["logits"], actions).mean()


def sq_l2(x, y):
    """mean over all leading dims of || x - y ||_2^2 over the last (latent) dim."""
    return (x - y).pow(2).sum(-1).mean()


def loss_image(out, old):
    """Image latent distillation, over both cameras:

        L_image = sum_{c in {agentview, eye_in_hand}} mean_{b,t} || f_c^theta(o_t) - f_c^old(o_t) ||_2^2
    """
    return sum(sq_l2(out[c], old[c]) for c in CAMERAS)


def loss_text(out, old):
    """Language latent distillation (the trained projection of the frozen sentence embedding):

        L_text = mean_b || g^theta(l) - g^old(l) ||_2^2
    """
    return sq_l2(out["text"], old["text"])


def loss_extra(out, old):
    """Proprioception ("extra" modality) latent distillation:

        L_extra = sum_{e in {joint, gripper}} mean_{b,t} || e^theta(s_t) - e^old(s_t) ||_2^2
    """
    return sum(sq_l2(out[k], old[k]) for k in LOW_DIM)


def loss_policy(out, old, n_samples=10, direction="forward", timesteps="all", generator=None):
    """Policy distillation, the KL between the old and new GMM policies by Monte Carlo:

        forward:  L_policy = KL(pi_old || pi_theta) ~= 1/N sum_i [log pi_old(a_i|s) - log pi_theta(a_i|s)],
                  a_i ~ pi_old(.|s)
        reverse:  L_policy = KL(pi_theta || pi_old) ~= 1/N sum_i [log pi_theta(a_i|s) - log pi_old(a_i|s)],
                  a_i ~ pi_theta(.|s)

    averaged over the batch and the `timesteps` ("all" steps of each sequence, or the "last" one, the
    step that acts at inference). N = `n_samples`. The samples carry no gradient, so for the reverse
    direction the gradient E_q[(1 + log q - log p) grad log q] is restored by a score-function term.
    """
    pick = (lambda x: x) if timesteps == "all" else (lambda x: x[:, -1:])
    new_p = [pick(out[k]) for k in ("means", "stds", "logits")]  # (B, T', M, D), (B, T', M, D), (B, T', M)
    old_p = [pick(old[k]) for k in ("means", "stds", "logits")]
    if direction == "forward":
        a = gmm_sample(*old_p, n_samples, generator)  # (N, B, T', D)
        return (gmm_log_prob(*old_p, a) - gmm_log_prob(*new_p, a)).mean()
    a = gmm_sample(*[p.detach() for p in new_p], n_samples, generator)  # (N, B, T', D)
    log_q = gmm_log_prob(*new_p, a)
    d = log_q - gmm_log_prob(*old_p, a)
    score = (log_q * d.detach()).mean()
    return d.mean() + score - score.detach()


def total_loss(out, old, batch, args):
    """L = L_BC + l_img L_image + l_text L_text + l_extra L_extra + l_pol L_policy (no old model: L_BC).
    Returns the total and each term, for logging."""
    terms = {"bc": loss_bc(out, batch["actions"])}
    if old is not None:
        lambdas = {"image": args.lambda_image, "text": args.lambda_text, "extra": args.lambda_extra,
                   "policy": args.lambda_policy}
        fns = {"image": loss_image, "text": loss_text, "extra": loss_extra,
               "policy": lambda o, p: loss_policy(o, p, args.kl_samples, args.kl_direction, args.kl_timesteps)}
        terms.update({k: lambdas[k] * fns[k](out, old) for k in fns if lambdas[k] > 0})  # lambda 0: term off
    return sum(terms.values()), terms


# ----------------------------------------------------------------------------- one step
def freeze(policy):
    """The previous-step model pi_old: a deep copy in eval mode that takes no gradient (its batch norms
    folded into their convs: the same outputs, a cheaper forward)."""
    old = fold_batchnorm(copy.deepcopy(policy))
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def to_device(batch, task_embs, device):
    obs = {k: v.to(device, non_blocking=True) for k, v in batch["obs"].items()}
    return {"obs": obs, "actions": batch["actions"].to(device), "task_emb": task_embs[batch["task_id"]].to(device)}


def make_batch(dataset, idx, memory, batch_size, generator=None):
    """The current task's sequences `idx`; with replay, plus `batch_size` sequences from the memory (ER)."""
    batch = dataset.batch(idx)
    if memory is not None and len(memory):
        batch = data.cat_batches([batch, memory.sample(batch_size, generator)])
    return batch


def train_step(policy, old, batch, opt, args):
    """One gradient step on L; the old model runs once, without autograd, on the same batch."""
    policy.train()
    batch = {**batch, "obs": augment_obs(batch["obs"])}  # one draw, seen by both models
    out = policy(batch["obs"], batch["task_emb"])
    with torch.no_grad():
        old_out = None if old is None else old(batch["obs"], batch["task_emb"])
    loss, terms = total_loss(out, old_out, batch, args)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} ({ {k: round(v.item(), 3) for k, v in terms.items()} }); "
                                 "lower --lr or check the demonstration file for NaN/inf values.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    opt.step()
    return {k: v.item() for k, v in terms.items()}


@torch.no_grad()
def held_out_nll(policy, dataset, task_embs, device, batch_size=64):
    """Mean L_BC of the policy (eval mode) over every sequence of a held-out dataset."""
    policy.eval()
    total = 0.0
    for idx in torch.arange(len(dataset)).split(batch_size):
        b = to_device(dataset.batch(idx), task_embs, device)
        total += loss_bc(policy(b["obs"], b["task_emb"]), b["actions"]).item() * len(idx)
    return total / len(dataset)


# ----------------------------------------------------------------------------- files
def save_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def save_checkpoint(policy, task_embs, args, k, path):
    torch.save({"config": policy.config, "state_dict": policy.state_dict(), "task_embs": task_embs,
                "suite": args.suite, "task": k, "algo": args.algo}, path + ".tmp")
    os.replace(path + ".tmp", path)


RUN_FLAGS = ("suite", "algo", "n_tasks", "epochs", "batch_size", "seed", "lr", "n_demos", "val_demos", "img_size",
             "seq_len", "eval_every", "n_eval", "max_steps", "n_memories", "replay", "lambda_image", "lambda_text",
             "lambda_extra", "lambda_policy", "kl_samples", "kl_direction", "kl_timesteps", "task_emb", "grad_clip",
             "low_eval_noise")


def load_results(args):
    """The results of an earlier run in --out with the same flags (resume), or a fresh record."""
    path = os.path.join(args.out, "results.json")
    run = {k: getattr(args, k) for k in RUN_FLAGS}
    if not os.path.exists(path):
        return {"run": run, "tasks": [], "success": [], "episodes": [], "curves": [], "curve_episodes": [],
                "fwt_k": [], "nll": [], "seconds": {}}
    res = json.load(open(path))
    diff = [k for k in RUN_FLAGS if res["run"].get(k) != run[k]]
    if diff:
        raise SystemExit(f"--out {args.out} holds a run with other flags ({', '.join(diff)}); "
                         "pass another --out, or delete that folder to start over.")
    return res


# ----------------------------------------------------------------------------- the lifelong loop
def load_task_data(args, bench, k):
    path = data.task_file(args.data_dir, args.suite, bench.get_task(k).name)
    train = data.SequenceDataset.from_hdf5(path, k, args.seq_len, slice(0, args.n_demos), args.img_size)
    val = None
    if args.val_demos:
        val = data.SequenceDataset.from_hdf5(path, k, args.seq_len, slice(-args.val_demos, None), args.img_size)
        if train.n_demos + val.n_demos > val.total_demos:
            raise SystemExit(f"{path}: --n-demos {args.n_demos} + --val-demos {args.val_demos} exceeds its "
                             f"{val.total_demos} demos; lower one of them.")
    return train, val


def ensure_data(args, bench):
    """Every task file the run needs. Missing ones are generated in the simulator by the scripted expert
    (expert.py), in the official layout, after one line saying where official data would go."""
    names = [bench.get_task(k).name for k in range(args.n_tasks)]
    missing = [k for k, n in enumerate(names) if not os.path.exists(data.task_file(args.data_dir, args.suite, n))]
    if not missing:
        return
    import expert
    where = data.task_file(args.data_dir, args.suite, names[missing[0]])
    unsupported = [k for k in missing if k not in expert.SUPPORTED.get(args.suite, ())]
    if unsupported:
        raise SystemExit(f"--data-dir {args.data_dir}: no {where} (and {len(missing) - 1} more), and the scripted "
                         f"expert cannot solve {args.suite} task(s) {unsupported}. "
                         + data.DATA_HELP.format(suite=args.suite))
    print(f"No official data for {len(missing)} task(s) in --data-dir {args.data_dir} (e.g. {where}; "
          + data.DATA_HELP.format(suite=args.suite) + f") Collecting {args.n_demos + args.val_demos} scripted "
          "demonstrations per task in the simulator instead.", flush=True)
    expert.collect(args.suite, args.data_dir, args.n_demos + args.val_demos, missing, seed=args.seed)


def learn_task(policy, old, train, memory, task_embs, args, k, evaluate, res):
    """LIBERO's learn_one_task: fresh AdamW + cosine schedule, epochs 1..E, rollouts of the current
    task at epochs 0, eval_every, ..., and the best checkpoint (ties go to the later one) loaded at the end.
    Returns the success curve, FWT_k and the episodes each point of the curve is made of."""
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1), eta_min=1e-5)
    g = torch.Generator().manual_seed(args.seed * 1000 + k)
    curve, curve_episodes, best, best_state = [], [], -1.0, None
    for epoch in range(args.epochs + 1):
        if epoch > 0:
            t0 = time.time()
            order = torch.randperm(len(train), generator=g).split(args.batch_size)
            bar = tqdm(order, desc=f"task {k} epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)
            for idx in bar:
                batch = to_device(make_batch(train, idx, memory, args.batch_size, g), task_embs, args.device)
                terms = train_step(policy, old, batch, opt, args)
                bar.set_postfix({k_: f"{v:.3f}" for k_, v in terms.items()})
            sched.step()
            res["seconds"]["train"] = res["seconds"].get("train", 0) + time.time() - t0
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            success, episodes = evaluate(policy, [k])[k]
            curve.append(success)
            curve_episodes.append(episodes)
            tqdm.write(f"task {k} epoch {epoch}: success {success}" + (f" ({episodes} episodes)" if episodes else ""))
            if success is None or success >= best:
                best, best_state = (success or 0.0), copy.deepcopy(policy.state_dict())
                best_idx = len(curve) - 1
    policy.load_state_dict(best_state)
    held = [c if i < best_idx else curve[best_idx] for i, c in enumerate(curve)]  # held at its best
    fwt_k = None if curve[0] is None else float(np.mean(held))
    return curve, fwt_k, curve_episodes


def run(args, evaluate=None):
    """The whole lifelong run; resumes after the last finished task found in --out."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    bench = data.suite_benchmark(args.suite)
    if not 1 <= args.n_tasks <= bench.get_num_tasks():
        raise SystemExit(f"--n-tasks {args.n_tasks}: {args.suite} has {bench.get_num_tasks()} tasks.")
    t0 = time.time()
    ensure_data(args, bench)
    res = load_results(args)
    res["seconds"]["collect"] = res["seconds"].get("collect", 0) + time.time() - t0
    if res["tasks"]:
        print(f"--out {args.out} holds {len(res['tasks'])} finished task(s) of {args.n_tasks}: "
              + ", ".join(res["tasks"]) + ("; nothing left to do." if len(res["tasks"]) >= args.n_tasks
                                           else "; resuming with the next one."), flush=True)
        if len(res["tasks"]) >= args.n_tasks:
            return res
    languages = [bench.get_task(i).language for i in range(bench.get_num_tasks())]
    task_embs = data.task_embeddings(languages, args.task_emb, cache_dir=os.path.join(args.data_dir, ".cache"))
    policy = ResNetT(d_lang=task_embs.shape[1], img_size=args.img_size, seq_len=args.seq_len).to(args.device)
    evaluator = None
    if evaluate is None and args.n_eval > 0:  # rollouts in the simulator, workers kept for the whole run
        evaluator = rollouts.Evaluator(args.suite, args.n_eval, args.max_steps, args.eval_workers,
                                       os.path.join(args.out, "videos") if args.videos else None,
                                       seed=args.seed, low_eval_noise=args.low_eval_noise)
        evaluate = lambda policy, ids: evaluator(policy, ids, task_embs)
    elif evaluate is None:
        evaluate = lambda policy, ids: {i: (None, 0) for i in ids}  # --n-eval 0: success is not measured
    try:
        if evaluator is not None:
            evaluator.check()  # the simulator renders: checked before any training
        return lifelong(args, bench, policy, task_embs, timed(evaluate, res), res)
    finally:
        if evaluator is not None:
            evaluator.close()


def timed(evaluate, res):
    """The evaluation hook, its seconds added to res["seconds"]["eval"]. evaluate(policy, task_ids) ->
    {task_id: (success rate or None if not measured, episodes it is made of)} (evaluate.Evaluator)."""
    def hook(policy, ids):
        t0 = time.time()
        out = evaluate(policy, ids)
        res["seconds"]["eval"] = res["seconds"].get("eval", 0) + time.time() - t0
        return out
    return hook


def lifelong(args, bench, policy, task_embs, evaluate, res):
    """Tasks 0..K-1 in order: learn, evaluate tasks 0..k into row k, checkpoint, then replay and pi_old."""
    use_replay = args.algo in ("er", "m2distill") and args.replay == "on"  # ER: the diff on Sequential
    memory = data.ReplayMemory(args.n_memories) if use_replay else None
    old, vals = None, []
    done = len(res["tasks"])
    for k in range(args.n_tasks):
        t0 = time.time()
        train, val = load_task_data(args, bench, k)
        vals.append(val)
        res["seconds"]["data"] = res["seconds"].get("data", 0) + time.time() - t0
        if k < done:  # finished before the run was stopped: restore, do not redo
            if k == done - 1:
                policy.load_state_dict(torch.load(os.path.join(args.out, f"task{k}.pt"))["state_dict"])
        else:
            tqdm.write(f"== task {k}: {bench.get_task(k).language} ({len(train)} sequences)")
            curve, fwt_k, curve_episodes = learn_task(policy, old, train, memory, task_embs, args, k, evaluate, res)
            row = evaluate(policy, list(range(k + 1)))
            res["success"].append([row[i][0] for i in range(k + 1)])
            res["episodes"].append([row[i][1] for i in range(k + 1)])
            res["curves"].append(curve)
            res["curve_episodes"].append(curve_episodes)
            res["fwt_k"].append(fwt_k)
            res["nll"].append([held_out_nll(policy, v, task_embs, args.device) for v in vals] if val else None)
            res["tasks"].append(bench.get_task(k).name)
            if None not in res["fwt_k"]:  # rollouts measured: FWT, NBT, AUC and the heatmap
                res["metrics"] = rollouts.lifelong_metrics(res["success"], res["fwt_k"])
                rollouts.plot_success_matrix(res["success"], res["metrics"], os.path.join(args.out, "success.png"),
                                             f"{args.suite} {args.algo} seed {args.seed}", episodes=res["episodes"])
            save_checkpoint(policy, task_embs, args, k, os.path.join(args.out, f"task{k}.pt"))
            save_json(res, os.path.join(args.out, "results.json"))  # after the checkpoint: a task is done
            tqdm.write(f"== after task {k}: success {res['success'][-1]}  held-out NLL {res['nll'][-1]}\n"
                       f"   wrote {os.path.join(args.out, f'task{k}.pt')}, {os.path.join(args.out, 'results.json')}"
                       + (f", {os.path.join(args.out, 'success.png')}" if "metrics" in res else ""))
        if memory is not None:
            memory.add(train)
        if args.algo == "m2distill":  # M2Distill: the diff on ER, a frozen pi_old for the next task
            old = freeze(policy)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--suite", default="libero_object", help=f"LIBERO suite: {', '.join(data.SUITES)}")
    a("--algo", default="m2distill", choices=["sequential", "er", "m2distill"])
    a("--preset", choices=list(PRESETS), help="default: paper with --device cuda, else cpu")
    a("--data-dir", default="data", help="holds <suite>/<task>_demo.hdf5 (official layout)")
    a("--out", help="run folder (checkpoints, results.json); default runs/<suite>_<algo>_s<seed>")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=10000)
    a("--n-tasks", type=int, help="learn tasks 0..n-1 of the suite, in LIBERO's task order 0")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="current-task sequences per step (ER adds as many replayed)")
    a("--lr", type=float, default=1e-4)
    a("--n-demos", type=int, help="training demos per task (the first ones in the file)")
    a("--val-demos", type=int, help="held-out demos per task (the last ones) for the NLL matrix")
    a("--img-size", type=int, help="image side seen by the policy: 128 (LIBERO), or 64/32 area-downsampled")
    a("--seq-len", type=int, default=10)
    a("--grad-clip", type=float, default=100.0)
    a("--eval-every", type=int, help="rollouts of the current task every this many epochs (and at epoch 0)")
    a("--n-eval", type=int, help="episodes per task evaluation (0: no rollouts)")
    a("--max-steps", type=int, help="steps per episode")
    a("--eval-workers", type=int, default=os.cpu_count(), help="parallel simulator processes")
    a("--videos", action="store_true", help="write an MP4 of every rollout to <out>/videos")
    a("--low-eval-noise", action="store_true",
      help="LIBERO's GMMHead option: rollouts act with the drawn mode's mean (min std), not a full sample")
    a("--n-memories", type=int, default=1000, help="ER: sequences kept per past task")
    a("--replay", default="on", choices=["on", "off"], help="M2Distill/ER: mix replayed sequences into batches")
    a("--lambda-image", type=float, default=1.0, help="weight of L_image (0 switches it off)")
    a("--lambda-text", type=float, default=1.0, help="weight of L_text (0 switches it off)")
    a("--lambda-extra", type=float, default=1.0, help="weight of L_extra (0 switches it off)")
    a("--lambda-policy", type=float, default=1.0, help="weight of L_policy (0 switches it off)")
    a("--kl-samples", type=int, default=10, help="Monte Carlo samples N in L_policy")
    a("--kl-direction", default="forward", choices=["forward", "reverse"], help="KL(old||new) or KL(new||old)")
    a("--kl-timesteps", default="all", choices=["all", "last"], help="steps of each sequence L_policy covers")
    a("--task-emb", default="minilm", choices=["minilm", "bert", "onehot", "hash"])
    args = p.parse_args(argv)
    args.preset = args.preset or ("paper" if args.device.startswith("cuda") else "cpu")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("runs", f"{args.suite}_{args.algo}_s{args.seed}")
    for flag in ("epochs", "batch_size", "n_demos", "eval_every", "max_steps", "seq_len", "kl_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    res = run(args)
    print(json.dumps({k: res.get(k) for k in ("success", "fwt_k", "nll", "metrics")}))
    png = os.path.join(args.out, "success.png")
    print(f"Results: {os.path.join(args.out, 'results.json')}; checkpoints: {os.path.join(args.out, 'task<k>.pt')}"
          f" (k = 0..{len(res['tasks']) - 1})" + (f"; success matrix: {png}" if os.path.exists(png) else "") + ".")


if __name__ == "__main__":
    rollouts.cli(main)
