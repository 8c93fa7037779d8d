"""aggregate.py: the paper-style table from many runs' results.json, and one picture (issue 13's comparison).

    python evaluate.py --aggregate 'runs/*' --png table.png

A module of its own, as expert.py: nothing in a run needs it (m2distill.py and evaluate.py make each run's numbers).
"""
import glob
import hashlib
import json
import os
import textwrap
from collections import Counter

import numpy as np
from scipy.stats import t as student_t

from evaluate import draw_matrix, lifelong_metrics, write_png
from m2distill import record_flags


def mean_ci(xs, bounds=(-np.inf, np.inf)):
    """Mean and 95% Student-t interval over seeds, (mean, lo, hi); None values are left out; n = 1 gives
    no interval (lo = hi = None); the t quantile of n - 1 degrees of freedom at any n (scipy). The interval is cut
    to `bounds`, the range the quantity can take (FWT and AUC [0, 1], NBT [-1, 1]): a rate's t-interval over few
    seeds can reach past it."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return (float(xs[0]) if xs else None), None, None
    m = float(np.mean(xs))
    h = float(student_t.ppf(0.975, len(xs) - 1)) * float(np.std(xs, ddof=1)) / np.sqrt(len(xs))
    return m, max(m - h, bounds[0]), min(m + h, bounds[1])


def wilson(successes, n, z=1.96):
    """Wilson score interval (lo, hi) of a success rate from `successes` of `n` episodes (95% for z=1.96)."""
    if n == 0:
        return None, None
    p = successes / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))  # rounding: -3e-17 at 0 of n


def read_results(path):
    """One run's results.json; SystemExit naming the file unless it is a finished record of m2distill.py."""
    try:
        res = json.load(open(path))
        assert isinstance(res, dict) and isinstance(res["run"], dict) and isinstance(res["success"], list)
    except (OSError, ValueError, AssertionError, KeyError, TypeError):
        raise SystemExit(f"--aggregate: {path} is not a results.json of m2distill.py (cut off, edited or another "
                         "file); move it out of the glob or give a narrower one.") from None
    res["run"] = record_flags(res["run"])  # a record from before a flag ran with its default
    order = res["run"].get("tasks") or res.get("task_ids") or list(range(len(res["success"])))  # before task_ids: flags
    res["task_ids"] = order[:len(res["success"])]
    return res


def acts(run, k):
    """Whether flag k acts in a run of run["algo"]: the distillation flags (lambda_*, kl_*, distill_on) in M2Distill
    only, the replay memory's in ER and M2Distill: a label names only the flags that act (a Sequential run's
    lambda_policy of 1 does not set it apart from one of 0.1)."""
    if k.startswith(("lambda_", "kl_")) or k == "distill_on":
        return run["algo"] == "m2distill"
    return not (k in ("n_memories", "replay") and run["algo"] == "sequential")


def common_tasks(named):
    """[(path, results)] -> the results cut to the tasks every run has finished (a run stopped after task 2 of 3
    sits beside finished ones): success, episodes, fwt_k, nll, task_ids to the first K, and FWT/NBT/AUC recomputed
    from them (evaluate.lifelong_metrics: what the run itself wrote when it had finished task K). Prints one line
    when it cuts; SystemExit naming two files whose task orders differ within those K tasks."""
    K = min(len(r["success"]) for _, r in named)
    ids = [(p, r["task_ids"][:K]) for p, r in named]
    for p, i in ids:
        if i != ids[0][1]:
            raise SystemExit(f"--aggregate: {ids[0][0]} learnt tasks {ids[0][1]} first, {p} {i}: runs in one table "
                             "need the same task order; give a glob of runs with the same --tasks.")
    if all(len(r["success"]) == K for _, r in named):
        return [r for _, r in named]
    print(f"(compared on the first {K} task(s), {ids[0][1]}: every run has finished those; the others finished "
          + ", ".join(f"{p} {len(r['success'])}" for p, r in named if len(r["success"]) > K) + ")")
    out = []
    for _, r in named:
        cut = {k: r[k][:K] for k in ("success", "episodes", "curves", "curve_episodes", "fwt_k", "nll", "nll_demos",
                                     "task_ids", "demos")
               if r.get(k) is not None}
        if len(r["success"]) > K:
            measured = "fwt_k" in cut and None not in cut["fwt_k"] and all(None not in row for row in cut["success"])
            cut["metrics"] = lifelong_metrics(cut["success"], cut["fwt_k"]) if measured else None  # --n-eval 0: none
        out.append({**r, **cut})
    return out


def episode_intervals(r, draws=4000, seed=0):
    """One run's FWT, NBT, AUC with 95% intervals from the episodes behind them, for a group of one seed:
    {"fwt"|"nbt"|"auc": (the run's value, lo, hi)}, or None for a run without curves or with a cell unmeasured.

    Each measured success rate (every point of a task's curve, every cell of the matrix), s of n episodes, is drawn
    from its Jeffreys posterior Beta(s + 1/2, n - s + 1/2); in each draw FWT_k holds the drawn curve at the run's
    best checkpoint (the last maximum of the curve, as learn_task chose it), and c_{k,k} is drawn from its own cell
    (diagonal_fresh: other episodes) or, in a record from before, is that curve point; evaluate.lifelong_metrics
    turns each of `draws` draws into FWT, NBT, AUC, and lo, hi are their 2.5 and 97.5% quantiles: a 95% credible
    interval. The posterior of 0 of n has mean 1/(2n + 2), so with several cells at 0 of n those quantiles can both
    sit above the run's value (4 curve points at 0 of 10: FWT 0 [0.005, ...]); the interval is then widened to hold
    it, as Brown, Cai & DasGupta (2001) set the Jeffreys interval's lower end to 0 at 0 of n. The spread of one
    run's episodes, not over seeds."""
    curves, ce, succ, eps = (r.get(k) for k in ("curves", "curve_episodes", "success", "episodes"))
    if (not (curves and ce and eps and r.get("metrics")) or len(curves) != len(succ)
            or any(row is None or None in row for row in curves + succ + ce + eps)):  # a count or rate not recorded
        return None
    rng = np.random.default_rng(seed)
    beta = lambda p, n: rng.beta(round(p * n) + 0.5, n - round(p * n) + 0.5, draws)  # (draws,)
    fwt, c = [], [[None] * len(row) for row in succ]  # fwt[k]: (draws,), c[k][t]: (draws,)
    for k, (curve, ns) in enumerate(zip(curves, ce)):
        b = len(curve) - 1 - int(np.argmax(curve[::-1]))  # the last best point
        x = np.stack([beta(p, n) for p, n in zip(curve, ns)], 1)  # (draws, points)
        fwt.append(np.concatenate([x[:, :b], np.repeat(x[:, b:b + 1], len(curve) - b, 1)], 1).mean(1))
        c[k][k] = beta(succ[k][k], eps[k][k]) if (r.get("diagonal_fresh") or [None] * len(succ))[k] else x[:, b]
        for t in range(k):
            c[k][t] = beta(succ[k][t], eps[k][t])
    m = [lifelong_metrics([[c[k][t][d] for t in range(k + 1)] for k in range(len(c))], [f[d] for f in fwt])
         for d in range(draws)]
    out = {}
    for key in ("fwt", "nbt", "auc"):
        v = r["metrics"][key]
        lo, hi = np.quantile([x[key] for x in m], [0.025, 0.975]).tolist() if v is not None else (None, None)
        out[key] = (v, lo, hi) if v is None else (v, min(lo, v), max(hi, v))  # widened to hold the run's value
    return out


def nll_intervals(rs):
    """A group's held-out NLL matrix, cell (k, t) = (mean, lo, hi), and what its 95% t-intervals are over: seeds
    (mean of the runs' nll), or, for one run with nll_demos, its held-out demos; None: one run without them.
    ([], None) without NLL."""
    if not all(r.get("nll") and None not in r["nll"] for r in rs):
        return [], None
    if len(rs) == 1 and rs[0].get("nll_demos") and None not in rs[0]["nll_demos"]:
        return [[mean_ci(d) for d in row] for row in rs[0]["nll_demos"]], "held-out demos"
    return ([[mean_ci([r["nll"][k][t] for r in rs]) for t in range(k + 1)] for k in range(len(rs[0]["nll"]))],
            "seeds" if len(rs) > 1 else None)


def aggregate(pattern, png=None):
    """The paper-style table from many runs' results.json (`pattern`: a glob of run folders or files, or a list of
    them; a file that several match is read once).

    Runs with the same flags (those that act, acts) and demos (run["data"], from each task's data.demos_sha1; a
    record from before it joins the one set of demos its flags ran on, said in a line) but the seed form one group (label: the algorithm and the flags that differ between
    groups, each named only in the groups that differ from the value most groups share, printed once). Per group:
    FWT, NBT, AUC as mean and 95% t-interval over seeds (one seed: the interval of its episodes, episode_intervals;
    g["metrics_over"] says which); the success matrix pooled over seeds (successes / episodes) with a Wilson interval
    per cell; the held-out NLL forgetting (mean over k < K of nll[K-1][k] - nll[k][k], in nats) where held-out demos
    were kept. Runs that finished more tasks than others
    are compared on the tasks all finished (common_tasks). Returns the groups, prints the markdown
    table, writes `png` (plot_aggregate)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = [p for p in sorted({p if p.endswith(".json") else os.path.join(p, "results.json")
                                for pat in patterns for p in glob.glob(pat)}) if os.path.exists(p)]
    runs = [read_results(p) for p in paths]
    if not runs:
        raise SystemExit(f"--aggregate {' '.join(map(repr, patterns))}: no results.json there; give a glob of run "
                         "folders, e.g. 'runs/*'.")
    old = [p for p, r in zip(paths, runs) if r.get("metrics") and not all(r.get("diagonal_fresh") or [None])]
    if old:
        print(f"({', '.join(old)}: c_kk is its curve's best point (a record from before diagonal_fresh), biased "
              "upward, and NBT with it; rerun each one's command to measure c_kk on fresh episodes)")
    runs = common_tasks([(p, r) for p, r in zip(paths, runs)])
    for r in runs:  # the demos each task was learnt from (data.demos_sha1): runs on other demos are not seeds of one
        shas = [(d or {}).get("sha1") for d in r.get("demos") or []]  # group; None: a record from before sha1
        known = len(shas) == len(r["success"]) and None not in shas
        r["run"]["data"] = hashlib.sha1(" ".join(shas).encode()).hexdigest()[:8] if known else None
    same_flags = lambda run: json.dumps({k: v for k, v in run.items() if k not in ("seed", "data") and acts(run, k)},
                                        sort_keys=True)
    seen_data = {}  # flags -> the demos their recorded runs learnt from
    for r in runs:
        seen_data.setdefault(same_flags(r["run"]), set()).add(r["run"]["data"])
    joined = []
    for p, r in zip(paths, runs):  # a record from before the sha1 joins the one set of demos its flags were run on
        known = seen_data[same_flags(r["run"])] - {None}
        if r["run"]["data"] is None and len(known) == 1:
            r["run"]["data"] = next(iter(known))
            joined.append(p)
    if joined:
        print(f"({', '.join(joined)}: recorded before the demos' sha1; grouped with the runs of the same flags, "
              "assumed to be on the same demos)")
    keys = sorted({k for r in runs for k in r["run"] if k != "seed"})
    varying = [k for k in keys if len({json.dumps(r["run"].get(k)) for r in runs if acts(r["run"], k)}) > 1
               and k != "algo"]
    # a label names a varying flag only where its group differs from the value most groups share (none on a tie)
    value = lambda run, k: json.dumps(run.get(k)) if acts(run, k) else None
    distinct = {(r["run"]["algo"], *(value(r["run"], k) for k in varying)): r["run"] for r in runs}.values()
    shared = {}
    for k in varying:
        (v, n), (_, n2), *_ = Counter(value(f, k) for f in distinct if acts(f, k)).most_common()
        if n > n2:
            shared[k] = v
    common = " ".join(f"{k}={json.loads(v)}" for k, v in shared.items())
    if shared:
        print(f"(a label names a flag only where its runs differ from what most groups share: {common})")
    groups, seen = {}, {}
    for p, r in zip(paths, runs):
        label = " ".join([r["run"]["algo"]] + [f"{k}={r['run'].get(k)}" for k in varying if acts(r["run"], k)
                                               and value(r["run"], k) != shared.get(k)])
        twin = seen.setdefault((same_flags(r["run"]), r["run"].get("seed"), r["run"]["data"]), p)
        if twin != p:  # a copy, or a rerun into another --out: not a second seed
            raise SystemExit(f"--aggregate: {twin} and {p} are runs with the same flags (those that act) and seed "
                             f"({r['run']['seed']}), which would count as two seeds; keep one of them in the glob.")
        groups.setdefault(label, []).append(r)
    rows, out = ["| runs | seeds | FWT (higher: better) | NBT (lower: better) | AUC (higher: better) | NLL forgetting "
                 "(nats, lower: better) |", "|---|---|---|---|---|---|"], {}
    fmt = lambda m, lo, hi: "n/a" if m is None else f"{m:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")
    for label, rs in groups.items():
        K = max(len(r["success"]) for r in rs)
        succ, n = np.zeros((K, K)), np.zeros((K, K))
        for r in rs:
            for k, row in enumerate(r["success"]):
                for t, c in enumerate(row):
                    e = ((r.get("episodes") or [None] * len(r["success"]))[k] or [None] * len(row))[t]
                    e = r["run"]["n_eval"] if e is None else e  # a record from before episode counts
                    succ[k, t] += round(c * e) if c is not None else 0
                    n[k, t] += e if c is not None else 0
        forget = [np.mean([r["nll"][-1][k] - r["nll"][k][k] for k in range(len(r["nll"]) - 1)])
                  if r.get("nll") and None not in r["nll"] and len(r["nll"]) > 1 else None for r in rs]
        g = {m: mean_ci([(r.get("metrics") or {}).get(m) for r in rs], (-1.0 if m == "nbt" else 0.0, 1.0))
             for m in ("fwt", "nbt", "auc")}
        g["metrics_over"] = "seeds" if len(rs) > 1 else None
        one = episode_intervals(rs[0]) if len(rs) == 1 else None
        if one:  # one seed: the spread of its episodes
            g.update(one, metrics_over="episodes")
        nll_ci, over = nll_intervals(rs)
        if over == "held-out demos" and len(rs[0]["nll"]) > 1:  # one seed: forgetting over (task, demo) pairs
            D, K1 = rs[0]["nll_demos"], len(rs[0]["nll"]) - 1
            forget = [D[K1][k][d] - D[k][k][d] for k in range(K1) for d in range(len(D[k][k]))]
        g.update(nll=nll_ci, nll_over=over, nll_forgetting=mean_ci(forget), seeds=[r["run"]["seed"] for r in rs],
                 successes=succ, episodes=n, task_ids=rs[0]["task_ids"])
        out[label] = g
        rows.append(f"| {label} | {len(rs)} | " + " | ".join(fmt(*g[m]) for m in ("fwt", "nbt", "auc", "nll_forgetting"))
                    + " |")
    print("\n".join(rows))
    if any(g["metrics_over"] == "episodes" for g in out.values()):
        print("(FWT, NBT, AUC: 95% t-interval over seeds; for one seed, the 95% credible interval of its episodes: "
              "every measured success rate drawn from its Jeffreys posterior Beta(s+1/2, n-s+1/2), through the "
              "metrics, widened to hold the run's value where several cells at 0 of n lift it above)")
    for label, g in out.items():  # the NLL matrices, with the interval each is over
        if g["nll"]:
            print(f"\nheld-out NLL, {label} (nats per step, lower is better; row: after that task, column: "
                  "the task evaluated, in the same order; "
                  + (f"95% t-interval over {g['nll_over']}):" if g["nll_over"] else "no interval: one run "
                     "recorded without nll_demos; rerun its command to add them):"))
            for k, row in enumerate(g["nll"]):
                print(f"  after {g['task_ids'][k]}: " + "  ".join(fmt(*c) for c in row))
    if any(g["nll_over"] == "held-out demos" for g in out.values()):
        print("(one-seed groups: each NLL cell is the mean over held-out demos, the run's own nll the mean over "
              "sequences; NLL forgetting is the mean of nll[K-1][k] - nll[k][k] paired by demo, with its t-interval "
              "over those pairs: the spread within one run, not over seeds)")
    if png:
        plot_aggregate(out, png, common and f"unless named: {common}")
    return out


def plot_aggregate(groups, path, legend_title="", per_row=4):
    """FWT, NBT, AUC per group with their 95% intervals, beside each group's pooled success matrix: `per_row`
    matrices a row, titles and legend wrapped, so that a glob of many groups stays readable."""
    G = len(groups)
    rows, cols = -(-G // per_row), min(G, per_row)  # ceil
    size = (4 + 3.2 * cols, 3.6 * rows + 0.15 * G)  # taller with more groups: the legend sits below the metrics
    with write_png(path, 110, nrows=rows, ncols=cols + 1, figsize=size, squeeze=False) as (fig, axes):
        for a in axes[1:, 0]:  # below the metrics: room for their legend
            a.axis("off")
        ax = axes[0, 0]
        for i, (label, g) in enumerate(groups.items()):
            for j, m in enumerate(("fwt", "nbt", "auc")):
                mean, lo, hi = g[m]
                if mean is not None:
                    ax.bar(j + i / (G + 1), mean, 1 / (G + 1), color=f"C{i}",
                           label=textwrap.fill(label, 45) if j == 0 else None)
                if lo is not None:  # drawn from its ends
                    ax.errorbar(j + i / (G + 1), (lo + hi) / 2, (hi - lo) / 2, fmt="none", ecolor="k", capsize=3)
        ax.set_xticks(np.arange(3) + (G - 1) / (2 * (G + 1)), ["FWT", "NBT", "AUC"])
        ax.set_ylim(min(0, ax.get_ylim()[0]), 1)
        if ax.get_legend_handles_labels()[0]:  # runs without rollouts draw no bars
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), title=textwrap.fill(legend_title, 45),
                      title_fontsize=7).set_in_layout(rows == 1)  # below: bars stay visible; 2+ rows: in the row below
        ax.set_title("mean, 95% t-interval over seeds\n(one seed: over its episodes, Jeffreys)", fontsize=8)
        mats = [axes[i // cols, 1 + i % cols] for i in range(rows * cols)]  # (rows, cols) matrices, row by row
        for a in mats[G:]:
            a.axis("off")
        for a, (label, g) in zip(mats, groups.items()):
            rate = np.where(g["episodes"] > 0, g["successes"] / np.maximum(g["episodes"], 1), np.nan)
            ci = {kt: wilson(g["successes"][kt], g["episodes"][kt]) for kt in zip(*np.tril_indices_from(rate))}
            draw_matrix(a, rate, g["task_ids"], {(k, t): f"{rate[k, t]:.2f}\n[{lo:.2f},{hi:.2f}]"
                                                 for (k, t), (lo, hi) in ci.items() if lo is not None}, 6, 7)
            a.set_title(f"{textwrap.fill(label, 40)}\n({len(g['seeds'])} seed{'s' * (len(g['seeds']) > 1)}, "
                        "Wilson 95%)", fontsize=7)
