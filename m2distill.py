"""m2distill.py: M2Distill (Roy et al., "Multi-Modal Distillation for Lifelong Imitation Learning",
ICRA 2025) on LIBERO, with its two baselines in the same loop.

    python m2distill.py --suite libero_object                      # M2Distill, preset for this machine
    python m2distill.py --suite libero_object --algo er            # experience replay
    python m2distill.py --suite libero_object --algo sequential    # plain fine-tuning

Tasks T^1..T^K arrive one at a time. After task k the policy pi_theta is frozen into pi_old, and
while learning task k+1 M2Distill keeps pi_theta close to pi_old through four terms:

    L = L_BC + l_img L_image + l_text L_text + l_extra L_extra + l_pol L_policy

Sequential trains on L_BC alone; ER adds replayed past sequences to every batch; M2Distill is ER
plus the four distillation terms (README, "The paper, equation by equation")."""
import argparse
import copy
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate as rollouts
from data import CAMERAS, LOW_DIM
from model import (CKPT_FORMAT, ResNetT, augment_obs, fold_batchnorm, gmm_log_prob, gmm_sample, init_from,
                   read_checkpoint)

PRESETS = {  # flags a preset fills in when they are not given on the command line
    # LIBERO's protocol (SPEC.md section 5): 50 demos, 50 epochs, 128 px, 20 episodes of 600 steps.
    "paper": dict(n_tasks=10, epochs=50, batch_size=32, n_demos=50, val_demos=0, img_size=128, eval_every=5,
                  n_eval=20, max_steps=600),
    # This 2-core CPU (SPEC.md section 10): a small budget that finishes end to end within the hour.
    # Episodes of 300 steps: twice the scripted expert's mean demo (138-146 steps on LIBERO-Object).
    "cpu": dict(n_tasks=3, epochs=3, batch_size=16, n_demos=6, val_demos=2, img_size=32, eval_every=3,
                n_eval=2, max_steps=300),
    # The smallest budget measured to learn on this CPU (README, "Budget 3"): LIBERO-Goal task 8, 20 scripted
    # demos at 32 px, a 30-epoch cosine schedule (~6,800 steps of 16): 4 and 2 of 10 held-out init states at
    # epoch 30 in the two of four seeds whose gripper weights learnt when to open, 0 in the other two.
    "cpu-proof": dict(n_tasks=3, epochs=30, batch_size=16, n_demos=20, val_demos=5, img_size=32, eval_every=10,
                      n_eval=10, max_steps=300),
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
    t = slice(None) if timesteps == "all" else slice(-1, None)
    new_p, old_p = ([o[k][:, t] for k in ("means", "stds", "logits")] for o in (out, old))  # (B,T',M,D) x2, (B,T',M)
    if direction == "forward":
        a = gmm_sample(*old_p, n_samples, generator)  # (N, B, T', D)
        return (gmm_log_prob(*old_p, a) - gmm_log_prob(*new_p, a)).mean()
    a = gmm_sample(*[p.detach() for p in new_p], n_samples, generator)  # (N, B, T', D)
    log_q = gmm_log_prob(*new_p, a)
    d = log_q - gmm_log_prob(*old_p, a)
    score = (log_q * d.detach()).mean()
    return d.mean() + score - score.detach()


def total_loss(out, old, batch, args):
    """L = L_BC + l_img L_image + l_text L_text + l_extra L_extra + l_pol L_policy (no old model: L_BC) -> (L, terms),
    terms the unweighted L_BC, L_image, ... (a term whose lambda is 0 is off: not computed). L_BC covers the whole
    batch; the four distillation terms its rows batch["distill_rows"] ((B,) bool; absent: all rows), on which `old`
    was computed (train_step)."""
    terms, lam = {"bc": loss_bc(out, batch["actions"])}, {"bc": 1.0}
    if old is not None and torch.isfinite(terms["bc"]):  # non-finite outputs never reach the KL sampler
        rows = batch.get("distill_rows")
        new = out if rows is None else {k: v[rows] for k, v in out.items()}  # every output is (B, ...)
        fns = {"image": loss_image, "text": loss_text, "extra": loss_extra,
               "policy": lambda o, p: loss_policy(o, p, args.kl_samples, args.kl_direction, args.kl_timesteps)}
        lam.update({k: getattr(args, f"lambda_{k}") for k in fns})
        terms.update({k: f(new, old) for k, f in fns.items() if lam[k] > 0})
    return sum(lam[k] * v for k, v in terms.items()), terms


# ----------------------------------------------------------------------------- one step
def freeze(policy):
    """pi_old: a deep copy in eval mode, no gradient, batch norms folded (the same outputs, a cheaper forward)."""
    return fold_batchnorm(copy.deepcopy(policy)).requires_grad_(False)


def to_device(batch, task_embs, device):
    obs = {k: v.to(device, non_blocking=True) for k, v in batch["obs"].items()}
    return {"obs": obs, "actions": batch["actions"].to(device), "task_emb": task_embs[batch["task_id"]].to(device)}


def make_batch(dataset, idx, memory, batch_size, generator=None):
    """The current task's sequences `idx`; with replay, plus `batch_size` sequences from the memory (ER)."""
    batch = dataset.batch(idx)
    return data.cat_batches([batch, memory.sample(batch_size, generator)]) if memory else batch  # no or an empty memory


def gripper_wrong_weight(out, actions):
    """The GMM's mixture weight on gripper modes of the wrong sign, summed over the demo steps where the gripper is
    open and where it is closed (LIBERO's gripper command: -1 open, +1 closed):

        W_open   = sum_{(b,t): a_t^g < 0} sum_m w_m(o_<=t) [mu_m^g >= 0]
        W_closed = sum_{(b,t): a_t^g > 0} sum_m w_m(o_<=t) [mu_m^g <= 0]

    out: means (B, T, M, 7) and logits (B, T, M); actions (B, T, 7). -> tensor (4,): W_open, the open steps' count,
    W_closed, the closed steps' count (sums, so an epoch adds them up). A gripper that ignores the observation has
    W / count at about the demos' prior (0.75 / 0.25 on LIBERO-Goal's bowl tasks) and fails its rollouts, while the
    GMM loss hardly differs (README, Budget 3)."""
    w = out["logits"].detach().softmax(-1)  # (B, T, M)
    g, mu = actions[..., 6:7], out["means"].detach()[..., 6]  # (B, T, 1), (B, T, M)
    wrong = (w * (torch.sign(mu) != torch.sign(g))).sum(-1)  # (B, T); mu exactly 0 counts as wrong
    opened, closed = g[..., 0] < 0, g[..., 0] > 0
    return torch.stack([wrong[opened].sum(), opened.sum(), wrong[closed].sum(), closed.sum()]).float().cpu()


def train_step(policy, old, batch, opt, args, fit=None):
    """One gradient step on L; the old model runs once, without autograd, on the same batch (on its rows
    batch["distill_rows"] where given: --distill-on past), in eval mode while the policy is in train mode (so L_image
    and L_policy are not 0 at identical weights: README, "Choices"). `fit`, a (4,) tensor, has the step's
    gripper_wrong_weight added to it."""
    policy.train()
    batch = {**batch, "obs": augment_obs(batch["obs"])}  # one draw, seen by both models
    out = policy(batch["obs"], batch["task_emb"])
    rows = batch.get("distill_rows", slice(None))
    with torch.no_grad():
        old_out = None if old is None else old({k: v[rows] for k, v in batch["obs"].items()}, batch["task_emb"][rows])
    loss, terms = total_loss(out, old_out, batch, args)
    if fit is not None:
        fit += gripper_wrong_weight(out, batch["actions"])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} (unweighted terms: "
                                 f"{ {k: round(v.item(), 3) for k, v in terms.items()} }); lower --lr or check the "
                                 "demonstration file for NaN/inf values.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
    opt.step()
    return {k: v.item() for k, v in terms.items()}


@torch.no_grad()
def held_out_nll(policy, dataset, task_embs, device, batch_size=64):
    """L_BC of the policy (eval mode) on a held-out dataset, nats per action step -> (mean over its sequences,
    [mean over each held-out demo's sequences, in the demos' order]): the second gives intervals over demos."""
    policy.eval()
    nll = []  # (N,) one value per sequence
    for idx in torch.arange(len(dataset)).split(batch_size):
        b = to_device(dataset.batch(idx), task_embs, device)
        out = policy(b["obs"], b["task_emb"])
        nll.append(-gmm_log_prob(out["means"], out["stds"], out["logits"], b["actions"]).mean(1).cpu())  # (B, T) -> (B,)
    nll = torch.cat(nll)
    demo = torch.unique(dataset.demo_end, return_inverse=True)[1]  # (N,) 0..n_demos-1
    per_demo = torch.zeros(int(demo.max()) + 1, dtype=nll.dtype).index_add_(0, demo, nll) / torch.bincount(demo)
    return nll.mean().item(), per_demo.tolist()


def nll_row(policy, vals, task_embs, device):
    """Row j of the held-out NLL matrices after a task: (mean per task, per-demo means per task) over `vals`."""
    pairs = [held_out_nll(policy, v, task_embs, device) for v in vals]
    return [m for m, _ in pairs], [d for _, d in pairs]


# ----------------------------------------------------------------------------- files
def save_json(obj, path):
    """Strict JSON (ValueError on NaN/inf: a value not measured is None), written atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(policy, task_embs, args, j, path, task_emb=None):
    """task<j>.pt: the policy after the j-th task of the run (read back by model.read_checkpoint); `tasks`
    lists the LIBERO task ids it has learned, `task_emb` the {"kind", "dim"} of the task embeddings."""
    save_torch({"config": policy.config, "state_dict": policy.state_dict(), "task_embs": task_embs,
                "task_emb": task_emb, "suite": args.suite, "task": j, "tasks": args.tasks[:j + 1],
                "algo": args.algo, "format": CKPT_FORMAT}, path)


def save_torch(obj, path):
    """torch.save, atomically. A full disk (OSError, or the RuntimeError of torch's zip writer) leaves no .tmp and
    stops the run with one line naming the path and free space; finished tasks stay (results.json follows the .pt)."""
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:120]
        raise SystemExit(f"{path}: writing failed ({reason}); {free_mb(os.path.dirname(path))} MB free on that "
                         "disk. Free some space (or pass another --out) and rerun: the finished work is kept.") from None


def free_mb(folder):
    return shutil.disk_usage(folder or ".").free // 2**20


def check_room(policy, task_embs, args):
    """Stop before training a task whose checkpoints the disk of --out has no room for: task<k>.pt and
    progress.pt (weights, AdamW's two moments and the best weights so far), ~5.5x the weights + 1 MB."""
    need = (11 * sum(t.nbytes for t in policy.state_dict().values()) // 2 + task_embs.nbytes + 2**20) // 2**20
    free = free_mb(args.out)
    if free < need:
        raise SystemExit(f"--out {args.out}: {free} MB free on its disk, a checkpoint needs {need} MB; free some "
                         "space or pass another --out (the finished tasks are kept).")


def resume_state(args, j):
    """The weights after the run's j-th task, <out>/task<j>.pt, on --device (a GPU-trained run resumes on a CPU).
    SystemExit naming the file if it is missing, damaged, or another task's checkpoint."""
    path, fix = os.path.join(args.out, f"task{j}.pt"), (f"results.json in --out records task {j} as finished, so "
                                                        "resuming needs it: restore it, or pass another --out to start over")
    with rollouts.exits():
        ckpt = read_checkpoint(path, args.device, fix=fix)
    if ckpt.get("task", j) != j:
        raise SystemExit(f"{path} holds the weights after task {ckpt['task']} of its run, not {j}; {fix}.")
    return ckpt["state_dict"]


RUN_FLAGS = ("suite", "algo", "tasks", "epochs", "batch_size", "seed", "lr", "n_demos", "val_demos", "img_size",
             "seq_len", "eval_every", "n_eval", "max_steps", "n_memories", "replay", "lambda_image", "lambda_text",
             "lambda_extra", "lambda_policy", "kl_samples", "kl_direction", "kl_timesteps", "task_emb", "grad_clip",
             "init_from", "drop_noops", "low_eval_noise", "distill_on")
# Flags added after records were written, with the value those records ran with (record_flags).
ADDED_FLAGS = {"distill_on": "all", "drop_noops": False, "low_eval_noise": False, "init_from": None}


def record_flags(run):
    """A record's flags (its results.json "run", or progress.pt's) as this version names them: a flag added since
    with the value the record ran with (ADDED_FLAGS), and tasks 0..n_tasks-1 for a record from before --tasks."""
    run = {**ADDED_FLAGS, **run}
    if "n_tasks" in run:
        run.setdefault("tasks", list(range(run.pop("n_tasks"))))
    return run


def differ(theirs, ours, keys):
    """'flag value there, value here' for each flag of `keys` whose value differs between two runs' flags (dicts)."""
    return "; ".join(f"{k} {theirs.get(k)} there, {ours[k]} here" for k in keys if theirs.get(k) != ours[k])


# results.json lists, one entry per task
PER_TASK = ("tasks", "task_ids", "success", "episodes", "curves", "curve_episodes", "fwt_k", "nll", "nll_demos",
            "demos", "gripper_fit", "diagonal_fresh")
# Flags that act only from the second task on: every algorithm learns the first task the same way.
LATER_FLAGS = ("algo", "n_memories", "replay", "lambda_image", "lambda_text", "lambda_extra", "lambda_policy",
               "kl_samples", "kl_direction", "kl_timesteps", "distill_on")


def load_results(args):
    """The results of an earlier run in --out with the same flags (resume), or a fresh record (started from another
    run's first task with --first-task-from); makes the --out folder. SystemExit naming --out and the fix if it is a
    file, cannot be made, or holds a results.json not of ours (empty, cut off, {}) or of a run with other flags."""
    path = os.path.join(args.out, "results.json")
    run = {k: getattr(args, k) for k in RUN_FLAGS}
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out} is a file; pass a folder (it will hold results.json and task<k>.pt)."
                         if os.path.isfile(args.out) else
                         f"--out {args.out}: cannot make that folder ({e.strerror or e}); pass a writable one.")
    fresh = {"run": run, **{k: [] for k in PER_TASK}, "task_emb": None, "seconds": {}}
    if not os.path.exists(path):
        return first_task_from(args, fresh) if args.first_task_from else fresh
    try:
        res = json.load(open(path))
        assert isinstance(res, dict) and isinstance(res.get("run"), dict)
        assert all(isinstance(res[k], type(fresh[k])) for k in ("tasks", "success", "curves", "fwt_k", "nll", "seconds"))
    except (ValueError, AssertionError, KeyError, UnicodeDecodeError):
        raise SystemExit(f"--out {args.out}: {path} is not a results record of m2distill (empty, cut off or "
                         "edited); move it away (or pass another --out) to start over.") from None
    for k in PER_TASK:  # a record from before these fields (or written on by a checkout without them): not known
        res[k] = (res.get(k) or []) + [None] * (len(res["tasks"]) - len(res.get(k) or []))
    for k, shape in (("episodes", "success"), ("curve_episodes", "curves")):  # one count per cell or curve point
        res[k] = [row or (None if like is None else [None] * len(like)) for row, like in zip(res[k], res[shape])]
    res.setdefault("task_emb", None)
    res["run"] = record_flags(res["run"])
    res["task_ids"] = res["run"]["tasks"][:len(res["tasks"])]  # a record from before task_ids: known from its flags
    diff = differ(res["run"], run, RUN_FLAGS)
    if diff:
        raise SystemExit(f"--out {args.out} holds a run with other flags ({diff}); "
                         "pass another --out, or delete that folder to start over.")
    return res


def first_task_from(args, res):
    """Take the first task of the run in `args.first_task_from` (finished there: its task0.pt and its results' first
    entries), so that Sequential, ER and M2Distill start task 2 from one and the same policy."""
    src = args.first_task_from
    try:
        other = json.load(open(os.path.join(src, "results.json")))
        other["run"] = record_flags(other["run"])  # not a dict with a "run" dict: KeyError or TypeError
        assert isinstance(other["tasks"], list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise SystemExit(f"--first-task-from {src}: no readable results.json of m2distill.py there; pass a run "
                         "folder.") from None
    diff = differ({**other["run"], "tasks": other["run"]["tasks"][:1]}, {**vars(args), "tasks": args.tasks[:1]},
                  [k for k in RUN_FLAGS if k not in LATER_FLAGS])  # tasks: the first one
    if diff or not other["tasks"]:
        raise SystemExit(f"--first-task-from {src}: " + (f"that run has other flags ({diff})" if diff
                         else "that run has not finished its first task") + "; train the first task here instead.")
    with rollouts.exits(f"--first-task-from {src}: "):
        ckpt = read_checkpoint(os.path.join(src, "task0.pt"), fix="train the first task here instead")
    save_torch(ckpt, os.path.join(args.out, "task0.pt"))
    res.update({k: other.get(k, [None])[:1] for k in PER_TASK}, first_task_from=src, task_emb=other.get("task_emb"),
               task_ids=args.tasks[:1])  # the same first task (checked above), also where that record has no task_ids
    return res


# ----------------------------------------------------------------------------- the lifelong loop
def load_task_data(args, bench, k, res, j):
    """Task k, the j-th of the run: (train, val, sha1), its training and held-out demos (data.check_task_file's
    split; val None when none are held out) and their data.demos_sha1. SystemExit naming --data-dir when the record
    `res` learnt task j from other demos (resumed, or taken with --first-task-from, with another data folder)."""
    path = data.task_file(args.data_dir, args.suite, bench.get_task(k).name)
    split = data.check_task_file(path, args.n_demos, args.val_demos, args.img_size)
    read = lambda demos: data.SequenceDataset.from_hdf5(path, k, args.seq_len, demos, args.img_size, args.drop_noops)
    train, val = read(split["train"]), read(split["val"]) if split["val"] else None
    sha1, had = data.demos_sha1(train, val), (res["demos"][j] or {}).get("sha1") if j < len(res["demos"]) else None
    if had not in (None, sha1):  # None: not learnt yet, or a record from before sha1
        src = res.get("first_task_from") if j == 0 and res.get("first_task_from") else args.out
        raise SystemExit(f"--data-dir {args.data_dir}: task {k}'s demos are not those {src} learnt it from (actions "
                         f"sha1 {had} there, {sha1} here); pass the data it was trained on, or another --out.")
    return train, val, sha1


def check_data(args, bench):
    """Every task file of the run that exists, checked before anything is collected or trained; one line
    per file with fewer training demos than --n-demos. SystemExit naming the file and the fix."""
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data-dir {args.data_dir} is a file; pass the folder that holds <suite>/<task>_demo.hdf5.")
    for k in args.tasks:
        path = data.task_file(args.data_dir, args.suite, bench.get_task(k).name)
        if os.path.exists(path):
            with rollouts.exits():
                split = data.check_task_file(path, args.n_demos, args.val_demos, args.img_size)
            if len(split["train"]) < args.n_demos:
                print(f"{path}: {split['total']} demos, {len(split['val'])} held out: task {k} trains on "
                      f"{len(split['train'])}, not --n-demos {args.n_demos}.", flush=True)


def ensure_data(args, bench):
    """Every task file the run needs. Missing ones are generated in the simulator by the scripted expert
    (expert.py), in the official layout, after one line saying where official data would go."""
    path = lambda k: data.task_file(args.data_dir, args.suite, bench.get_task(k).name)
    missing = [k for k in args.tasks if not os.path.exists(path(k))]
    if not missing:
        return
    import expert
    where = path(missing[0])
    unsupported = [k for k in missing if k not in expert.SUPPORTED.get(args.suite, ())]
    if unsupported:
        raise SystemExit(f"--data-dir {args.data_dir}: no {where} (and {len(missing) - 1} more), and the scripted "
                         f"expert cannot solve {args.suite} task(s) {unsupported}. "
                         + data.download_hint(args.suite, args.data_dir))
    print(f"No official data for {len(missing)} task(s) in --data-dir {args.data_dir} (e.g. {where}; "
          + data.download_hint(args.suite, args.data_dir) + f") Collecting {args.n_demos + args.val_demos} scripted "
          "demonstrations per task in the simulator instead.", flush=True)
    expert.collect(args.suite, args.data_dir, args.n_demos + args.val_demos, missing, seed=args.seed)


def learn_task(policy, old, train, memory, task_embs, args, j, evaluate, res):
    """LIBERO's learn_one_task for the j-th task of the run: fresh AdamW + cosine schedule, epochs 1..E, rollouts of
    the task at epochs 0, eval_every, ..., the best checkpoint (ties: the later) loaded at the end. Every epoch the
    whole training state goes to <out>/progress.pt: a run killed mid-task resumes after its last finished epoch and
    ends exactly as an uninterrupted one; SystemExit if progress.pt is damaged, from a run with other flags (a
    --first-task-from run writes results.json only after its second task, so progress.pt carries the flags) or
    from other training demos (data.demos_sha1).
    Returns the success curve, FWT_k, the episodes of each curve point and the gripper fit of every epoch 1..E:
    [W_open / open steps, W_closed / closed steps] (gripper_wrong_weight) over the batches the epoch trained on
    (None: no such step)."""
    check_room(policy, task_embs, args)  # before training, not after: a full disk costs no training time
    k = args.tasks[j]  # LIBERO task id
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1), eta_min=1e-5)
    g = torch.Generator().manual_seed(args.seed * 1000 + j)  # batches and replay draws
    torch.manual_seed(args.seed * 1000 + j)  # augmentation, dropout, KL samples: one stream per task
    st = {"task": j, "epoch": -1, "curve": [], "curve_episodes": [], "best": -1.0, "best_state": None, "best_idx": 0,
          "gripper": []}
    progress, sha1 = os.path.join(args.out, "progress.pt"), data.demos_sha1(train)
    base = {k_: res["seconds"].get(k_, 0) for k_ in ("train", "eval")}  # this task's seconds: res's minus these
    if os.path.exists(progress):
        try:
            saved = torch.load(progress, map_location=args.device, weights_only=True)
        except Exception as e:  # a file cut short by a kill during its write, or not ours: a torch error of any kind
            raise SystemExit(f"{progress} is damaged ({type(e).__name__}); delete it to learn task {k} again from its "
                             "first epoch (the finished tasks are kept).") from None
        if saved["task"] == j:  # killed in the middle of this task: pick up after its last finished epoch
            other = "run" in saved and differ(record_flags(saved["run"]), res["run"],  # no "run": from before it
                                              [f for f in RUN_FLAGS if j or f not in LATER_FLAGS])  # task 0: not LATER
            if other:
                raise SystemExit(f"{progress} is task {k} of a run with other flags ({other}); pass another "
                                 f"--out, or delete it to learn task {k} again with these flags.")
            if saved.get("demos_sha1", sha1) != sha1:  # None: a progress.pt from before the field
                raise SystemExit(f"--data-dir {args.data_dir}: {progress} learnt task {k} from other demos (actions "
                                 f"sha1 {saved['demos_sha1']} there, {sha1} here); pass the data it was trained on.")
            for name, obj in (("policy", policy), ("opt", opt), ("sched", sched)):
                obj.load_state_dict(saved[name])
            g.set_state(saved["g"])
            torch.set_rng_state(saved["rng"])
            if saved["cuda_rng"]:
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            if "task_seconds" not in saved:  # a progress.pt from before the field: its totals
                saved["task_seconds"] = {k_: saved["seconds"].get(k_, 0) - v for k_, v in base.items()}
            for k_, v in saved["task_seconds"].items():  # added: this process may have rolled out before resuming
                res["seconds"][k_] = res["seconds"].get(k_, 0) + v
            saved.setdefault("gripper", [None] * max(saved["epoch"], 0))  # a progress.pt from before the field
            st = {k_: saved[k_] for k_ in st}
            tqdm.write(f"task {k}: resuming after epoch {st['epoch']} ({progress})")
    for epoch in range(st["epoch"] + 1, args.epochs + 1):
        if epoch > 0:
            t0 = time.time()
            order, fit = torch.randperm(len(train), generator=g).split(args.batch_size), torch.zeros(4)
            bar = tqdm(order, desc=f"task {k} epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True)
            for idx in bar:
                raw = make_batch(train, idx, memory, args.batch_size, g)
                batch = to_device(raw, task_embs, args.device)
                if args.distill_on == "past":  # the replayed rows: samples of earlier tasks
                    batch["distill_rows"] = (raw["task_id"] != k).to(args.device)
                terms = train_step(policy, old, batch, opt, args, fit)
                bar.set_postfix({k_: f"{v:.3f}" for k_, v in terms.items()})
            sched.step()
            st["gripper"].append([round((fit[i] / fit[i + 1]).item(), 4) if fit[i + 1] else None for i in (0, 2)])
            res["seconds"]["train"] = res["seconds"].get("train", 0) + time.time() - t0
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            success, episodes = evaluate(policy, [k])[k]
            st["curve"].append(success)
            st["curve_episodes"].append(episodes)
            tqdm.write(f"task {k} epoch {epoch}: success {success}" + (f" ({episodes} episodes)" if episodes else "")
                       + (f"; gripper weight on the wrong sign, demo open / closed: {st['gripper'][-1]}" if epoch else ""))
            if success is None or success >= st["best"]:
                st.update(best=success or 0.0, best_state=copy.deepcopy(policy.state_dict()),
                          best_idx=len(st["curve"]) - 1)
        st["epoch"] = epoch
        save_torch({**st, "policy": policy.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "g": g.get_state(), "rng": torch.get_rng_state(),
                    "task_seconds": {k_: res["seconds"].get(k_, 0) - v for k_, v in base.items()}, "run": res["run"],
                    "demos_sha1": sha1,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, progress)
    policy.load_state_dict(st["best_state"])
    curve, b = st["curve"], st["best_idx"]
    fwt_k = None if curve[0] is None else float(np.mean(curve[:b] + [curve[b]] * (len(curve) - b)))  # held at its best
    return curve, fwt_k, st["curve_episodes"], st["gripper"]


def run(args, evaluate=None):
    """The whole lifelong run; resumes after the last finished task found in --out."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    bench = data.suite_benchmark(args.suite)
    n = bench.get_num_tasks()
    bad, twice = [k for k in args.tasks if not 0 <= k < n], sorted({k for k in args.tasks if args.tasks.count(k) > 1})
    if bad or twice:
        raise SystemExit(f"--tasks {' '.join(map(str, args.tasks))} (or --n-tasks {len(args.tasks)}): {args.suite} has "
                         f"tasks 0..{n - 1}" + (f", not {bad}" if bad else "") + (f"; {twice} given twice" if twice
                                                                                  else "") + ": give each at most once.")
    res = load_results(args)  # --out and the flags against it, then the data: all before collecting or training
    languages = [bench.get_task(i).language for i in range(n)]  # from LIBERO, not the files
    task_embs, kind = data.task_embeddings(languages, args.task_emb, cache_dir=data.user_cache_dir())
    task_emb = {"kind": kind, "dim": task_embs.shape[1]}
    if res["task_emb"] not in (None, task_emb):
        raise SystemExit(f"--out {args.out} was trained with task embedding {res['task_emb']}, this run computes "
                         f"{task_emb}; pass another --out to start a run with it.")
    res["task_emb"] = task_emb
    policy = ResNetT(d_lang=task_embs.shape[1], img_size=args.img_size, seq_len=args.seq_len).to(args.device)
    if args.init_from and not res["tasks"]:  # before task 0 (and before any demo is collected); a resumed run
        with rollouts.exits("--init-from ", "" if kind == args.task_emb else f" (--task-emb {args.task_emb} fell back "
                            f"to {kind}, as said above: {args.task_emb} is not on disk)"):  # restores its own weights
            init_from(policy, args.init_from)
    check_data(args, bench)
    t0 = time.time()
    ensure_data(args, bench)
    res["seconds"]["collect"] = res["seconds"].get("collect", 0) + time.time() - t0
    finished = len(res["tasks"]) >= args.n_tasks
    # a record from before nll_demos or diagonal_fresh gets them from its checkpoints
    stale = [j for j, row in enumerate(res["success"]) if row[j] is not None and res["diagonal_fresh"][j] is None]
    lacks = stale or args.val_demos and None in res["nll_demos"]
    if res["tasks"]:
        if finished:
            resume_state(args, len(res["tasks"]) - 1)  # its last checkpoint is there and readable
        print(f"--out {args.out} holds {len(res['tasks'])} finished task(s) of {args.n_tasks}: "
              + ", ".join(res["tasks"]) + ("; resuming with the next one." if not finished else
                                           "; measuring what its record lacks from its checkpoints." if lacks else
                                           "; nothing left to do."), flush=True)
    if finished and not lacks:
        return res
    if evaluate is None and args.n_eval > 0:  # rollouts in the simulator, workers kept for the whole run
        with rollouts.Evaluator(args.suite, args.n_eval, args.max_steps, args.eval_workers, os.path.join(
                args.out, "videos") if args.videos else None, seed=args.seed, low_eval_noise=args.low_eval_noise) as ev:
            ev.check(args.tasks[0])  # the simulator renders: checked before any training
            return lifelong(args, bench, policy, task_embs, timed(lambda p, ids, stream=0: ev(p, ids, task_embs, stream),
                                                                  res), res)
    evaluate = evaluate or (lambda policy, ids, stream=0: {i: (None, 0) for i in ids})  # --n-eval 0: not measured
    return lifelong(args, bench, policy, task_embs, timed(evaluate, res), res)


def timed(evaluate, res):
    """The evaluation hook, its seconds added to res["seconds"]["eval"]. evaluate(policy, task_ids, stream=0) ->
    {task_id: (success rate or None if not measured, episodes it is made of)} (evaluate.Evaluator; stream 1: other
    episodes from the same init states)."""
    def hook(policy, ids, stream=0):
        t0 = time.time()
        out = evaluate(policy, ids, stream)
        res["seconds"]["eval"] = res["seconds"].get("eval", 0) + time.time() - t0
        return out
    return hook


def score(args, res):
    """FWT, NBT, AUC and the heatmap once rollouts were measured, then results.json (atomically)."""
    if None not in res["fwt_k"]:
        res["metrics"] = rollouts.lifelong_metrics(res["success"], res["fwt_k"])
        rollouts.plot_success_matrix(res["success"], res["metrics"], os.path.join(args.out, "success.png"),
                                     f"{args.suite} {args.algo} seed {args.seed}", res["task_ids"],
                                     episodes=res["episodes"])
    save_json(res, os.path.join(args.out, "results.json"))


def lifelong(args, bench, policy, task_embs, evaluate, res):
    """Tasks 0..K-1 in order: learn, evaluate tasks 0..k into row k (task k on fresh episodes), checkpoint, then
    replay and pi_old."""
    use_replay = args.algo in ("er", "m2distill") and args.replay == "on"  # ER: the diff on Sequential
    memory = data.ReplayMemory(args.n_memories) if use_replay else None
    old, vals, done = None, [], len(res["tasks"])
    for j, k in enumerate(args.tasks):  # j: the task's place in the run, k: its LIBERO task id
        t0 = time.time()
        train, val, sha1 = load_task_data(args, bench, k, res, j)
        vals.append(val)
        res["seconds"]["data"] = res["seconds"].get("data", 0) + time.time() - t0
        if j < done and val and res["nll_demos"][j] is None:  # a record from before nll_demos: from task<j>.pt
            policy.load_state_dict(resume_state(args, j))
            res["nll_demos"][j] = nll_row(policy, vals, task_embs, args.device)[1]
            save_json(res, os.path.join(args.out, "results.json"))
        if j < done and res["success"][j][j] is not None and res["diagonal_fresh"][j] is None:  # the curve's best
            policy.load_state_dict(resume_state(args, j))
            (res["success"][j][j], res["episodes"][j][j]), res["diagonal_fresh"][j] = evaluate(policy, [k], 1)[k], True
            score(args, res)
        if j == done - 1:  # tasks finished before the run was stopped: restore the last, redo none
            policy.load_state_dict(resume_state(args, j))
        elif j >= done:
            tqdm.write(f"== task {k} ({j + 1} of {len(args.tasks)}): {bench.get_task(k).language} "
                       f"({len(train)} sequences)")
            curve, fwt_k, curve_episodes, gripper_fit = learn_task(policy, old, train, memory, task_embs, args, j,
                                                                   evaluate, res)
            # row j: the earlier tasks, and task k on other episodes than the curve's, which chose this checkpoint
            # (LIBERO reruns it with unseeded sampling): c_{k,k} is measured, not the best of the curve's draws
            row = {**(evaluate(policy, args.tasks[:j]) if j else {}), **evaluate(policy, [k], 1)}
            nll, nll_demos = nll_row(policy, vals, task_embs, args.device) if val else (None, None)
            new = dict(curves=curve, fwt_k=fwt_k, curve_episodes=curve_episodes, gripper_fit=gripper_fit, task_ids=k,
                       tasks=bench.get_task(k).name, success=[row[i][0] for i in args.tasks[:j + 1]],
                       episodes=[row[i][1] for i in args.tasks[:j + 1]], nll=nll, nll_demos=nll_demos,
                       diagonal_fresh=True if row[k][0] is not None else None,  # None: c_{k,k} not measured
                       demos={"n_train": train.n_demos, "n_val": val.n_demos if val else 0, "train": train.demos,
                              "val": val.demos if val else [], "sha1": sha1})
            for key in PER_TASK:  # one entry in every per-task list of the record
                res[key].append(new[key])
            save_checkpoint(policy, task_embs, args, j, os.path.join(args.out, f"task{j}.pt"), res["task_emb"])
            score(args, res)  # after the checkpoint: a task is done
            if os.path.exists(os.path.join(args.out, "progress.pt")):  # this task's: done with it
                os.remove(os.path.join(args.out, "progress.pt"))
            tqdm.write(f"== after task {k}: success {res['success'][-1]}  held-out NLL {res['nll'][-1]}\n"
                       f"   wrote {os.path.join(args.out, f'task{j}.pt')}, {os.path.join(args.out, 'results.json')}"
                       + (f", {os.path.join(args.out, 'success.png')}" if "metrics" in res else ""))
        if memory is not None:
            memory.add(train)
        if args.algo == "m2distill":  # M2Distill: the diff on ER, a frozen pi_old for the next task
            old = freeze(policy)
    return res


# Allowed values of the numeric flags: (least, most), both included, None: no bound; POSITIVE ones must
# also be > 0. NaN and inf are refused. (--n-tasks is checked against the suite's task count in run.)
FLAG_RANGES = {"n_tasks": (1, None), "epochs": (1, None), "batch_size": (1, None), "lr": (0, None),
               "seed": (0, 2**32 - 1), "n_demos": (1, None), "val_demos": (0, None), "img_size": (8, None),
               "seq_len": (1, None), "grad_clip": (0, None), "eval_every": (1, None), "n_eval": (0, None),
               "max_steps": (1, None), "eval_workers": (1, None), "n_memories": (0, None), "kl_samples": (1, None),
               **{f"lambda_{m}": (0, None) for m in ("image", "text", "extra", "policy")}}
POSITIVE = ("lr", "grad_clip")


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
    a("--tasks", type=int, nargs="+", help="learn these LIBERO task ids in this order (default 0..n-1)")
    a("--first-task-from", metavar="RUN", help="start from the finished first task of this run (same data, "
      "flags and first task; any algorithm): task 0 is trained once for a whole comparison")
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
    for m in ("image", "text", "extra", "policy"):
        a(f"--lambda-{m}", type=float, default=1.0, help=f"weight of L_{m} (0 switches it off)")
    a("--kl-samples", type=int, default=10, help="Monte Carlo samples N in L_policy")
    a("--kl-direction", default="forward", choices=["forward", "reverse"], help="KL(old||new) or KL(new||old)")
    a("--kl-timesteps", default="all", choices=["all", "last"], help="steps of each sequence L_policy covers")
    a("--distill-on", default="all", choices=["all", "past"], help="M2Distill: the samples the four distillation "
      "terms compare pi_theta and pi_old on: all (current and replayed) or past (the replayed ones only)")
    a("--task-emb", default="minilm", choices=["minilm", "bert", "onehot", "hash"])
    a("--drop-noops", action="store_true", help="train without the demos' no-op steps (no arm motion, gripper "
      "command unchanged), as OpenVLA's regenerated LIBERO data")
    a("--init-from", metavar="PATH", help="start task 0 from these weights: LIBERO's BCTransformerPolicy checkpoint "
                                          "(its task embedding: --task-emb bert) or a task<k>.pt of m2distill.py")
    args = p.parse_args(argv)
    args.preset = args.preset or ("paper" if args.device.startswith("cuda") else "cpu")
    if args.tasks and args.n_tasks not in (None, len(args.tasks)):
        p.error(f"--n-tasks {args.n_tasks} and --tasks {' '.join(map(str, args.tasks))}: give one of them")
    args.n_tasks = len(args.tasks) if args.tasks else args.n_tasks
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tasks = args.tasks or list(range(args.n_tasks))
    args.out = args.out or os.path.join("runs", f"{args.suite}_{args.algo}_s{args.seed}")
    rollouts.check_flags(args, FLAG_RANGES, POSITIVE)
    if args.algo == "m2distill" and args.distill_on == "past" and (args.replay == "off" or args.n_memories == 0):
        p.error("--distill-on past distils on the replayed samples: it needs --replay on and --n-memories > 0")
    if args.init_from and not os.path.isfile(args.init_from):
        raise SystemExit(f"--init-from {args.init_from}: " + ("a directory" if os.path.isdir(args.init_from) else
                         "no such file") + "; pass LIBERO's checkpoint file or a task<k>.pt of ours.")
    return args


def main(argv=None):
    args = parse_args(argv)
    made = not os.path.exists(args.out)
    try:
        res = run(args)
    except BaseException:  # stopped before it wrote anything (bad input): no empty --out left behind
        if made and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    print(json.dumps({k: res.get(k) for k in ("success", "fwt_k", "nll", "metrics")}))
    png = os.path.join(args.out, "success.png")
    print(f"Results: {os.path.join(args.out, 'results.json')}; checkpoints: {os.path.join(args.out, 'task<k>.pt')}"
          f" (k = 0..{len(res['tasks']) - 1})" + (f"; success matrix: {png}" if os.path.exists(png) else "") + ".")


if __name__ == "__main__":
    rollouts.cli(main)
