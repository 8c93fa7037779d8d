"""Tests for m2distill: each asserts a property that fails if the math or the protocol is wrong.

Run: python -m pytest -q test_m2distill.py
"""
import copy
import errno
import functools
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import types

import h5py
import numpy as np
import pytest
import torch

import aggregate
import data
import evaluate
import expert
import m2distill
import model
from m2distill import loss_extra, loss_image, loss_policy, loss_text

SUITE = "libero_object"
needs_simulator = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                     reason="the LIBERO simulator is not installed: pip install -r requirements.txt")


def write_synthetic_task(path, language, n_demos=2, length=12, img_size=32, seed=0):
    """A small file in exactly the official layout (data.write_demo_file) with random content."""
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
    data.write_demo_file(path, demos, language=language, bddl_file_name="synthetic.bddl", env_args={"type": 1})


def fake_obs(B=2, T=10, img=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"agentview_rgb": torch.randint(0, 256, (B, T, img, img, 3), generator=g, dtype=torch.uint8),
            "eye_in_hand_rgb": torch.randint(0, 256, (B, T, img, img, 3), generator=g, dtype=torch.uint8),
            "joint_states": torch.randn(B, T, 7, generator=g), "gripper_states": torch.randn(B, T, 2, generator=g)}


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """Synthetic files in the official layout, named after LIBERO-Object's first two tasks."""
    root = tmp_path_factory.mktemp("data")
    bench = data.suite_benchmark(SUITE)
    for k in range(2):
        t = bench.get_task(k)
        write_synthetic_task(data.task_file(root, SUITE, t.name), t.language, n_demos=3, length=10, seed=k)
    return str(root)


def tiny_args(suite_dir, out, algo="m2distill", **kw):
    argv = ["--suite", SUITE, "--data-dir", suite_dir, "--out", str(out), "--algo", algo, "--n-tasks", "2",
            "--epochs", "1", "--batch-size", "8", "--n-demos", "2", "--val-demos", "1", "--img-size", "32",
            "--n-eval", "0", "--task-emb", "hash", "--device", "cpu"]
    if "tasks" in kw:
        argv.remove("--n-tasks"), argv.remove("2")
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
    return m2distill.parse_args(argv)


def killed_at_step(monkeypatch, n, run):
    """run() with m2distill.train_step raising KeyboardInterrupt (a kill) at its n-th call; then train_step as ever."""
    step, calls = m2distill.train_step, {"n": 0}

    def killed(*a):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return step(*a)

    monkeypatch.setattr(m2distill, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(m2distill, "train_step", step)


# ----------------------------------------------------------------------------- model
def test_parameter_count_matches_libero_arithmetic():
    # Per camera: ResNet-18 to layer2 = conv1 3*64*49 = 9,408 + bn 128 + layer1 2*(2*36,864 + 2*128) = 147,968
    #   + layer2 (73,728 + 256 + 147,456 + 256 + downsample 8,192 + 256) + (2*147,456 + 2*256) = 525,568
    #   -> 683,072; spatial-softmax 1x1 conv 128*32+32 = 4,128; projection 64*64+64 = 4,160;
    #   FiLM (d+1)*(2*64 + 2*64 + 2*128 + 2*128) = 768 (d+1).
    # Language (d+1)*64; extra (7+1)*64 + (2+1)*64 = 704;
    # transformer 4 x (2 LN 256 + qkv 64*1152 = 73,728 + out 384*64+64 = 24,640 + MLP 16,640 + 16,448) = 526,848;
    # GMM head 66,560 + 2*1,049,600 + 2*(1024*35+35) + 1024*5+5 = 2,242,635.
    # Total = 2*(683,072 + 4,128 + 4,160) + 704 + 526,848 + 2,242,635 + 1,600 (d+1) = 4,152,907 + 1,600 (d+1).
    for d, expected in [(768, 5_383_307), (384, 4_768_907)]:  # 768: LIBERO's measured count (SPEC.md 10)
        assert expected == 4_152_907 + 1_600 * (d + 1)
        assert sum(p.numel() for p in model.ResNetT(d).parameters()) == expected


def test_gmm_log_prob_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    means, stds = torch.randn(3, 4, 5, 7, generator=g), torch.rand(3, 4, 5, 7, generator=g) + 0.1
    logits, a = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 7, generator=g)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=logits),
                                                torch.distributions.Independent(torch.distributions.Normal(means, stds), 1))
    torch.testing.assert_close(model.gmm_log_prob(means, stds, logits, a), ref.log_prob(a))
    out = {"means": means, "stds": stds, "logits": logits}
    torch.testing.assert_close(m2distill.loss_bc(out, a), -ref.log_prob(a).mean())


def test_gmm_sample_has_the_mixture_moments():
    means = torch.tensor([[-0.5, 0.2], [0.5, -0.2]])[None]  # (1, M=2, D=2)
    stds, logits = torch.full((1, 2, 2), 0.1), torch.log(torch.tensor([[0.25, 0.75]]))
    a = model.gmm_sample(means, stds, logits, 20000, torch.Generator().manual_seed(0))[:, 0]  # (N, D)
    torch.testing.assert_close(a.mean(0), 0.25 * means[0, 0] + 0.75 * means[0, 1], atol=0.01, rtol=0)
    assert abs((a[:, 0] > 0).float().mean().item() - 0.75) < 0.01  # mode weights respected
    # Var = sigma^2 + w0 w1 (mu_0 - mu_1)^2: 0.01 + 0.1875 * 1.0 and 0.01 + 0.1875 * 0.16 (sigma counted once)
    torch.testing.assert_close(a.var(0), torch.tensor([0.1975, 0.04]), rtol=0.05, atol=0)


def test_block_causal_mask_hides_later_steps():
    policy = model.ResNetT(32, img_size=32).eval()
    obs, emb = fake_obs(), torch.randn(2, 32)
    later = {k: v.clone() for k, v in obs.items()}
    later["agentview_rgb"][:, 6:] = 255 - later["agentview_rgb"][:, 6:]  # change frames 6..9 only
    later["joint_states"][:, 6:] += 1
    with torch.no_grad():
        a, b = policy(obs, emb)["means"], policy(later, emb)["means"]
    torch.testing.assert_close(a[:, :6], b[:, :6])  # steps before the change cannot see it
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def test_get_action_reads_the_latent_queue():
    policy = model.ResNetT(32, img_size=32, seq_len=3).eval()
    obs, emb = fake_obs(T=5), torch.randn(2, 32)
    policy.reset()
    for t in range(5):
        torch.manual_seed(t)
        a = policy.get_action({k: v[:, t] for k, v in obs.items()}, emb)
    assert len(policy.queue) == 3  # the last seq_len steps only
    with torch.no_grad():
        out = policy({k: v[:, 2:5] for k, v in obs.items()}, emb)  # the same 3 steps as one sequence
    torch.manual_seed(4)
    ref = model.gmm_sample(out["means"][:, -1], out["stds"][:, -1], out["logits"][:, -1], 1)[0].clamp(-1, 1)
    np.testing.assert_allclose(a, ref.numpy(), atol=1e-5)


def test_augmentation_is_one_shift_shared_by_cameras_and_steps():
    x = torch.rand(3, 4, 3, 16, 16)
    y = model.augment(x, jitter=0.0, pad=4, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x.flatten(1, 2), (4,) * 4, mode="replicate").unflatten(1, (4, 3))
    for b in range(3):  # each sample is one crop of its padded images, the same offset for all 4 images
        hits = [(i, j) for i in range(9) for j in range(9)
                if torch.allclose(y[b], padded[b, :, :, i:i + 16, j:j + 16], atol=1e-5)]
        assert len(hits) == 1
    obs = fake_obs(B=3, T=2, img=16)
    aug = model.augment_obs(obs, torch.Generator().manual_seed(2))
    assert aug["agentview_rgb"].dtype == torch.uint8 and aug["agentview_rgb"].shape == obs["agentview_rgb"].shape
    assert torch.equal(aug["joint_states"], obs["joint_states"])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_random_shift_keeps_liberos_fraction_of_the_image(size):
    """LIBERO pads 4 px at 128 px: shifts of up to 1/32 of the image at every size (1 px at 32, 2 at 64)."""
    p, B = size // 32, 48
    x = torch.rand(B, 1, 3, size, size)
    y = model.augment(x, jitter=0.0, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x.flatten(1, 2), (p,) * 4, mode="replicate")  # (B, 3, H+2p, W+2p)
    offsets = []
    for b in range(B):
        hits = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
                if torch.allclose(y[b, 0], padded[b, :, i:i + size, j:j + size], atol=1e-6)]
        assert len(hits) == 1, f"sample {b}: not a crop within +-{p} px"
        offsets += hits[0]
    assert min(offsets) == 0 and max(offsets) == 2 * p  # the whole range is used


def test_colour_jitter_strength_does_not_depend_on_the_image_size():
    x = torch.rand(4, 2, 3, 8, 8)
    big = x.repeat_interleave(4, -1).repeat_interleave(4, -2)  # the same picture at 32 px
    small_aug = model.augment(x, pad=0, generator=torch.Generator().manual_seed(3))
    big_aug = model.augment(big, pad=0, generator=torch.Generator().manual_seed(3))
    assert (small_aug - x).abs().mean() > 0.02  # the jitter acts at all
    torch.testing.assert_close(big_aug, small_aug.repeat_interleave(4, -1).repeat_interleave(4, -2), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- losses
def outputs(policy, obs, emb):
    with torch.no_grad():
        return policy.eval()(obs, emb)


def test_loss_policy_is_zero_for_identical_models_and_positive_otherwise():
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(), torch.randn(2, 32)
    out = outputs(policy, obs, emb)
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.head.mean.weight.add_(0.5 * torch.randn_like(other.head.mean.weight))
    out2 = outputs(other, obs, emb)
    for direction in ("forward", "reverse"):
        for steps in ("all", "last"):
            assert abs(loss_policy(out, out, 10, direction, steps).item()) < 1e-5
            assert loss_policy(out2, out, 200, direction, steps).item() > 0.1


def test_loss_policy_converges_to_the_closed_form_kl_for_one_component():
    g = torch.Generator().manual_seed(0)
    one = lambda: {"means": torch.randn(4, 2, 1, 7, generator=g) * 0.3, "stds": torch.rand(4, 2, 1, 7, generator=g) + 0.2,
                   "logits": torch.zeros(4, 2, 1)}
    p, q = one(), one()  # p = pi_old, q = pi_theta
    # KL(N(m1,s1) || N(m2,s2)) = sum_j log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2, averaged over (B, T)
    kl = lambda a, b: (torch.log(b["stds"] / a["stds"]) + (a["stds"] ** 2 + (a["means"] - b["means"]) ** 2)
                       / (2 * b["stds"] ** 2) - 0.5).sum(-1).mean()
    fwd = loss_policy(q, p, 20000, "forward", "all", torch.Generator().manual_seed(1))
    rev = loss_policy(q, p, 20000, "reverse", "all", torch.Generator().manual_seed(1))
    assert abs(fwd.item() - kl(p, q).item()) < 0.03 * kl(p, q).item()
    assert abs(rev.item() - kl(q, p).item()) < 0.03 * kl(q, p).item()
    assert abs(kl(p, q).item() - kl(q, p).item()) > 0.1  # the two directions really differ here


def test_reverse_kl_gradient_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    p = {"means": torch.zeros(1, 1, 1, 2), "stds": torch.ones(1, 1, 1, 2), "logits": torch.zeros(1, 1, 1)}
    mu = torch.tensor([0.5, -0.3], requires_grad=True)
    q = {"means": mu.view(1, 1, 1, 2), "stds": torch.full((1, 1, 1, 2), 0.7), "logits": torch.zeros(1, 1, 1)}
    loss_policy(q, p, 200000, "reverse", "all", g).backward()
    torch.testing.assert_close(mu.grad, mu.detach(), atol=0.03, rtol=0)  # d/dmu KL(N(mu,.)||N(0,1)) = mu


@pytest.mark.parametrize("loss, module, key", [
    (loss_image, lambda p: p.image_encoders["agentview_rgb"].proj, "image"),
    (loss_image, lambda p: p.image_encoders["eye_in_hand_rgb"].film[2], "image"),
    (loss_text, lambda p: p.language_encoder, "text"),
    (loss_extra, lambda p: p.extra_encoders["gripper_states"], "extra"),
])
def test_each_distillation_loss_sees_only_its_own_modality(loss, module, key):
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(), torch.randn(2, 32)
    old = m2distill.freeze(policy)
    out_old = outputs(old, obs, emb)
    losses = {"image": loss_image, "text": loss_text, "extra": loss_extra}
    for f in losses.values():
        assert f(outputs(policy, obs, emb), out_old).item() < 1e-9  # identical copy (BN folded: float error)
    with torch.no_grad():
        for prm in module(policy).parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    out = outputs(policy, obs, emb)
    assert loss(out, out_old).item() > 1e-4
    for name, f in losses.items():
        if name != key:
            assert f(out, out_old).item() < 1e-9  # the other latents did not move
    assert abs(loss_policy(out, out_old, 10).item()) > 1e-6  # the policy reads this latent (identical copies: ~1e-8)


def test_total_loss_switches_terms_off_with_zero_lambda(suite_dir, tmp_path):
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(), torch.randn(2, 32)
    old = m2distill.freeze(policy)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    batch = {"obs": obs, "actions": torch.rand(2, 10, 7) * 2 - 1, "task_emb": emb}
    args = tiny_args(suite_dir, tmp_path, lambda_text=0, lambda_image=0.5, lambda_policy=2.0)
    out, out_old = outputs(policy, obs, emb), outputs(old, obs, emb)
    torch.manual_seed(0)  # L_policy's action samples
    total, terms = m2distill.total_loss(out, out_old, batch, args)
    assert set(terms) == {"bc", "image", "extra", "policy"}
    torch.manual_seed(0)
    want = {"bc": m2distill.loss_bc(out, batch["actions"]), "image": loss_image(out, out_old),
            "extra": loss_extra(out, out_old), "policy": loss_policy(out, out_old, args.kl_samples)}
    for k, v in want.items():  # the terms as the paper defines them, unweighted (what the progress bar shows)
        torch.testing.assert_close(terms[k], v)
    torch.testing.assert_close(total, want["bc"] + 0.5 * want["image"] + want["extra"] + 2.0 * want["policy"])
    _, bc_only = m2distill.total_loss(outputs(policy, obs, emb), None, batch, args)
    assert set(bc_only) == {"bc"}


def test_distill_on_past_compares_the_models_on_the_replayed_rows_only(suite_dir, tmp_path, capsys):
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(B=3), torch.randn(3, 32)
    old = m2distill.freeze(policy)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    rows = torch.tensor([False, True, True])  # row 0: the current task's; rows 1-2: replayed
    sub = lambda x: {k: v[rows] for k, v in x.items()}
    actions = torch.rand(3, 10, 7) * 2 - 1
    old_rows = outputs(old, sub(obs), emb[rows])  # train_step runs pi_old on those rows alone
    torch.manual_seed(0)  # the KL's Monte Carlo draws
    _, got = m2distill.total_loss(outputs(policy, obs, emb), old_rows,
                                  {"obs": obs, "actions": actions, "task_emb": emb, "distill_rows": rows},
                                  tiny_args(suite_dir, tmp_path, distill_on="past"))
    torch.manual_seed(0)
    _, ref = m2distill.total_loss(outputs(policy, sub(obs), emb[rows]), old_rows,
                                  {"obs": sub(obs), "actions": actions[rows], "task_emb": emb[rows]},
                                  tiny_args(suite_dir, tmp_path))
    for k in ("image", "text", "extra", "policy"):
        torch.testing.assert_close(got[k], ref[k])
    torch.testing.assert_close(got["bc"], m2distill.loss_bc(outputs(policy, obs, emb), actions))  # L_BC: every row
    assert not torch.isclose(got["bc"], ref["bc"])
    for no_memory in ({"replay": "off"}, {"n_memories": 0}):  # no replayed rows to distil on
        with pytest.raises(SystemExit):
            tiny_args(suite_dir, tmp_path, distill_on="past", **no_memory)
        assert "--distill-on past" in capsys.readouterr().err  # the one line names the flag


def test_distill_on_past_picks_the_replayed_rows_of_every_batch(suite_dir, tmp_path, monkeypatch):
    seen, total_loss, freeze, frozen = [], m2distill.total_loss, m2distill.freeze, []

    def spy(out, old, batch, args):
        if old is not None:  # pi_old's text latent tells which task's instruction its rows carry
            with torch.no_grad():
                ref = frozen[-1].language_encoder(batch["task_emb"][batch["distill_rows"]])
            seen.append((batch["distill_rows"].tolist(), torch.equal(old["text"], ref)))
        return total_loss(out, old, batch, args)

    monkeypatch.setattr(m2distill, "total_loss", spy)
    monkeypatch.setattr(m2distill, "freeze", lambda p: frozen.append(freeze(p)) or frozen[-1])
    m2distill.run(tiny_args(suite_dir, tmp_path, distill_on="past"))
    assert seen  # the second task: current rows first, then the 8 replayed ones (make_batch); pi_old ran on those
    assert all(r == [False] * (len(r) - 8) + [True] * 8 and same for r, same in seen), seen


def test_frozen_copy_with_folded_batchnorm_computes_the_same_policy():
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(), torch.randn(2, 32)
    policy.train()(obs, emb)  # move the running statistics away from their initial values
    old = m2distill.freeze(policy)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in old.modules())
    ref, got = outputs(policy, obs, emb), outputs(old, obs, emb)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the loop
def test_old_model_is_frozen_while_the_policy_learns(suite_dir, tmp_path):
    args = tiny_args(suite_dir, tmp_path)
    ds = data.SequenceDataset.from_hdf5(data.task_file(suite_dir, SUITE, data.suite_benchmark(SUITE).get_task(0).name),
                                        0, 10, slice(0, 2), 32)
    policy = model.ResNetT(32, img_size=32)
    old = m2distill.freeze(policy)
    before = copy.deepcopy(old.state_dict())
    start = copy.deepcopy(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    embs = torch.randn(10, 32)
    for idx in torch.arange(len(ds)).split(8)[:3]:
        terms = m2distill.train_step(policy, old, m2distill.to_device(ds.batch(idx), embs, "cpu"), opt, args)
        assert set(terms) == {"bc", "image", "text", "extra", "policy"}
    assert not old.training and all(p.grad is None and not p.requires_grad for p in old.parameters())
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())  # BN running stats too
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in start.items())


def test_er_batches_hold_current_and_past_samples(suite_dir):
    bench = data.suite_benchmark(SUITE)
    ds = [data.SequenceDataset.from_hdf5(data.task_file(suite_dir, SUITE, bench.get_task(k).name), k, 10, slice(0, 2), 32)
          for k in range(2)]
    memory = data.ReplayMemory(n_memories=5)
    memory.add(ds[0])
    assert len(memory) == 5 and len(memory.datasets[0]) < len(ds[0])  # only the frames the 5 sequences read
    batch = m2distill.make_batch(ds[1], torch.arange(8), memory, 8, torch.Generator().manual_seed(0))
    assert batch["task_id"].tolist() == [1] * 8 + [0] * 8
    assert batch["obs"]["agentview_rgb"].shape[:2] == (16, 10) and batch["actions"].shape == (16, 10, 7)
    assert m2distill.make_batch(ds[1], torch.arange(8), None, 8)["task_id"].tolist() == [1] * 8  # Sequential


def test_sequences_pad_at_the_end_of_their_own_demo(suite_dir):
    path = data.task_file(suite_dir, SUITE, data.suite_benchmark(SUITE).get_task(0).name)
    ds = data.SequenceDataset.from_hdf5(path, 0, 10, slice(None), 32)
    with h5py.File(path) as f:
        a0, a1 = f["data/demo_0/actions"][()], f["data/demo_1/actions"][()]
    n0 = len(a0)
    b = ds.batch(torch.tensor([n0 - 3, n0]))  # 3 steps before demo_0 ends; the first step of demo_1
    np.testing.assert_allclose(b["actions"][0, :3].numpy(), a0[-3:], rtol=1e-6)
    np.testing.assert_allclose(b["actions"][0, 3:].numpy(), np.repeat(a0[-1:], 7, 0), rtol=1e-6)
    np.testing.assert_allclose(b["actions"][1].numpy(), a1[:10], rtol=1e-6)


@pytest.mark.parametrize("algo", ["sequential", "er", "m2distill"])
def test_two_tasks_end_to_end(suite_dir, tmp_path, algo):
    res = m2distill.run(tiny_args(suite_dir, tmp_path, algo))
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["tasks"] == res["tasks"] and len(saved["tasks"]) == 2
    assert [len(r) for r in saved["nll"]] == [1, 2] and all(np.isfinite(saved["nll"][1]))
    for k in range(2):  # task<k>.pt has learned tasks 0..k of the suite's 10: evaluate.py scores those by default
        policy, embs, suite, learned = evaluate.load_policy(str(tmp_path / f"task{k}.pt"))
        assert suite == SUITE and len(embs) == 10 and learned == list(range(k + 1))


def test_resume_does_not_redo_a_finished_task(suite_dir, tmp_path, monkeypatch):
    args = tiny_args(suite_dir, tmp_path)
    learn = m2distill.learn_task
    calls = []

    def killed_in_task_1(*a):
        calls.append(a[6])
        if a[6] == 1:
            raise KeyboardInterrupt  # the run is killed while learning task 1
        return learn(*a)

    monkeypatch.setattr(m2distill, "learn_task", killed_in_task_1)
    with pytest.raises(KeyboardInterrupt):
        m2distill.run(args)
    assert json.load(open(tmp_path / "results.json"))["tasks"] == [data.suite_benchmark(SUITE).get_task(0).name]
    saved0 = torch.load(tmp_path / "task0.pt")["state_dict"]
    monkeypatch.setattr(m2distill, "learn_task", lambda *a: (calls.append(a[6]), learn(*a))[1])
    res = m2distill.run(args)
    assert calls == [0, 1, 1] and len(res["tasks"]) == 2  # task 0 was not learned again
    assert all(torch.equal(v, torch.load(tmp_path / "task0.pt")["state_dict"][k]) for k, v in saved0.items())
    with pytest.raises(SystemExit, match="other flags"):
        m2distill.run(tiny_args(suite_dir, tmp_path, lambda_text=0.5))
    rec = json.load(open(tmp_path / "results.json"))  # a record from before --distill-on: it ran with "all"
    del rec["run"]["distill_on"]
    json.dump(rec, open(tmp_path / "results.json", "w"))
    assert m2distill.load_results(args)["run"]["distill_on"] == "all"
    assert aggregate.read_results(str(tmp_path / "results.json"))["run"]["distill_on"] == "all"


# ----------------------------------------------------------------------------- data and bad input
def scripted_rollouts(calls=None):
    """A stand-in evaluator: a 'success rate' that is a function of the task id and the policy's weights."""
    def rollouts(policy, ids, stream=0):
        if calls is not None:
            calls.append((list(ids), stream))
        w = sum(p.double().sum().item() for p in policy.parameters())
        return {i: (round((w * (i + 1) + stream / 3) % 1, 4), 10) for i in ids}
    return rollouts


def test_tasks_are_learned_in_the_given_order(suite_dir, tmp_path):
    calls = []
    res = m2distill.run(tiny_args(suite_dir, tmp_path, tasks=[1, 0]), evaluate=scripted_rollouts(calls))
    bench = data.suite_benchmark(SUITE)
    assert res["task_ids"] == [1, 0] and res["tasks"] == [bench.get_task(1).name, bench.get_task(0).name]
    # task 1 first: its curve, its row (task 1 on stream 1); then task 0's curve, its row: task 1, task 0 on stream 1
    assert calls == [([1], 0), ([1], 0), ([1], 1), ([0], 0), ([0], 0), ([1], 0), ([0], 1)]
    assert [len(r) for r in res["success"]] == [1, 2] and res["run"]["tasks"] == [1, 0]
    _, _, _, learned = evaluate.load_policy(str(tmp_path / "task0.pt"))
    assert learned == [1]  # the first checkpoint has learned LIBERO task 1 only
    msg = one_line_exit(lambda: m2distill.run(tiny_args(suite_dir, tmp_path / "bad", tasks=[1, 1, 99])))
    assert msg.startswith("--tasks 1 1 99 (or --n-tasks 3)") and "not [99]" in msg and "[1] given twice" in msg


def test_a_run_killed_mid_task_resumes_and_ends_as_an_uninterrupted_one(suite_dir, tmp_path, monkeypatch):
    """The same weights and numbers; and its seconds are every second spent: here each rollout call takes 100 s of
    a fake clock, and the resumed run first re-measures c_00 (its record is made old), a call the other run lacks."""
    args = lambda out: tiny_args(suite_dir, out, epochs=2, eval_every=1)
    clock, scripted = [0.0], scripted_rollouts()

    def rollouts(*a):
        clock[0] += 100
        return scripted(*a)

    monkeypatch.setattr(m2distill, "time", types.SimpleNamespace(time=lambda: clock[0]))
    ref = m2distill.run(args(tmp_path / "ref"), evaluate=rollouts)
    # task 0 takes 2 x 4 steps, task 1 2 x 3: killed in the middle of task 1's second epoch
    killed_at_step(monkeypatch, 13, lambda: m2distill.run(args(tmp_path / "cut"), evaluate=rollouts))
    assert torch.load(tmp_path / "cut" / "progress.pt", weights_only=False)["epoch"] == 1
    record = json.load(open(tmp_path / "cut" / "results.json"))
    record["diagonal_fresh"] = [None]  # a record whose c_00 is the curve's best: re-measured before task 1 resumes
    json.dump(record, open(tmp_path / "cut" / "results.json", "w"))
    res = m2distill.run(args(tmp_path / "cut"), evaluate=rollouts)
    for k in ("success", "curves", "fwt_k", "nll", "gripper_fit"):
        assert res[k] == ref[k], k
    assert ref["seconds"]["eval"] == 900 and res["seconds"]["eval"] == 1000  # 9 calls in both, 1 more here
    a, b = (torch.load(tmp_path / d / "task1.pt")["state_dict"] for d in ("ref", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights: optimizer, schedule and random streams restored
    assert not os.path.exists(tmp_path / "cut" / "progress.pt")


def test_held_out_nll_is_kept_per_demo_and_a_record_from_before_gets_it_from_the_checkpoints(suite_dir, tmp_path):
    """nll_demos[j][t][d]: the held-out NLL of held-out demo d of task t after the run's j-th task (what intervals
    over demos are made from); each equals held_out_nll on that demo alone. A results.json written before the
    field (it is missing) gets it from task<j>.pt when the run is resumed, finished or not."""
    res = m2distill.run(tiny_args(suite_dir, tmp_path / "a", val_demos=2))
    assert [[len(d) for d in row] for row in res["nll_demos"]] == [[2], [2, 2]]
    policy, embs, _, _ = evaluate.load_policy(str(tmp_path / "a" / "task1.pt"))
    path = data.task_file(suite_dir, SUITE, data.suite_benchmark(SUITE).get_task(0).name)
    assert len(res["demos"][0]["val"]) == 2
    for d, name in enumerate(res["demos"][0]["val"]):
        one = data.SequenceDataset.from_hdf5(path, 0, 10, [name], 32)
        assert res["nll_demos"][1][0][d] == pytest.approx(m2distill.held_out_nll(policy, one, embs, "cpu")[0], rel=1e-5)
    assert min(res["nll_demos"][1][0]) <= res["nll"][1][0] <= max(res["nll_demos"][1][0])
    old = json.load(open(tmp_path / "a" / "results.json"))
    del old["nll_demos"]
    json.dump(old, open(tmp_path / "a" / "results.json", "w"))
    again = m2distill.run(tiny_args(suite_dir, tmp_path / "a", val_demos=2))
    flat = lambda rows: [v for row in rows for d in row for v in d]
    assert [[len(d) for d in row] for row in again["nll_demos"]] == [[2], [2, 2]]
    assert flat(again["nll_demos"]) == pytest.approx(flat(res["nll_demos"]), rel=1e-5)
    assert json.load(open(tmp_path / "a" / "results.json"))["nll_demos"] == again["nll_demos"]


def test_gripper_wrong_weight_counts_the_weight_on_modes_of_the_wrong_sign():
    """Two modes, open (mean -1) and closed (+1), weighted 1/4 and 3/4 at every step: where the demo is open the
    wrong-sign weight is 3/4, where it is closed 1/4; a mean of exactly 0 is wrong for both, a command of 0 counts
    for neither; and a policy whose weights follow the demo scores 0."""
    means = torch.zeros(1, 4, 3, 7)
    means[..., 0, 6], means[..., 1, 6] = -1.0, 1.0  # mode 2: gripper mean 0
    logits = torch.tensor([math.log(0.25), math.log(0.75), -1e9]).expand(1, 4, 3)
    actions = torch.zeros(1, 4, 7)
    actions[0, :, 6] = torch.tensor([-1.0, -1.0, 1.0, 0.0])
    fit = m2distill.gripper_wrong_weight({"means": means, "logits": logits}, actions)
    assert fit.tolist() == pytest.approx([1.5, 2, 0.25, 1])
    mid = m2distill.gripper_wrong_weight({"means": means, "logits": torch.tensor([0.0, -1e9, 0.0]).expand(1, 4, 3)},
                                         actions)
    assert mid.tolist() == pytest.approx([1.0, 2, 1.0, 1])  # the open mode right, the zero-mean mode wrong
    follows = torch.where(actions[..., 6:7] < 0, torch.tensor([0.0, -1e9, -1e9]), torch.tensor([-1e9, 0.0, -1e9]))
    assert m2distill.gripper_wrong_weight({"means": means, "logits": follows}, actions).tolist() == [0, 2, 0, 1]


def test_every_run_records_the_gripper_fit_of_every_epoch(suite_dir, tmp_path):
    """results.json holds, per task, one [open, closed] wrong-sign weight per epoch, each a fraction (the demo
    gripper is open and closed in every tiny demo), so a run whose gripper ignores the observation is seen."""
    res = m2distill.run(tiny_args(suite_dir, tmp_path, epochs=2))
    assert len(res["gripper_fit"]) == len(res["tasks"]) == 2
    assert all(len(f) == 2 and all(0 <= v <= 1 for e in f for v in e) for f in res["gripper_fit"])
    assert json.load(open(tmp_path / "results.json"))["gripper_fit"] == res["gripper_fit"]
    assert res["diagonal_fresh"] == [None, None]  # --n-eval 0: no cell measured, fresh or not


def test_every_algorithm_shares_the_first_task_and_can_start_from_anothers(suite_dir, tmp_path, monkeypatch):
    runs = {a: m2distill.run(tiny_args(suite_dir, tmp_path / a, a, tasks=[0])) for a in ("sequential", "er", "m2distill")}
    first = {a: torch.load(tmp_path / a / "task0.pt")["state_dict"] for a in runs}
    assert all(torch.equal(first["sequential"][k], first[a][k]) for a in ("er", "m2distill") for k in first[a])
    src = tmp_path / "seq2"
    m2distill.run(tiny_args(suite_dir, src, "sequential"))
    learned = []
    learn = m2distill.learn_task
    monkeypatch.setattr(m2distill, "learn_task", lambda *a: (learned.append(a[6]), learn(*a))[1])
    rec = json.load(open(src / "results.json"))
    del rec["task_ids"]  # a record from before task_ids: its first task is known from the flags
    json.dump(rec, open(src / "results.json", "w"))
    res = m2distill.run(tiny_args(suite_dir, tmp_path / "m2d", first_task_from=src))
    assert learned == [1] and res["first_task_from"] == str(src) and res["task_ids"] == [0, 1]
    assert res["nll"][0] == json.load(open(src / "results.json"))["nll"][0]
    a, b = (torch.load(d / "task0.pt")["state_dict"] for d in (src, tmp_path / "m2d"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="other flags"):
        m2distill.run(tiny_args(suite_dir, tmp_path / "m2d_e2", epochs=2, first_task_from=src))
    for text in ("{}", "[]", '{"run": 3}', '{"run": {}}'):  # a results.json, but not a record of ours: one line
        (tmp_path / "odd").mkdir(exist_ok=True)
        (tmp_path / "odd" / "results.json").write_text(text)
        msg = one_line_exit(lambda: m2distill.run(tiny_args(suite_dir, tmp_path / "m2d_odd", first_task_from=tmp_path / "odd")))
        assert msg.startswith(f"--first-task-from {tmp_path / 'odd'}: no readable results.json of m2distill.py")


def test_synthetic_file_has_the_official_layout_and_a_missing_key_is_named(tmp_path):
    path = str(tmp_path / "t_demo.hdf5")
    write_synthetic_task(path, "do it", n_demos=2)
    with h5py.File(path) as f:
        assert data.check_layout(f, path) == ["demo_0", "demo_1"]
        assert json.loads(f["data"].attrs["problem_info"])["language_instruction"] == "do it"
    with h5py.File(path, "a") as f:
        del f["data/demo_1/obs/gripper_states"]
    with pytest.raises(ValueError, match="demo_1/obs/gripper_states"):
        data.SequenceDataset.from_hdf5(path, 0, img_size=32)


def test_missing_data_is_collected_by_the_expert_after_one_line(tmp_path, monkeypatch, capsys):
    bench, calls = data.suite_benchmark(SUITE), []

    def fake_collect(suite, data_dir, n, task_ids, seed=0):  # the real one runs the simulator (its own tests)
        calls.append((suite, n, list(task_ids)))
        for k in task_ids:
            t = bench.get_task(k)
            write_synthetic_task(data.task_file(data_dir, suite, t.name), t.language, n_demos=n, length=10)

    monkeypatch.setattr(expert, "collect", fake_collect)
    res = m2distill.run(tiny_args(str(tmp_path / "fresh"), tmp_path / "out"))
    assert calls == [(SUITE, 3, [0, 1])] and len(res["tasks"]) == 2  # 2 train + 1 held-out demos per task
    assert "No official data for 2 task(s) in --data-dir" in capsys.readouterr().out
    monkeypatch.setattr(expert, "SUPPORTED", {})
    with pytest.raises(SystemExit, match="--data-dir .*cannot solve"):
        m2distill.run(tiny_args(str(tmp_path / "nowhere"), tmp_path / "out2"))


def test_bad_input_gets_a_message_naming_the_fix(suite_dir, tmp_path):
    with pytest.raises(SystemExit, match="--suite"):
        data.suite_benchmark("libero_objects")
    with pytest.raises(SystemExit, match="--val-demos 3 holds out the last 3, leaving none"):
        m2distill.run(tiny_args(suite_dir, tmp_path / "o2", val_demos=3))
    args = tiny_args(suite_dir, tmp_path / "o3")
    policy = model.ResNetT(32, img_size=32)
    batch = {"obs": fake_obs(), "actions": torch.full((2, 10, 7), float("nan")), "task_emb": torch.randn(2, 32)}
    with pytest.raises(FloatingPointError, match="--lr"):
        m2distill.train_step(policy, None, batch, torch.optim.AdamW(policy.parameters()), args)


def test_task_embeddings_are_deterministic_cached_and_distinct(tmp_path):
    langs = ["pick up the soup", "pick up the milk"]
    h, kind = data.task_embeddings(langs, "hash", str(tmp_path))
    assert torch.equal(h, data.task_embeddings(langs, "hash")[0]) and not torch.allclose(h[0], h[1])
    assert kind == "hash" and len(list(tmp_path.glob("task_emb_hash_*.pt"))) == 1
    assert torch.equal(data.task_embeddings(langs, "onehot")[0], torch.eye(2))
    m, _ = data.task_embeddings(langs + ["pick up the soup please"], "minilm")
    assert m.shape == (3, 384)
    torch.testing.assert_close(m.norm(dim=1), torch.ones(3))
    assert (m[0] @ m[2]) > (m[0] @ m[1])  # a real sentence model: paraphrase closer than another object


# ----------------------------------------------------------------------------- rollouts and metrics
def test_lifelong_metrics_on_hand_computed_matrices():
    perfect = [[0.8], [0.8, 0.6], [0.8, 0.6, 0.4]]  # nothing forgotten
    assert evaluate.lifelong_metrics(perfect, [0.5, 0.4, 0.3])["nbt"] == pytest.approx(0.0)
    forgot = [[0.8], [0.0, 0.6], [0.0, 0.0, 0.4]]  # every earlier task lost: NBT = mean c_kk over k < K
    assert evaluate.lifelong_metrics(forgot, [0.5, 0.4, 0.3])["nbt"] == pytest.approx((0.8 + 0.6) / 2)
    # 3x3 by hand: c = [[.9], [.5, .8], [.3, .6, .7]], FWT_k = [.6, .5, .4]
    #   FWT = (.6 + .5 + .4) / 3 = .5
    #   NBT_1 = ((.9 - .5) + (.9 - .3)) / 2 = .5,  NBT_2 = (.8 - .6) / 1 = .2,  NBT = (.5 + .2) / 2 = .35
    #   AUC_1 = (.6 + .5 + .3) / 3 = 1.4/3,  AUC_2 = (.5 + .6) / 2 = .55,  AUC_3 = .4 / 1
    #   AUC = (1.4/3 + .55 + .4) / 3
    m = evaluate.lifelong_metrics([[.9], [.5, .8], [.3, .6, .7]], [.6, .5, .4])
    assert m["fwt"] == pytest.approx(0.5) and m["nbt"] == pytest.approx(0.35)
    assert m["auc"] == pytest.approx((1.4 / 3 + 0.55 + 0.4) / 3)
    assert evaluate.lifelong_metrics([[0.7]], [0.6]) == {"fwt": 0.6, "nbt": None, "auc": 0.6}


def test_loop_keeps_the_best_checkpoint_and_fills_the_matrix(suite_dir, tmp_path, capsys):
    """Rollouts at epochs 0, 1, 2 score 0, .5, .25: epoch 1's weights are kept, FWT_k holds .5 after it. The task
    just learnt is scored in the matrix on other episodes (stream 1) than the curve's, which chose the checkpoint:
    c_{k,k} is measured (.35, .3), not the best of the curve (.5)."""
    scores, fresh, states, calls = iter([0.0, 0.5, 0.25, 0.0, 0.5, 0.25, 0.4]), iter([0.35, 0.3]), [], []

    def fake_rollouts(policy, ids, stream=0):
        states.append(copy.deepcopy(policy.state_dict()))
        calls.append((list(ids), stream))
        return {i: (next(fresh), 4) if stream else (next(scores), 2) for i in ids}

    args = tiny_args(suite_dir, tmp_path, epochs=2, eval_every=1)
    res = m2distill.run(args, evaluate=fake_rollouts)
    assert res["curves"] == [[0.0, 0.5, 0.25], [0.0, 0.5, 0.25]]
    assert res["fwt_k"] == [pytest.approx(1 / 3)] * 2  # (0 + .5 + .5) / 3, held at the best
    assert res["success"] == [[0.35], [0.4, 0.3]] and res["diagonal_fresh"] == [True, True]
    assert res["episodes"] == [[4], [2, 4]] and res["curve_episodes"] == [[2, 2, 2], [2, 2, 2]]
    kept = torch.load(tmp_path / "task0.pt")["state_dict"]
    assert all(torch.equal(v, states[1][k]) for k, v in kept.items())  # epoch 1, not the last epoch
    assert all(torch.equal(v, states[3][k]) for k, v in kept.items())  # and it is what the matrix scored
    assert res["metrics"] == evaluate.lifelong_metrics(res["success"], res["fwt_k"])
    assert res["metrics"]["nbt"] == pytest.approx(0.35 - 0.4)
    assert json.load(open(tmp_path / "results.json"))["metrics"] == res["metrics"]
    assert open(tmp_path / "success.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a record from before: its diagonal was the curve's best point; the same command measures it from task<j>.pt
    old = json.load(open(tmp_path / "results.json"))
    old["success"][0][0], old["success"][1][1], old["episodes"][0][0], old["episodes"][1][1] = 0.5, 0.5, 2, 2
    del old["diagonal_fresh"]
    json.dump(old, open(tmp_path / "results.json", "w"))
    fresh, calls[:] = iter([0.35, 0.3]), []
    again = m2distill.run(args, evaluate=fake_rollouts)
    for j, state in enumerate(states[-2:]):  # each c_kk is scored with that task's checkpoint
        saved = torch.load(tmp_path / f"task{j}.pt")["state_dict"]
        assert all(torch.equal(v, state[k]) for k, v in saved.items())
    assert calls == [([0], 1), ([1], 1)] and again["success"] == [[0.35], [0.4, 0.3]]  # nothing else rerun
    assert again["metrics"] == res["metrics"] and again["diagonal_fresh"] == [True, True]
    assert json.load(open(tmp_path / "results.json"))["success"] == again["success"]
    assert "measuring what its record lacks from its checkpoints" in capsys.readouterr().out
    for key in ("episodes", "curve_episodes"):  # older still: no episode counts either
        del old[key]
    json.dump(old, open(tmp_path / "results.json", "w"))
    fresh = iter([0.35, 0.3])
    older = m2distill.run(args, evaluate=fake_rollouts)
    assert older["success"] == [[0.35], [0.4, 0.3]] and older["episodes"] == [[4], [None, 4]]  # c_10's: not known
    assert older["curve_episodes"] == [[None] * 3] * 2
    groups = aggregate.aggregate(str(tmp_path / "results.json"))  # counts not known: n_eval assumed, no traceback
    assert groups["m2distill"]["episodes"][1, 0] == args.n_eval


def test_drop_noops_leaves_out_the_steps_that_do_nothing(tmp_path):
    a = np.zeros((6, 7))
    a[:, 6] = [-1, -1, -1, 1, 1, -1]  # steps 0-2 still and open, 3 closes, 4 holds, 5 opens
    a[1, 0] = 0.5  # step 1 moves the arm
    assert data.noop_steps(a).tolist() == [True, False, True, False, True, False]  # OpenVLA's is_noop
    path = str(tmp_path / "t.hdf5")
    write_synthetic_task(path, "x", n_demos=2, length=12, img_size=32, seed=0)
    with h5py.File(path, "r+") as f:  # demo_0: its steps 2..5 become no-ops
        acts = f["data/demo_0/actions"][()]
        acts[2:6, :6], acts[2:6, 6] = 0.0, acts[1, 6]
        f["data/demo_0/actions"][...] = acts
        joints = f["data/demo_0/obs/joint_states"][()]
    full = data.SequenceDataset.from_hdf5(path, 0, 10, slice(None), 32)
    cut = data.SequenceDataset.from_hdf5(path, 0, 10, slice(None), 32, drop_noops=True)
    assert len(cut) == len(full) - 4
    keep = np.r_[0:2, 6:len(acts)]
    np.testing.assert_allclose(cut.actions[:len(keep)].numpy(), acts[keep].astype(np.float32))
    np.testing.assert_allclose(cut.obs["joint_states"][:len(keep)].numpy(), joints[keep].astype(np.float32))
    assert int(cut.demo_end[0]) == len(keep) - 1  # sequences still stop at their own demo's end


def test_aggregate_gives_t_intervals_over_seeds_and_wilson_intervals_per_cell(tmp_path, capsys):
    def write(name, algo, seed, auc, row1, lam=1.0):
        res = {"run": {"algo": algo, "seed": seed, "lambda_policy": lam, "n_eval": 10},
               "success": [[0.5], row1], "episodes": [[10], [10, 10]], "nll": [[-5.0], [-4.0, -6.0]],
               "metrics": {"fwt": 0.5, "nbt": 0.1, "auc": auc}}
        os.makedirs(tmp_path / name)
        json.dump(res, open(tmp_path / name / "results.json", "w"))
    for i, (seed, auc) in enumerate([(1, 0.2), (2, 0.4), (3, 0.6)]):
        write(f"er_s{seed}", "er", seed, auc, [0.7, 0.4])
        write(f"m2d_s{seed}", "m2distill", seed, auc + 0.1, [0.3, 0.5])
        write(f"seq_s{seed}", "sequential", seed, [0.0, 0.0, 0.3][i], [0.0, 0.0])
    write("m2d_lp01_s1", "m2distill", 1, 0.9, [0.3, 0.5], lam=0.1)
    one = json.load(open(tmp_path / "m2d_lp01_s1" / "results.json"))  # one seed: intervals over held-out demos
    one["nll_demos"] = [[[-5.0, -4.0, -6.0]], [[-3.0, -4.0, -2.0], [-6.0, -6.0, -6.0]]]
    json.dump(one, open(tmp_path / "m2d_lp01_s1" / "results.json", "w"))
    groups = aggregate.aggregate(str(tmp_path / "*"), str(tmp_path / "agg.png"))
    assert set(groups) == {"er", "m2distill lambda_policy=1.0", "m2distill lambda_policy=0.1", "sequential"}  # ER: no lambdas
    m, lo, hi = groups["er"]["auc"]  # 0.2, 0.4, 0.6: s = 0.2, t(0.975, 2) = 4.3027
    assert (m, hi - m) == (pytest.approx(0.4), pytest.approx(4.3027 * 0.2 / 3 ** 0.5, rel=1e-4))
    m, lo, hi = aggregate.mean_ci(list(range(20)))  # t(0.975, 19) = 2.0930 at any n, not the normal 1.96
    assert hi - m == pytest.approx(2.0930 * np.std(range(20), ddof=1) / 20 ** 0.5, rel=1e-4)
    assert groups["m2distill lambda_policy=0.1"]["auc"] == (pytest.approx(0.9), None, None)  # one seed: no interval
    m, lo, hi = groups["sequential"]["auc"]  # 0, 0, 0.3: m - h = -0.33, below what an AUC can be
    assert m == pytest.approx(0.1) and lo == 0.0 and hi == pytest.approx(0.1 + 4.3027 * 0.3 / 3 ** 0.5 / 3 ** 0.5, rel=1e-3)
    g = groups["er"]
    assert g["successes"][1, 0] == 21 and g["episodes"][1, 0] == 30  # pooled over 3 seeds: 7 of 10 each
    assert g["nll_forgetting"][0] == pytest.approx(1.0)  # nll[1][0] - nll[0][0] = -4 - -5
    assert g["nll_over"] == "seeds" and g["nll"][1][0] == pytest.approx((-4.0, -4.0, -4.0))  # equal seeds
    g1 = groups["m2distill lambda_policy=0.1"]  # pairs (-3 - -5, -4 - -4, -2 - -6) = (2, 0, 4): s = 2
    assert g1["nll_over"] == "held-out demos" and g1["nll_forgetting"][0] == pytest.approx(2.0)
    assert g1["nll_forgetting"][2] - 2.0 == pytest.approx(4.3027 * 2 / 3 ** 0.5, rel=1e-4)
    assert g1["nll"][1][0][0] == pytest.approx(-3.0) and g1["nll"][1][1] == pytest.approx((-6.0, -6.0, -6.0))
    lo, hi = aggregate.wilson(7, 10)
    assert (lo, hi) == (pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4))
    assert aggregate.wilson(0, 10)[0] == 0.0 and aggregate.wilson(0, 10)[1] > 0.2 and aggregate.wilson(10, 10)[1] == 1.0
    out = capsys.readouterr().out
    assert "| er | 3 |" in out and "seq_s3/results.json: c_kk is its curve's best point" in out
    assert open(tmp_path / "agg.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    shutil.copytree(tmp_path / "er_s2", tmp_path / "er_s2_again")  # the same run twice is not two seeds
    with pytest.raises(SystemExit, match=r"er_s2/results.json and .*er_s2_again/results.json are runs with the same"):
        aggregate.aggregate(str(tmp_path / "*"))


def test_aggregate_compares_runs_on_the_tasks_all_of_them_finished(tmp_path, capsys):
    def write(name, algo, success, fwt_k, task_ids):
        res = {"run": {"algo": algo, "seed": 1, "n_eval": 10}, "success": success, "fwt_k": fwt_k,
               "episodes": [[10] * len(row) for row in success], "task_ids": task_ids,
               "nll": [[-5.0] * len(row) for row in success],
               "metrics": None if None in fwt_k else evaluate.lifelong_metrics(success, fwt_k)}
        json.dump(res, open(tmp_path / f"{name}.json", "w"))
    full = [[0.8], [0.2, 0.9], [0.0, 0.1, 0.6]]
    write("seq", "sequential", full, [0.5, 0.6, 0.4], [8, 1, 4])
    write("er", "er", full[:2], [0.5, 0.6], [8, 1])  # stopped after its second task
    groups = aggregate.aggregate(str(tmp_path / "*.json"))
    seq = groups["sequential"]
    assert seq["auc"][0] == pytest.approx(evaluate.lifelong_metrics(full[:2], [0.5, 0.6])["auc"])
    assert seq["nbt"][0] == pytest.approx(0.8 - 0.2) and seq["episodes"].shape == (2, 2)
    assert seq["task_ids"] == [8, 1] and "first 2 task(s), [8, 1]" in capsys.readouterr().out
    both = evaluate.main(["--aggregate", str(tmp_path / "seq.json"), str(tmp_path / "*.json")])  # several globs:
    assert set(both) == {"sequential", "er"} and both["sequential"]["seeds"] == [1]  # their union, seq.json once
    write("er", "er", full[:2], [0.5, 0.6], [8, 4])  # another order: not comparable
    with pytest.raises(SystemExit, match="same task order"):
        aggregate.aggregate(str(tmp_path / "*.json"))
    os.remove(tmp_path / "er.json")  # runs without rollouts (--n-eval 0), cut to the tasks both finished
    write("er", "er", [[None], [None, None]], [None, None], [8, 1])
    write("seq", "sequential", [[None], [None, None], [None, None, None]], [None] * 3, [8, 1, 4])
    groups = aggregate.aggregate(str(tmp_path / "*.json"))  # no metrics to recompute, and no traceback
    assert groups["sequential"]["auc"] == (None, None, None) and len(groups["sequential"]["nll"]) == 2


def test_aggregate_labels_name_only_what_sets_a_group_apart_and_its_picture_wraps(tmp_path, capsys):
    # an ablation glob: full M2Distill (lambda_policy 0.1), one term off in each other group, ER beside them
    flags = [{"lambda_policy": 0.1}, {"lambda_policy": 0.1, "lambda_text": 0.0}, {"lambda_policy": 0.0},
             {"lambda_policy": 0.1, "lambda_image": 0.0}, {"lambda_policy": 0.1, "lambda_extra": 0.0}]
    for i, f in enumerate(flags + [{"algo": "er"}]):
        run = {"algo": "m2distill", "seed": 1, "n_eval": 10, **{f"lambda_{m}": 1.0 for m in
                                                                 ("image", "text", "extra", "policy")}, **f}
        json.dump({"run": run, "success": [[0.5]], "episodes": [[10]], "metrics": {"fwt": .5, "nbt": None, "auc": .5}},
                  open(tmp_path / f"r{i}.json", "w"))
    groups = aggregate.aggregate(str(tmp_path / "*.json"), str(tmp_path / "agg.png"))
    assert set(groups) == {"m2distill", "m2distill lambda_text=0.0", "m2distill lambda_policy=0.0",
                           "m2distill lambda_image=0.0", "m2distill lambda_extra=0.0", "er"}
    assert "most groups share: lambda_extra=1.0 lambda_image=1.0 lambda_policy=0.1 lambda_text=1.0" in \
        capsys.readouterr().out  # what the short labels leave out, said once
    w, h = np.frombuffer(open(tmp_path / "agg.png", "rb").read()[16:24], ">u4")  # the PNG's IHDR: width, height
    assert w < 3 * h  # six matrices in rows of four, not one strip
    seq = {"run": {"algo": "sequential", "seed": 1, "n_eval": 10, "lambda_policy": 1.0}, "success": [[0.5]]}
    json.dump(seq, open(tmp_path / "seq.json", "w"))
    json.dump({**seq, "run": {**seq["run"], "lambda_policy": 0.1}}, open(tmp_path / "seq_copy.json", "w"))
    with pytest.raises(SystemExit, match="seq.json and .*seq_copy.json are runs with the same flags"):
        aggregate.aggregate(str(tmp_path / "*.json"))  # a flag that does not act in Sequential: not a second seed
    os.remove(tmp_path / "seq.json"), os.remove(tmp_path / "seq_copy.json")
    for i in (0, 1, 4):  # left: lambda_policy 0 with every term on, and 0.1 without L_image: a tie, so both name both
        os.remove(tmp_path / f"r{i}.json")
    assert set(aggregate.aggregate(str(tmp_path / "*.json"))) == {
        "m2distill lambda_image=1.0 lambda_policy=0.0", "m2distill lambda_image=0.0 lambda_policy=0.1", "er"}


def test_aggregate_gives_one_seed_intervals_from_its_episodes(tmp_path, capsys):
    def run(curves, success, n):
        best = [len(c) - 1 - int(np.argmax(c[::-1])) for c in curves]  # the last best point, as learn_task
        fwt_k = [float(np.mean(c[:b] + [c[b]] * (len(c) - b))) for c, b in zip(curves, best)]
        return {"run": {"algo": "er", "seed": 1, "n_eval": n}, "curves": curves, "success": success,
                "curve_episodes": [[n] * len(c) for c in curves], "episodes": [[n] * len(r) for r in success],
                "fwt_k": fwt_k, "metrics": evaluate.lifelong_metrics(success, fwt_k)}
    one = aggregate.episode_intervals(run([[0.5]], [[0.5]], 10))  # FWT = AUC = c_00: 5 of 10
    assert one["fwt"][1:] == (pytest.approx(0.2235, abs=0.02), pytest.approx(0.7765, abs=0.02))  # Jeffreys
    assert one["nbt"] == (None, None, None) and one["auc"] == one["fwt"]
    wide, narrow = (aggregate.episode_intervals(run([[0.5]], [[0.5]], n))["fwt"] for n in (10, 100))
    assert narrow[2] - narrow[1] < 0.5 * (wide[2] - wide[1])  # more episodes, a narrower interval
    forgot = aggregate.episode_intervals(run([[0.0, 1.0], [0.0, 0.9]], [[1.0], [0.0, 0.9]], 10))
    assert forgot["nbt"][0] == 1.0 and 0.6 < forgot["nbt"][1] < 1.0  # 10 of 10, then 0 of 10: NBT clear of 0
    assert forgot["fwt"][0] == pytest.approx((0.5 + 0.45) / 2)
    measured = {**run([[0.0, 1.0], [0.0, 0.9]], [[0.5], [0.0, 0.9]], 10), "diagonal_fresh": [True, True]}
    nbt = aggregate.episode_intervals(measured)["nbt"]  # c_00 drawn from its own cell, 5 of 10, not the curve's 10
    assert nbt[0] == 0.5 and 0.15 < nbt[1] < 0.4 and 0.6 < nbt[2] < 0.85
    zero = aggregate.episode_intervals(run([[0.0]], [[0.0]], 10))
    assert zero["fwt"][1] < 1e-3 and zero["fwt"][2] == pytest.approx(0.2172, abs=0.02)  # Jeffreys, 0 of 10
    tie = aggregate.episode_intervals(run([[0.5, 0.0, 0.5]], [[0.5]], 10))  # held from the last best: (X0 + X1 + X2) / 3
    assert tie["fwt"][0] == pytest.approx(1 / 3) and tie["fwt"][2] < 0.6  # from the first it would be X0: up to .78
    zeros = aggregate.episode_intervals(run([[0.0] * 4], [[0.0]], 10))  # four points at 0 of 10 lift the posterior
    assert zeros["fwt"][:2] == (0.0, 0.0) and zeros["auc"][:2] == (0.0, 0.0)  # above the run's 0: widened to hold it
    partly_old = {**run([[0.0, 1.0], [0.0, 0.9]], [[1.0], [0.0, 0.9]], 10), "diagonal_fresh": [None, True]}
    json.dump(partly_old, open(tmp_path / "er.json", "w"))
    above = run([[0.0] * 4, [0.0] * 4], [[0.0], [0.0, 0.0]], 10)  # its credible intervals sit above its 0s
    json.dump({**above, "run": {**above["run"], "algo": "sequential"}, "diagonal_fresh": [True, True]},
              open(tmp_path / "seq.json", "w"))
    g = aggregate.aggregate(str(tmp_path / "*.json"), str(tmp_path / "agg.png"))["er"]  # the picture draws them
    assert g["metrics_over"] == "episodes" and g["nbt"] == aggregate.episode_intervals(partly_old)["nbt"]
    assert g["nbt"] == pytest.approx(forgot["nbt"], abs=0.02)  # c_00 not fresh: the curve's best, as in `forgot`
    out = capsys.readouterr().out
    assert "for one seed, the 95% credible interval of its episodes" in out and "er.json: c_kk is its curve's best" in out


class FakeEnv:
    """A stand-in simulator for the worker tests. With M2D_CRASH_MARKER set, init state 1 crashes its process
    once and 2 hangs. `fail` breaks it as a broken machine does: "init", the constructor raises; "render",
    set_init_state raises (a renderer that cannot draw); "later", steps from init states other than 0 raise
    (the up-front check passes, then episodes cannot run). With `record` (a folder), an episode succeeds when
    the policy's first action dimension exceeds 0.5, and its actions are saved as <record>/<init state>.npy."""

    def __init__(self, fail=None, record=None):
        if fail == "init":
            raise RuntimeError("eglInitialize: EGL_NOT_INITIALIZED")
        self.t, self.s, self.fail, self.record, self.actions = 0, None, fail, record, []

    def set_init_state(self, s):
        if self.fail == "render":
            raise RuntimeError("eglMakeCurrent: EGL_BAD_DISPLAY")
        marker = os.environ.get("M2D_CRASH_MARKER")
        if marker and s == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        if marker and s == 2:
            time.sleep(3600)
        self.s, self.actions = s, []
        return self.obs()

    def step(self, action):
        if self.fail == "later" and self.s != 0:
            raise RuntimeError("MuJoCo step failed")
        self.t += 1
        if self.record is None:
            return self.obs(), 0.0, self.t >= evaluate.N_SETTLE + 3, {}
        self.actions.append(np.asarray(action))
        np.save(os.path.join(self.record, f"{self.s}.npy"), np.stack(self.actions))
        return self.obs(), 0.0, bool(action[0] > 0.5), {}

    def obs(self):
        img = np.zeros((32, 32, 3), np.uint8)
        return {"agentview_image": img, "robot0_eye_in_hand_image": img, "robot0_joint_pos": np.zeros(7),
                "robot0_gripper_qpos": np.zeros(2)}

    def reset(self):
        self.t = 0

    def close(self):
        pass


def fake_env_fn(suite, task, n_init=4, **kw):
    return FakeEnv(**kw), np.arange(n_init)


def test_a_crashed_or_hung_worker_is_restarted_and_the_run_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_CRASH_MARKER", str(tmp_path / "crashed"))
    ev = evaluate.Evaluator(SUITE, n_eval=4, max_steps=10, workers=2, episode_timeout=8, env_fn=fake_env_fn)
    try:
        rates = ev(model.ResNetT(d_lang=8, img_size=32), [0], torch.randn(1, 8))
    finally:
        ev.close()
    # episode 1 crashed once and succeeded on retry; episode 2 hung twice: it could not run, so it is left
    # out of the cell (3 episodes), not counted as a failure
    assert rates == {0: (1.0, 3)}
    assert len(ev.errors) == 3 and sum("died" in e for e in ev.errors) == 1
    assert sum("hung" in e for e in ev.errors) == 2


class Recorder:
    """Wraps a policy and keeps every observation it is given."""

    def __init__(self, policy):
        self.policy, self.seen = policy, []

    def reset(self):
        self.policy.reset()

    def get_action(self, obs, task_emb):
        self.seen.append(obs)
        return self.policy.get_action(obs, task_emb)


@needs_simulator
def test_one_real_libero_episode_feeds_the_policy_dataset_keys():
    env, init_states = evaluate.make_env(SUITE, 0)
    policy = Recorder(model.ResNetT(d_lang=16, img_size=64))
    try:
        success, steps = evaluate.run_episode(env, policy, torch.randn(16), init_states[0], 20, 64)
    finally:
        env.close()
    assert len(init_states) == 50 and (success, steps) == (False, 20)
    assert len(policy.seen) == 20 and all(set(o) == set(data.CAMERAS) | set(data.LOW_DIM) for o in policy.seen)
    first = policy.seen[0]
    assert all(first[c].shape == (1, 64, 64, 3) and first[c].dtype == torch.uint8 for c in data.CAMERAS)
    assert first["joint_states"].shape == (1, 7) and first["gripper_states"].shape == (1, 2)
    assert not torch.equal(policy.seen[0]["joint_states"], policy.seen[-1]["joint_states"])  # the arm moved


# ----------------------------------------------------------------------------- the scripted expert
@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """One real expert demo of libero_object task 0, collected with both cameras into a tmp data dir."""
    root = tmp_path_factory.mktemp("expert_data")
    paths = expert.collect(SUITE, str(root), demos_per_task=1, task_ids=[0], seed=0, dart_noise=0.0)
    return root, paths[0]


@needs_simulator
def test_collected_file_has_the_official_layout(collected):
    root, path = collected
    task = data.suite_benchmark(SUITE).get_task(0)
    assert path == data.task_file(str(root), SUITE, task.name) and os.path.exists(path)
    assert not os.path.exists(path + ".partial") and not os.path.exists(path + ".tmp")
    with h5py.File(path, "r") as f:
        assert data.check_layout(f, path) == ["demo_0"]
        g, d = f["data"], f["data/demo_0"]
        assert json.loads(g.attrs["problem_info"])["language_instruction"] == task.language
        assert g.attrs["num_demos"] == 1 and g.attrs["total"] == d.attrs["num_samples"] == len(d["actions"])
        n = len(d["actions"])
        assert 20 < n <= expert.MAX_STEPS[SUITE]
        for cam in ("agentview_rgb", "eye_in_hand_rgb"):
            img = d["obs"][cam][()]
            assert img.dtype == np.uint8 and img.shape == (n, 128, 128, 3) and img.std() > 5
        a = d["actions"][()]
        assert a.dtype.kind == "f" and a.shape == (n, 7) and np.abs(a).max() <= 1.0
        assert set(np.unique(a[:, 6])) <= {-1.0, 1.0}  # gripper: -1 open, +1 close
        assert d["dones"].dtype == np.uint8 and d["dones"][-1] == 1 and d["dones"][:-1].sum() == 0
        assert d["rewards"][-1] == 1
        np.testing.assert_array_equal(d.attrs["init_state"], d["states"][0])
        np.testing.assert_allclose(d["obs/ee_states"][()], np.concatenate([d["obs/ee_pos"], d["obs/ee_ori"]], 1))
        assert d["robot_states"].shape == (n, 9) and "<mujoco" in d.attrs["model_file"]
    ds = data.SequenceDataset.from_hdf5(path, task_id=0)  # the training reader accepts it
    assert len(ds) == n


@needs_simulator
def test_replaying_the_recorded_actions_succeeds(collected):
    """expert.replay (the demo's scene from its model_file, its init_state, its actions) reproduces every recorded
    state (to 1e-9: collected with cameras, replayed without, the sums round differently) and the task's success
    check fires at the last action.
    Only noise-free demos replay by their actions (DART demos record the clean, not the executed, ones)."""
    _, path = collected
    with h5py.File(path, "r") as f:
        d = f["data/demo_0"]
        assert "dart_noise" not in json.loads(f["data"].attrs["env_args"])
        model_file, init_state, actions, states = d.attrs["model_file"], d.attrs["init_state"], d["actions"][()], \
            d["states"][()]
    env = expert.make_env(data.suite_benchmark(SUITE).get_task(0), cameras=False)
    try:
        expert.restart(env, model_file, init_state)
        for t, a in enumerate(actions):
            np.testing.assert_allclose(env.get_sim_state(), states[t], rtol=0, atol=1e-9, err_msg=f"step {t}")
            env.step(a)
        assert expert.replay(env, model_file, init_state, actions) == len(actions) - 1  # done first fires at the end
    finally:
        env.close()


@needs_simulator
def test_rollout_inputs_match_the_training_inputs_along_a_demo(collected):
    """Replaying a demo in the evaluator's env, policy_obs gives the policy what the dataset gave it at the
    same step: same camera per key, same orientation (no flip), same joint and gripper states."""
    _, path = collected
    ds = data.SequenceDataset.from_hdf5(path, task_id=0, img_size=32)
    with h5py.File(path, "r") as f:
        init_state, actions = f["data/demo_0"].attrs["init_state"], f["data/demo_0/actions"][()]
    env, _ = evaluate.make_env(SUITE, 0)
    try:
        env.reset()
        obs = env.set_init_state(init_state)
        for t in range(12):
            x = evaluate.policy_obs(obs, 32)
            if t % 4 == 0:
                for c in data.CAMERAS:  # renders after set_init_state differ by a few grey levels at most
                    diff = (x[c][0].float() - torch.as_tensor(ds.obs[c][t]).float()).abs()
                    assert diff.mean() < 2 and diff.mean() < (x[c][0].float() - x[c][0].flip(0).float()).abs().mean() / 5
                for k in data.LOW_DIM:
                    np.testing.assert_allclose(x[k][0].numpy(), np.asarray(ds.obs[k][t]), atol=1e-2)
            obs, _, _, _ = env.step(actions[t])
    finally:
        env.close()


class ReplayPolicy:
    """Plays a demo's recorded actions in order, whatever it sees: a policy that is right by construction."""

    def __init__(self, actions):
        self.actions, self.t = actions, 0

    def reset(self):
        self.t = 0

    def get_action(self, obs, task_emb):
        self.t += 1
        return self.actions[self.t - 1][None]  # (1, 7)


@needs_simulator
def test_the_evaluator_scores_a_right_policy_as_a_success(collected):
    """A zero success rate is the policy's, not the evaluator's: through evaluate.run_episode (reset, init
    state, settle steps, the policy's actions, the env's done), the demo's own actions succeed at the demo's
    last step, and the same actions cut 10 steps short are a failure."""
    _, path = collected
    with h5py.File(path, "r") as f:
        init_state, actions = f["data/demo_0"].attrs["init_state"], f["data/demo_0/actions"][()]
    n = len(actions)
    env, _ = evaluate.make_env(SUITE, 0)
    try:
        success, steps = evaluate.run_episode(env, ReplayPolicy(actions), torch.zeros(4), init_state, n + 20, 32)
        assert success and n - 5 <= steps <= n
        assert evaluate.run_episode(env, ReplayPolicy(actions), torch.zeros(4), init_state, n - 10, 32) == (False, n - 10)
    finally:
        env.close()


@needs_simulator
def test_expert_solves_an_official_init_state():
    bm = data.suite_benchmark(SUITE)
    env = expert.make_env(bm.get_task(3), cameras=False)
    try:
        ok, steps, _ = expert.run_episode(env, SUITE, 3, np.random.default_rng(0),
                                          init_state=bm.get_task_init_states(3)[0])
    finally:
        env.close()
    assert ok and steps < expert.MAX_STEPS[SUITE]


@needs_simulator
def test_collect_resumes_from_partial_demos(collected, tmp_path, monkeypatch):
    """Finished demos in <path>.partial are used as they are: no simulator runs when they suffice."""
    _, src = collected
    with h5py.File(src, "r") as f:
        d = f["data/demo_0"]
        demo = {"obs": {k[4:]: d[k][()] for k in data.DEMO_KEYS if k.startswith("obs/")},
                **{k: d[k][()] for k in data.DEMO_KEYS if not k.startswith("obs/")},
                "model_file": d.attrs["model_file"], "init_state": d.attrs["init_state"]}
    path = data.task_file(str(tmp_path), SUITE, data.suite_benchmark(SUITE).get_task(0).name)
    expert.save_partial(path + ".partial", 0, demo)
    assert len(expert.load_partial(path + ".partial")) == 1
    monkeypatch.setattr(expert, "make_env", lambda *a, **k: pytest.fail("the simulator was started"))
    assert expert.collect(SUITE, str(tmp_path), 1, task_ids=[0]) == [path]
    assert not os.path.exists(path + ".partial")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/actions"][()], demo["actions"])
        np.testing.assert_array_equal(f["data/demo_0/obs/agentview_rgb"][()], demo["obs"]["agentview_rgb"])
    assert expert.collect(SUITE, str(tmp_path), 5, task_ids=[0]) == [path]  # an existing file is skipped


def test_unsupported_tasks_are_reported_not_faked():
    unsupported = dict(expert.UNSUPPORTED, libero_10={0: "no scripted expert for this suite"})
    for suite, tasks in unsupported.items():
        for t in tasks:
            assert t not in expert.SUPPORTED.get(suite, ())
            with pytest.raises(NotImplementedError, match=suite):
                expert.make_expert(suite, t, env=None, obs=None, rng=np.random.default_rng(0))


@needs_simulator
@pytest.mark.parametrize("argv, flag", [
    (["measure", "--suite", "libero_nope"], "--suite"),
    (["collect", "--suite", "libero_object", "--demos-per-task", "1", "--tasks", "10"], "--tasks"),
    (["measure", "--suite", "libero_object", "--tasks", "-1"], "--tasks"),
    (["measure", "--suite", "libero_object", "--n-init", "51"], "--n-init"),
    (["collect", "--suite", "libero_object", "--demos-per-task", "0"], "--demos-per-task"),
])
def test_cli_bad_input_names_the_flag(argv, flag):
    with pytest.raises(SystemExit) as e:
        expert.main(argv)
    msg = str(e.value)
    assert msg.startswith(flag) and "\n" not in msg


# ----------------------------------------------------------------------------- input files, flags and the record
# (issues 11.2, 11.3, 11.5 files and flags, 12.2 OpenVLA-regenerated data, 12.4 read-only data, 12.5 download hints)
@pytest.fixture(autouse=True, scope="module")
def _user_cache_in_tmp(tmp_path_factory):
    """Runs cache task embeddings in the user cache dir: keep the tests' caches out of the real one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


def two_task_dir(root, n_demos=3, img_size=32):
    """A fresh data dir with LIBERO-Object's tasks 0 and 1 (small synthetic files); their paths."""
    bench, paths = data.suite_benchmark(SUITE), []
    for k in range(2):
        t = bench.get_task(k)
        paths.append(data.task_file(str(root), SUITE, t.name))
        write_synthetic_task(paths[-1], t.language, n_demos=n_demos, length=10, img_size=img_size, seed=k)
    return str(root), paths


def nothing_may_start(monkeypatch):
    """Demo collection and training raise if they are reached: a fault must be found before them."""
    def forbidden(*a, **k):
        raise AssertionError("demo collection or training started before the input was checked")
    monkeypatch.setattr(expert, "collect", forbidden)
    monkeypatch.setattr(m2distill, "learn_task", forbidden)


def one_line_exit(fn):
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def set_key(path, key, fn):
    with h5py.File(path, "a") as f:
        x = fn(f[key][()])
        del f[key]
        f[key] = x


@pytest.mark.parametrize("task, key, fn, expected", [
    (1, "data/demo_0/obs/joint_states", lambda x: np.where(np.arange(len(x))[:, None] == 4, np.nan, x),
     r"'data/demo_0/obs/joint_states' holds NaN or inf \(first at step 4\); remove that demo"),
    (0, "data/demo_2/actions", lambda x: np.where(np.arange(len(x))[:, None] == 0, np.inf, x),  # the held-out demo
     r"'data/demo_2/actions' holds NaN or inf"),
    (0, "data/demo_1/obs/gripper_states", lambda x: x * np.nan, r"'data/demo_1/obs/gripper_states' holds NaN"),
    (0, "data/demo_0/actions", lambda x: np.concatenate([x[:, :3] * 5, x[:, 3:]], 1),  # position deltas scaled by 5
     r"'data/demo_0/actions' reaches \|a\| = [2-5][.\d]*, outside \[-1, 1\].*divide the actions by their scale"),
])
def test_data_not_finite_or_outside_libero_actions_is_refused_at_load(tmp_path, monkeypatch, task, key, fn, expected):
    root, paths = two_task_dir(tmp_path / "data")
    set_key(paths[task], key, fn)
    nothing_may_start(monkeypatch)
    msg = one_line_exit(lambda: m2distill.run(tiny_args(root, tmp_path / "out")))
    assert msg.startswith(paths[task]) and re.search(expected, msg)
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_results_json_is_strict_json(tmp_path):
    path = str(tmp_path / "results.json")
    m2distill.save_json({"nll": [[-3.5]], "success": [[None]]}, path)
    with pytest.raises(ValueError):
        m2distill.save_json({"nll": [[float("nan")]]}, path)
    with pytest.raises(ValueError):
        m2distill.save_json({"nll": [[float("inf")]]}, path)
    assert json.load(open(path)) == {"nll": [[-3.5]], "success": [[None]]}  # the last good record stands
    assert not os.path.exists(path + ".tmp")


def test_non_finite_inputs_stop_before_the_kl_sampler(suite_dir, tmp_path):
    """pi_old exists (task 1 on): the project's FloatingPointError, not torch's 'invalid multinomial'."""
    policy = model.ResNetT(32, img_size=32)
    old = m2distill.freeze(policy)
    obs = fake_obs()
    obs["joint_states"][0, 3, 2] = float("nan")
    batch = {"obs": obs, "actions": torch.rand(2, 10, 7) * 2 - 1, "task_emb": torch.randn(2, 32)}
    with pytest.raises(FloatingPointError, match="check the demonstration file"):
        m2distill.train_step(policy, old, batch, torch.optim.AdamW(policy.parameters()), tiny_args(suite_dir, tmp_path))


def test_demo_shortfall_is_one_rule_and_the_record_says_what_was_used(tmp_path, capsys):
    """4 demos, --n-demos 6: with --val-demos 0 it trains on 4, with --val-demos 1 on 3 (demo_3 held out),
    saying so in one line each time; results.json and every checkpoint record demos and task embedding."""
    bench = data.suite_benchmark(SUITE)
    path = data.task_file(str(tmp_path / "data"), SUITE, bench.get_task(0).name)
    write_synthetic_task(path, bench.get_task(0).language, n_demos=4, length=10)
    names = [f"demo_{i}" for i in range(4)]
    for val, out in [(0, tmp_path / "v0"), (1, tmp_path / "v1")]:
        m2distill.run(tiny_args(str(tmp_path / "data"), out, n_tasks=1, n_demos=6, val_demos=val))
        said = [l for l in capsys.readouterr().out.splitlines() if l.startswith(path)]
        assert said == [f"{path}: 4 demos, {val} held out: task 0 trains on {4 - val}, not --n-demos 6."]
        res = json.load(open(out / "results.json"))
        assert [{k: v for k, v in d.items() if k != "sha1"} for d in res["demos"]] == [
            {"n_train": 4 - val, "n_val": val, "train": names[:4 - val], "val": names[4 - val:]}]
        assert res["task_emb"] == {"kind": "hash", "dim": 32}
        assert torch.load(out / "task0.pt", weights_only=False)["task_emb"] == {"kind": "hash", "dim": 32}


def test_bert_fallback_is_cached_as_minilm_so_bert_is_used_once_downloaded(tmp_path, monkeypatch):
    import transformers
    bert_on_disk = []
    real_tok, real_model = transformers.AutoTokenizer.from_pretrained, transformers.AutoModel.from_pretrained

    class FakeBert:  # stands in for bert-base-cased (768-d pooler output) once "downloaded"
        def __call__(self, texts=None, **kw):
            return {"input_ids": torch.zeros(len(texts), 25, dtype=torch.long)} if texts is not None else \
                {"pooler_output": torch.ones(len(kw["input_ids"]), 768)}

        def eval(self):
            return self

    def loader(real):
        def from_pretrained(name, *a, **kw):
            if name != "bert-base-cased":
                return real(name, *a, **kw)
            if not bert_on_disk:
                raise OSError("bert-base-cased is not on disk")
            return FakeBert()
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loader(real_tok))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loader(real_model))
    langs = ["pick up the soup", "pick up the milk"]
    emb, kind = data.task_embeddings(langs, "bert", str(tmp_path))
    assert (kind, emb.shape) == ("minilm", (2, 384))
    assert [p.name.split("_")[2] for p in tmp_path.glob("task_emb_*.pt")] == ["minilm"]
    bert_on_disk.append(True)  # the user downloads BERT as the message says
    emb, kind = data.task_embeddings(langs, "bert", str(tmp_path))
    assert (kind, emb.shape) == ("bert", (2, 768))


@pytest.mark.parametrize("flag, value, allowed", [
    ("--val-demos", "-1", "0 or more"), ("--n-demos", "0", "1 or more"), ("--n-eval", "-2", "0 or more"),
    ("--img-size", "4", "8 or more"), ("--seed", "-1", "0 to 4294967295"), ("--n-memories", "-1", "0 or more"),
    ("--eval-workers", "0", "1 or more"), ("--lr", "0", "a number > 0"), ("--lr", "nan", "a number > 0"),
    ("--grad-clip", "-1", "a number > 0"), ("--lambda-policy", "-0.5", "0 or more"), ("--lambda-image", "inf", "0 or more"),
    ("--epochs", "0", "1 or more"), ("--kl-samples", "0", "1 or more"), ("--n-tasks", "0", "1 or more"),
])
def test_out_of_range_flags_get_one_line_naming_flag_and_range(suite_dir, tmp_path, flag, value, allowed):
    msg = one_line_exit(lambda: tiny_args(suite_dir, tmp_path, **{flag[2:].replace("-", "_"): value}))
    assert msg.startswith(f"{flag} {value}") and msg.endswith(f"allowed: {allowed}.")



def test_the_readme_flags_table_lists_exactly_the_flags_of_m2distill(capsys):
    """A flag a user can pass has a row in the README's Flags table, and every row names a real flag (--videos once
    had none)."""
    with pytest.raises(SystemExit):
        m2distill.parse_args(["--help"])
    parser = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out)) - {"--help"}
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    table = readme.split("\n## Flags\n")[1].split("\n## ")[0]
    rows = {f for line in table.splitlines() if line.startswith("| `--")
            for f in re.findall(r"`(--[a-z][a-z-]*)`", line.split(" | ")[0])}
    assert rows == parser, (sorted(parser - rows), sorted(rows - parser))

def test_a_bad_init_from_stops_before_any_demo_is_collected(tmp_path, monkeypatch):
    """--init-from is read before the missing task files are collected (tens of minutes in the simulator)."""
    garbage(tmp_path / "w.pt")
    (tmp_path / "adir").mkdir()
    monkeypatch.setattr(expert, "collect", lambda *a, **k: pytest.fail("demos were collected before --init-from"))
    msg = one_line_exit(lambda: m2distill.run(tiny_args(str(tmp_path / "empty"), tmp_path / "out",
                                                        init_from=tmp_path / "w.pt")))
    assert msg.startswith(f"--init-from {tmp_path / 'w.pt'} is not a torch checkpoint")
    msg = one_line_exit(lambda: tiny_args(str(tmp_path / "empty"), tmp_path / "out", init_from=tmp_path / "adir"))
    assert msg.startswith(f"--init-from {tmp_path / 'adir'}: a directory")


def test_a_loss_gone_nan_stops_with_one_line(suite_dir, tmp_path, capsys):
    """FloatingPointError (train_step) is a user-facing error: one line through evaluate.cli, exit status 1."""
    argv = ["--suite", SUITE, "--data-dir", suite_dir, "--out", str(tmp_path), "--n-tasks", "1", "--epochs", "1",
            "--n-demos", "2", "--val-demos", "1", "--img-size", "32", "--n-eval", "0", "--task-emb", "hash",
            "--lr", "1e30"]
    with pytest.raises(SystemExit) as e:
        evaluate.cli(lambda: m2distill.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "lower --lr" in err


def test_a_record_from_before_a_flag_reads_with_the_value_it_ran_with(finished_run, suite_dir, tmp_path):
    """Records from before --tasks (n_tasks only), --drop-noops, --low-eval-noise, --init-from and --distill-on:
    resumed with the same flags, and aggregated beside new ones without labels for flags they never had."""
    shutil.copytree(finished_run, tmp_path / "new")
    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    rec = json.load(open(out / "results.json"))
    for k in ("tasks", "drop_noops", "low_eval_noise", "init_from", "distill_on"):
        del rec["run"][k]
    rec["run"]["n_tasks"] = len(rec["tasks"])
    del rec["task_ids"]
    json.dump(rec, open(out / "results.json", "w"))
    again = m2distill.run(tiny_args(suite_dir, out, "sequential"))  # the same flags: nothing left to do
    assert again["run"]["tasks"] == [0, 1] and "n_tasks" not in again["run"]
    assert again["task_ids"] == [0, 1]  # known from the flags, not [None, None] (axes labelled None)
    rec["run"]["seed"] = 1  # another seed of the same flags
    json.dump(rec, open(out / "results.json", "w"))
    groups = aggregate.aggregate(str(tmp_path / "*"))
    assert list(groups) == ["sequential"] and sorted(groups["sequential"]["seeds"]) == [1, 10000]  # no label it never had


def test_a_run_is_tied_to_its_demos_on_resume_first_task_from_and_in_the_aggregate(finished_run, suite_dir, tmp_path,
                                                                                    capsys):
    """Each task's record names its demos (data.demos_sha1): resuming, or starting from another run's first task,
    with other demos stops in one line naming --data-dir; --aggregate keeps runs on other demos apart."""
    out = copy_run(finished_run, tmp_path)
    rec = json.load(open(out / "results.json"))
    shas = [d["sha1"] for d in rec["demos"]]
    assert all(len(s) == 12 for s in shas) and shas[0] != shas[1]
    first = {**rec, **{k: copy.deepcopy(rec[k][:1]) for k in m2distill.PER_TASK}}  # as if stopped after task 0
    first["demos"][0]["sha1"] = "0" * 12  # ... which it had learnt from another collection
    json.dump(first, open(out / "results.json", "w"))
    os.remove(out / "task1.pt")
    msg = one_line_exit(lambda: m2distill.run(tiny_args(suite_dir, out, "sequential")))
    assert msg.startswith(f"--data-dir {suite_dir}: task 0's demos are not those {out} learnt it from "
                          "(actions sha1 000000000000 there, " + shas[0])
    msg = one_line_exit(lambda: m2distill.run(tiny_args(suite_dir, tmp_path / "m2d", first_task_from=out)))
    assert msg.startswith(f"--data-dir {suite_dir}: task 0's demos are not those {out} learnt it from")
    first["demos"][0]["sha1"] = shas[0]
    json.dump(first, open(out / "results.json", "w"))
    again = m2distill.run(tiny_args(suite_dir, out, "sequential"))  # its own demos: resumes, and names task 1's
    assert [d["sha1"] for d in again["demos"]] == shas
    rec["run"]["seed"] = 1  # another seed of the same flags and demos: one group of two seeds
    json.dump(rec, open(tmp_path / "seed1.json", "w"))
    shutil.copy(finished_run / "results.json", tmp_path / "seed0.json")
    assert aggregate.aggregate(str(tmp_path / "seed*.json"))["sequential"]["seeds"] == [10000, 1]
    rec["demos"][1]["sha1"] = "0" * 12  # seed 1 learnt task 1 from other demos: not a seed of the same group
    json.dump(rec, open(tmp_path / "seed1.json", "w"))
    assert len(aggregate.aggregate(str(tmp_path / "seed*.json"))) == 2
    del rec["demos"][1]["sha1"]  # a record from before the sha1 beside one with it: a seed of the same flags
    json.dump(rec, open(tmp_path / "seed1.json", "w"))
    capsys.readouterr()
    assert aggregate.aggregate(str(tmp_path / "seed*.json"))["sequential"]["seeds"] == [10000, 1]
    assert "seed1.json: recorded before the demos' sha1; grouped with the runs of the same flags" in capsys.readouterr().out


def garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def zero_demos(path):
    with h5py.File(path, "a") as f:
        for d in list(f["data"]):
            del f["data"][d]


def drop_agentview(path):
    with h5py.File(path, "a") as f:
        del f["data/demo_1/obs/agentview_rgb"]


def results_json(text):
    def write(out):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            f.write(text)
    return write


@pytest.mark.parametrize("fault, expected", [
    ("data_dir_is_a_file", r"^--data-dir \S+ is a file; pass the folder that holds <suite>/<task>_demo.hdf5"),
    (garbage, r"^{task1}: not a readable HDF5 file .*delete it and download it again"),
    (truncate, r"^{task1}: not a readable HDF5 file .*delete it and download it again"),
    (zero_demos, r"^{task1}: group 'data' holds no demo_<i> group \(zero demos\); delete it and download it again"),
    (drop_agentview, r"^{task1}: 'data/demo_1/obs/agentview_rgb' is missing; .* Regenerate the file with all of them"),
    ("img_size_64", r"^{task1}: 'data/demo_0/obs/agentview_rgb' holds 32x32 images; --img-size 64 must divide 32: "
                    r"use --img-size 32 or 16 or 8"),
    ("out_is_a_file", r"^--out \S+ is a file; pass a folder"),
    (results_json(""), r"^--out \S+: \S+results.json is not a results record .*move it away"),
    (results_json('{"run": {"suite": "libero_object"}, "tasks": ["a"'), r"^--out \S+: \S+results.json is not a results"),
    (results_json("{}"), r"^--out \S+: \S+results.json is not a results record"),
    (results_json("[1, 2]"), r"^--out \S+: \S+results.json is not a results record"),
    ("other_flags", r"^--out \S+ holds a run with other flags \(lambda_text 1.0 there, 0.5 here\); pass another --out"),
])
def test_bad_files_and_out_are_refused_before_any_collection_or_training(tmp_path, monkeypatch, fault, expected):
    """Task 1's file and --out are checked before task 0 trains and before task 1 would be collected."""
    root, paths = two_task_dir(tmp_path / "data")
    out, kw = tmp_path / "out", {}
    if fault == "data_dir_is_a_file":
        root = str(tmp_path / "a_file")
        open(root, "w").close()
    elif fault == "img_size_64":  # task 0 at 64 px fits, task 1 at 32 px does not
        t = data.suite_benchmark(SUITE).get_task(0)
        write_synthetic_task(paths[0], t.language, n_demos=3, length=10, img_size=64)
        kw = {"img_size": 64}
    elif fault == "out_is_a_file":
        open(out, "w").close()
    elif fault == "other_flags":  # a finished run in --out, and task 1's data still to be collected
        os.makedirs(out)
        m2distill.save_json({"run": {k: getattr(tiny_args(root, out), k) for k in m2distill.RUN_FLAGS},
                             "tasks": [], "success": [], "curves": [], "fwt_k": [], "nll": [], "seconds": {}},
                            str(out / "results.json"))
        os.remove(paths[1])
        kw = {"lambda_text": 0.5}
    elif callable(fault) and fault.__name__ == "write":
        fault(str(out))
    else:
        fault(paths[1])
    nothing_may_start(monkeypatch)
    msg = one_line_exit(lambda: m2distill.run(tiny_args(root, out, **kw)))
    assert re.search(expected.replace("{task1}", re.escape(paths[1])), msg), msg


def write_openvla_task(path, demo_ids, img_size=64, seed=0):
    """A task file as OpenVLA's regenerate_libero_dataset.py writes it (SPEC.md section 11): original demo
    indices with gaps, images of another size, no attributes on `data` or the demos."""
    g = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        grp = f.create_group("data")
        for i in demo_ids:
            n = 10 + int(g.integers(0, 4))
            e = grp.create_group(f"demo_{i}")
            for cam in data.CAMERAS:
                e[f"obs/{cam}"] = g.integers(0, 256, (n, img_size, img_size, 3), dtype=np.uint8)
            for key, d in [("joint_states", 7), ("gripper_states", 2), ("ee_states", 6), ("ee_pos", 3), ("ee_ori", 3)]:
                e[f"obs/{key}"] = g.standard_normal((n, d))
            e["actions"] = np.clip(g.standard_normal((n, 7)), -1, 1)
            e["states"], e["robot_states"] = g.standard_normal((n, 47)), g.standard_normal((n, 9))
            e["rewards"] = e["dones"] = np.eye(n, dtype=np.uint8)[-1]


def test_openvla_regenerated_file_trains_as_it_is(tmp_path):
    """demo_0, 2, 3, 5, 10 in numeric order (demo_10 last, held out), 64 px area-resized to 32, no attributes;
    the attributes are still required where they are used (the full layout, for replay)."""
    path = data.task_file(str(tmp_path / "data"), SUITE, data.suite_benchmark(SUITE).get_task(0).name)
    write_openvla_task(path, [0, 2, 3, 5, 10])
    res = m2distill.run(tiny_args(str(tmp_path / "data"), tmp_path / "out", n_tasks=1, n_demos=3, val_demos=1))
    assert len(res["demos"][0].pop("sha1")) == 12  # data.demos_sha1
    assert res["demos"] == [{"n_train": 3, "n_val": 1, "train": ["demo_0", "demo_2", "demo_3"], "val": ["demo_10"]}]
    assert len(res["nll"][0]) == 1 and np.isfinite(res["nll"][0][0])
    ds = data.SequenceDataset.from_hdf5(path, 0, img_size=32)
    assert ds.demos == ["demo_0", "demo_2", "demo_3", "demo_5", "demo_10"] and ds.obs["agentview_rgb"].shape[1:] == (32, 32, 3)
    with h5py.File(path) as f, pytest.raises(ValueError, match="lacks attribute 'env_name'"):
        data.check_layout(f, path)


def tree(root):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, dirs, files in os.walk(root)
            for n in dirs + files}


def test_read_only_data_dir_is_never_written_and_an_unwritable_cache_is_skipped(tmp_path, monkeypatch, capsys):
    """Nothing is written under --data-dir (a read-only mount; as root chmod does not stop writes, so the
    test compares the tree); caches go to $XDG_CACHE_HOME/m2distill, or are skipped with one warning."""
    root, paths = two_task_dir(tmp_path / "data")
    before = tree(root)
    modes = {p: os.stat(p).st_mode for p in before}
    for p in sorted(before, reverse=True) + [root]:
        os.chmod(p, 0o555 if os.path.isdir(p) else 0o444)
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        m2distill.run(tiny_args(root, tmp_path / "out1", n_tasks=1))
        assert tree(root) == before
        assert len(list((tmp_path / "cache" / "m2distill").glob("task_emb_hash_*.pt"))) == 1
        capsys.readouterr()
        open(tmp_path / "not_a_dir", "w").close()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_dir"))  # unwritable, even for root
        res = m2distill.run(tiny_args(root, tmp_path / "out2", n_tasks=1))
        assert len(res["tasks"]) == 1
        warned = [l for l in capsys.readouterr().err.splitlines() if "cache" in l]
        assert len(warned) == 1 and warned[0].startswith("[m2distill] warning: task-embedding cache")
        assert tree(root) == before
    finally:
        os.chmod(root, 0o755)
        for p, m in modes.items():
            os.chmod(p, m)


def test_download_hints_work_with_libero_downloader(monkeypatch, capsys):
    """Each suite's hint: a `libero-download-datasets` command LIBERO's own parser accepts, the hub command,
    and the folder the files must end up in."""
    data.libero_benchmark()  # LIBERO's config path first
    if importlib.util.find_spec("libero.libero.utils.download_utils") is None:
        pytest.skip("the installed LIBERO package ships no downloader (libero/libero/utils/download_utils.py)")
    from libero.libero.utils import download_utils
    if not hasattr(download_utils, "_datasets_cli"):
        pytest.skip("the installed LIBERO downloader has no command-line parser (_datasets_cli) to check against")
    for suite in data.SUITES:
        hint = data.download_hint(suite, "/data/libero")
        assert os.path.join("/data/libero", suite, "<task>_demo.hdf5") in hint
        assert f"--include '{suite}/*' --local-dir /data/libero" in hint
        cmd = re.search(r"`libero-download-datasets ([^`]*)`", hint)
        assert cmd, hint
        monkeypatch.setattr(sys, "argv", ["libero-download-datasets", *shlex.split(cmd.group(1)), "--help"])
        with pytest.raises(SystemExit) as e:  # argparse checks every value before it reaches --help
            download_utils._datasets_cli()
        assert e.value.code == 0, f"LIBERO's downloader rejects the {suite} hint: {capsys.readouterr().err}"


# ----------------------------------------------------------------------------- LIBERO's weights; reading and writing checkpoints
# (issue 12.1: LIBERO's BCTransformerPolicy weights compute LIBERO's outputs here; 12.3: GPU checkpoints on a CPU;
#  11.5: bad checkpoint files, a deleted checkpoint, a full disk)
def close(actual, expected, atol=1e-5, msg=None):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)


@pytest.fixture(scope="module")
def libero():
    """What LIBERO's own code computed from its weights (README of the fixtures folder): 44 MB, kept outside the repo,
    in $M2DISTILL_FIXTURES or ../shared/fixtures next to the checkout."""
    repo = os.path.dirname(os.path.abspath(__file__))
    root = os.environ.get("M2DISTILL_FIXTURES") or os.path.join(os.path.dirname(repo), "shared", "fixtures")
    path = os.path.join(root, "libero_bctransformer_64px.pt")
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: set M2DISTILL_FIXTURES to the folder holding libero_bctransformer_64px.pt")
    return torch.load(path, weights_only=True)


def libero_policy(libero):
    return model.load_libero_state_dict(model.ResNetT(768, img_size=64), libero["libero_state_dict"])


def test_libero_weights_compute_libero_outputs(libero):
    policy, x, ref = libero_policy(libero).eval(), libero["inputs"], libero["eval"]
    with torch.no_grad():
        tokens, lat = policy.spatial_encode(x["obs"], x["task_emb"])
        latent = policy.temporal_encode(tokens)
        out = policy(x["obs"], x["task_emb"])
    for c in data.CAMERAS:
        close(lat[c], ref["image_embeddings"][c])
    close(tokens, ref["spatial_tokens"])  # [task, joint, gripper, agentview, eye_in_hand]
    close(latent, ref["temporal_latent"])
    close(out["means"], ref["gmm_means"]), close(out["stds"], ref["gmm_stds"]), close(out["logits"], ref["gmm_logits"])
    close(-model.gmm_log_prob(out["means"], out["stds"], out["logits"], x["actions"]), ref["nll"])
    close(m2distill.loss_bc(out, x["actions"]), ref["nll_mean"])


def test_libero_training_step_has_libero_loss_and_gradients(libero):
    policy, x = libero_policy(libero).train(), libero["inputs"]
    for m in policy.modules():  # LIBERO's step was recorded with every dropout (and stochastic depth) at 0
        if isinstance(m, (torch.nn.Dropout, model.TransformerLayer)):
            m.p = m.dropout = 0.0
    loss = m2distill.loss_bc(policy(x["obs"], x["task_emb"]), x["actions"])  # augmentation off: raw pixels
    loss.backward()
    close(loss, torch.tensor(libero["train"]["loss"]), atol=1e-4)
    grads, problems = model.rename_libero(libero["train"]["raw_grads"], policy)
    assert not problems and sorted(grads) == sorted(n for n, _ in policy.named_parameters())
    for n, p in policy.named_parameters():
        close(p.grad, grads[n], atol=1e-4, msg=n)
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 100.0)
    close(norm, torch.tensor(libero["train"]["total_norm"]), atol=1e-4)


def test_libero_get_action_steps_follow_libero(libero):
    policy, steps, ref = libero_policy(libero), libero["steps"], libero["get_action"]
    seen = []  # what the GMM head receives (the newest step's latent) and returns, step by step
    policy.head.register_forward_hook(lambda m, inp, out: seen.append((inp[0], *out)))
    policy.reset()
    for t in range(12):
        a = policy.get_action({k: v[t] for k, v in steps["obs"].items()}, steps["task_emb"])
        assert len(policy.queue) == ref["queue_len"][t] and a.shape == (1, 7) and np.abs(a).max() <= 1
        close(policy.queue[-1][:, -1:], ref["tokens"][t])
    for i, key in enumerate(["latent", "means", "stds", "logits"]):
        close(torch.stack([s[i] for s in seen]), ref[key], msg=key)


def test_libero_loader_names_every_key_that_does_not_fit(libero):
    sd = dict(libero["libero_state_dict"])
    sd["policy_head.extra_layer.weight"] = torch.zeros(1)  # unmatched
    del sd["policy_head.logits_layer.bias"]  # missing (ResNetT: head.logits.bias)
    sd["language_encoder.projection.0.bias"] = torch.zeros(3)  # mis-shaped
    sd["extra_encoder.proprio_mlp.0.bias"] = sd["extra_encoder.proprio_mlp.0.bias"] + 1  # LIBERO's twin differs
    with pytest.raises(ValueError) as e:
        model.load_libero_state_dict(model.ResNetT(768, img_size=64), sd)
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in [
        "unmatched policy_head.extra_layer.weight", "missing head.logits.bias",
        "mis-shaped language_encoder.projection.0.bias (3,) (ResNetT: (64,))",
        "extra_encoder.proprio_mlp.0.bias differs from its twin extra_encoder.encoders.1.0.bias"])
    with pytest.raises(ValueError, match="pos_x .* 64 px images, this policy takes 128 px"):
        model.load_libero_state_dict(model.ResNetT(768, img_size=128), libero["libero_state_dict"])


class EasyDict(dict):
    """Stands for the class of LIBERO's saved cfg (easydict.EasyDict): one torch's weights_only does not know."""


def test_init_from_a_libero_checkpoint_or_one_of_ours(libero, suite_dir, tmp_path, monkeypatch):
    path, x = str(tmp_path / "libero_task0.pth"), libero["inputs"]
    cfg = EasyDict(policy={"embed_size": 64})
    cfg.policy = cfg["policy"]
    torch.save({"state_dict": libero["libero_state_dict"], "cfg": cfg, "previous_masks": None}, path)  # LIBERO's format
    policy = model.init_from(model.ResNetT(768, img_size=64), path).eval()
    with torch.no_grad():
        close(policy(x["obs"], x["task_emb"])["means"], libero["eval"]["gmm_means"])
    with pytest.raises(ValueError, match="takes 768-d task embeddings, this run's are 32-d; pass the --task-emb"):
        model.init_from(model.ResNetT(32, img_size=64), path)
    with pytest.raises(SystemExit, match="^--checkpoint .* is LIBERO's checkpoint .* --init-from"):
        evaluate.main(["--checkpoint", path])
    ours = str(tmp_path / "task0.pt")
    m2distill.save_checkpoint(policy, torch.randn(10, 768), types.SimpleNamespace(suite=SUITE, algo="er", tasks=[0]), 0, ours)
    again = model.init_from(model.ResNetT(768, img_size=64), ours)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in policy.state_dict().items())
    with pytest.raises(ValueError, match="trained with img_size 64 .this run: 32.; pass the same flags"):
        model.init_from(model.ResNetT(768, img_size=32), ours)
    # The flag: the policy holds these weights when task 0 starts; a mismatch is one line before any training.
    started = []

    def learn_task(policy, *a):  # record the weights task 0 starts from, then stop the run
        started.append(copy.deepcopy(policy.state_dict()))
        raise KeyboardInterrupt

    monkeypatch.setattr(m2distill, "learn_task", learn_task)
    with pytest.raises(SystemExit, match="^--init-from .*768-d task embeddings, this run's are 32-d"):
        m2distill.run(tiny_args(suite_dir, tmp_path / "a", init_from=path))
    fallback = lambda langs, kind, cache_dir=None: (torch.randn(len(langs), 384), "minilm")  # BERT not on disk
    monkeypatch.setattr(data, "task_embeddings", fallback)
    with pytest.raises(SystemExit, match="this run's are 384-d.*--task-emb bert fell back to minilm, as said above"):
        m2distill.run(tiny_args(suite_dir, tmp_path / "a2", init_from=path, task_emb="bert"))
    monkeypatch.undo()
    monkeypatch.setattr(m2distill, "learn_task", learn_task)
    small = str(tmp_path / "small.pt")
    m2distill.save_checkpoint(model.ResNetT(32, img_size=32), torch.randn(10, 32),
                              types.SimpleNamespace(suite=SUITE, algo="er", tasks=[0]), 0, small)
    with pytest.raises(KeyboardInterrupt):
        m2distill.run(tiny_args(suite_dir, tmp_path / "b", init_from=small))
    assert all(torch.equal(v, started[0][k]) for k, v in torch.load(small, weights_only=True)["state_dict"].items())


@pytest.fixture(scope="module")
def finished_run(suite_dir, tmp_path_factory):
    """A finished two-task run (sequential, the cheapest), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished")
    m2distill.run(tiny_args(suite_dir, out, "sequential"))
    return out


def copy_run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def test_a_run_trained_on_a_gpu_resumes_and_evaluates_on_a_cpu(finished_run, suite_dir, tmp_path):
    out, cuda = copy_run(finished_run, tmp_path), [False]
    torch.serialization.register_package(0, lambda storage: "cuda:0" if cuda[0] else None, lambda obj, loc: None)
    for k in range(2):  # tag every tensor for cuda:0, as torch.save does on a GPU machine
        ckpt = torch.load(out / f"task{k}.pt", weights_only=True)
        cuda[0] = True
        try:
            torch.save(ckpt, out / f"task{k}.pt")
        finally:
            cuda[0] = False
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(out / "task1.pt", weights_only=True)
    res = m2distill.run(tiny_args(suite_dir, out, "sequential"))  # resumes: task1.pt is read, nothing left to do
    assert len(res["tasks"]) == 2
    policy, embs, suite, learned = evaluate.load_policy(str(out / "task1.pt"))
    assert learned == [0, 1] and next(policy.parameters()).device.type == "cpu"


def test_a_deleted_or_damaged_checkpoint_stops_the_resume_with_one_line(finished_run, suite_dir, tmp_path,
                                                                        monkeypatch):
    out = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(m2distill, "train_step", lambda *a: pytest.fail("trained although the run cannot resume"))
    results = (out / "results.json").read_text()
    os.remove(out / "task1.pt")  # a finished run
    with pytest.raises(SystemExit) as e:
        m2distill.run(tiny_args(suite_dir, out, "sequential"))
    assert str(e.value).startswith(f"{out / 'task1.pt'}: no such file") and "restore it" in str(e.value)
    res = json.loads(results)  # a partly finished run (task 0 of 2), its task0.pt cut short
    for key in m2distill.PER_TASK:
        res[key] = res[key][:1]
    (out / "results.json").write_text(json.dumps(res))
    (out / "task0.pt").write_bytes((out / "task0.pt").read_bytes()[:5000])
    with pytest.raises(SystemExit) as e:
        m2distill.run(tiny_args(suite_dir, out, "sequential"))
    msg = str(e.value)
    assert msg.startswith(f"{out / 'task0.pt'} is a truncated or damaged torch file") and "\n" not in msg
    assert json.loads((out / "results.json").read_text()) == res


def test_evaluate_refuses_what_is_not_a_checkpoint_in_one_line(finished_run, tmp_path):
    bad = {"text": tmp_path / "notes.txt", "hdf5": tmp_path / "task0_demo.hdf5", "truncated": tmp_path / "cut.pt",
           "tensor": tmp_path / "tensor.pt", "empty dict": tmp_path / "empty.pt", "directory": finished_run,
           "missing": tmp_path / "nope.pt"}
    bad["text"].write_text("task0.pt\n")
    write_synthetic_task(str(bad["hdf5"]), "pick it up", n_demos=1, length=4, img_size=8)
    bad["truncated"].write_bytes((finished_run / "task0.pt").read_bytes()[:100_000])
    torch.save(torch.ones(3), bad["tensor"])
    torch.save({}, bad["empty dict"])
    expect = {"text": "is not a torch checkpoint", "hdf5": "is an HDF5 file", "truncated": "is a truncated or damaged",
              "tensor": "holds a Tensor, not a checkpoint", "empty dict": "lacks config, state_dict, task_embs, task",
              "directory": "is a directory; .* \\(task0.pt, task1.pt\\)", "missing": ": no such file"}
    for kind, path in bad.items():
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(path)])
        msg = str(e.value)
        assert msg.startswith(f"--checkpoint {path}") and "\n" not in msg, kind
        assert re.search(expect[kind], msg) and "task<k>.pt" in msg, (kind, msg)


def test_a_full_disk_while_writing_a_checkpoint_loses_nothing_and_the_rerun_stops_before_training(
        suite_dir, tmp_path, monkeypatch):
    args, save = tiny_args(suite_dir, tmp_path, "sequential"), torch.save

    def disk_fills(obj, f, *a, **kw):  # what torch's zip writer raises when the disk fills under task1.pt
        if str(f).endswith("task1.pt.tmp"):
            open(f, "wb").write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4288 vs 4276")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(SystemExit) as e:
        m2distill.run(args)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'task1.pt'}: writing failed") and "MB free" in msg
    assert "\n" not in msg and sorted(os.listdir(tmp_path)) == ["progress.pt", "results.json", "task0.pt"]  # no .tmp
    assert len(json.load(open(tmp_path / "results.json"))["tasks"]) == 1  # task 0 kept
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=2**20))  # still full: 1 MB
    monkeypatch.setattr(m2distill, "train_step", lambda *a: pytest.fail("trained although the disk is full"))
    with pytest.raises(SystemExit, match=f"^--out {tmp_path}: 1 MB free on its disk, a checkpoint needs [0-9]+ MB"):
        m2distill.run(args)

    def no_space(obj, f, *a, **kw):  # the other error a full disk gives: OSError ENOSPC from the file write
        open(f, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit, match="No space left on device.*1 MB free"):
        m2distill.save_checkpoint(model.ResNetT(32), torch.zeros(10, 32), args, 0, str(tmp_path / "x.pt"))
    assert not os.path.exists(tmp_path / "x.pt.tmp")


def test_a_checkpoint_from_before_the_libero_keypoint_order_keeps_its_function(tmp_path):
    policy = model.ResNetT(32, img_size=32).eval()
    for enc in policy.image_encoders.values():
        enc.pos = enc.pos.flip(0)  # the order before format 2: [columns, rows]
    obs, emb, path = fake_obs(B=1, T=3), torch.randn(1, 32), str(tmp_path / "task0.pt")
    torch.save({"config": policy.config, "state_dict": policy.state_dict(), "task_embs": torch.randn(10, 32),
                "suite": SUITE, "task": 0, "algo": "er"}, path)  # no "format"
    loaded, *_ = evaluate.load_policy(path)
    with torch.no_grad():
        close(loaded(obs, emb)["means"], policy(obs, emb)["means"])


# ----------------------------------------------------------------------------- rollouts (issue 11: 1, 4, 6, 7;
# issue 13: --low-eval-noise): a broken machine is never a failed policy, reproducible episodes, workers that
# end with their parent, what a person sees
def test_a_broken_renderer_stops_the_run_before_training_and_writes_nothing(suite_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "make_env", functools.partial(fake_env_fn, fail="init"))
    learned = []
    monkeypatch.setattr(m2distill, "learn_task", lambda *a: learned.append(a[6]))
    with pytest.raises(evaluate.EnvError) as e:
        m2distill.run(tiny_args(suite_dir, tmp_path, n_eval=2, eval_workers=1))
    msg = str(e.value)
    assert "cannot start or render" in msg and "MUJOCO_GL=egl" in msg and "EGL_NOT_INITIALIZED" in msg
    assert "Fix: install the EGL libraries" in msg and "\n" not in msg
    assert learned == [] and not os.path.exists(tmp_path / "results.json") and not os.path.exists(tmp_path / "task0.pt")


def test_an_env_whose_render_fails_gives_no_number_and_names_the_fix(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    ev = evaluate.Evaluator(SUITE, n_eval=2, max_steps=5, workers=2, env_fn=functools.partial(fake_env_fn, fail="render"))
    try:
        with pytest.raises(evaluate.EnvError, match=r"MUJOCO_GL=osmesa\): RuntimeError: eglMakeCurrent.*apt-get install"):
            ev(model.ResNetT(d_lang=8, img_size=32), [0], torch.randn(1, 8))
    finally:
        ev.close()
    assert ev.episodes == []


def test_a_worker_that_keeps_failing_stops_the_evaluation_instead_of_scoring_zero():
    ev = evaluate.Evaluator(SUITE, n_eval=4, max_steps=5, workers=2, env_fn=functools.partial(fake_env_fn, fail="later"))
    try:  # the up-front check passes (init state 0); every episode from init states 1-3 raises in env.step
        with pytest.raises(evaluate.EnvError, match=r"3 tries in a row could not run.*MuJoCo step failed"):
            ev(model.ResNetT(d_lang=8, img_size=32), [0], torch.randn(1, 8))
    finally:
        ev.close()
    assert len(ev.errors) == evaluate.STOP_AFTER and all(e[2] for e in ev.episodes)  # no failure was recorded


def test_rollouts_are_seeded_per_episode_whatever_the_workers_and_low_eval_noise_acts_with_a_modes_mean(tmp_path):
    """Episode i of task t is seeded by (seed, t, i): 1 and 2 workers, and a second evaluation, give the same
    actions and outcomes; stream 1 draws other episodes from the same init states. With --low-eval-noise (LIBERO's GMMHead option) the first action is the mean of one
    mode of the mixture (std 1e-4), while by default it is a full sample, far from every mode's mean."""
    policy, embs = model.ResNetT(d_lang=8, img_size=32), torch.randn(1, 8, generator=torch.Generator().manual_seed(0))

    def rollouts(workers, calls=1, **kw):
        out = []
        ev = evaluate.Evaluator(SUITE, n_eval=6, max_steps=3, workers=workers, seed=7,
                                env_fn=functools.partial(fake_env_fn, n_init=6, record=str(tmp_path)), **kw)
        try:
            for c in range(calls):
                rates = ev(policy, [0], embs, stream=c // 2)  # calls 0, 1 on stream 0; call 2 on stream 1
                outcomes = sorted(e[:4] for e in ev.episodes)
                ev.episodes.clear()
                out.append((rates, outcomes, {s: np.load(tmp_path / f"{s}.npy") for s in range(6)}))
        finally:
            ev.close()
        return out

    (r1, o1, a1), (r1b, o1b, a1b), (_, _, fresh) = rollouts(1, calls=3)
    [(r2, o2, a2)] = rollouts(2)
    assert all(not np.array_equal(a1[s], fresh[s]) for s in range(6))  # stream 1: the same init states, new draws
    assert evaluate.episode_seed(7, 0, 3) == int(np.random.SeedSequence([7, 0, 3]).generate_state(1)[0])  # as before
    assert 0 < r1[0][0] < 1 and r1[0][1] == 6  # some episodes succeed and some fail: outcomes follow the actions
    assert r1 == r1b == r2 and o1 == o1b == o2
    for s in range(6):
        np.testing.assert_array_equal(a1[s], a1b[s])
        np.testing.assert_array_equal(a1[s], a2[s])
    assert not np.array_equal(a1[0], a1[1])  # episodes differ from each other
    [(_, _, low)] = rollouts(1, low_eval_noise=True)
    obs = evaluate.policy_obs(FakeEnv().obs(), 32)
    with torch.no_grad():
        means = policy.eval()({k: v[:, None] for k, v in obs.items()}, embs)["means"][0, 0].clamp(-1, 1).numpy()
    first = lambda a: a[evaluate.N_SETTLE]  # the policy's first action, after the settle steps
    for s in range(6):
        assert np.abs(means - first(low[s])).max(1).min() < 1e-3  # one mode's mean, up to the min std
        assert np.abs(means - first(a1[s])).max(1).min() > 1e-2  # LIBERO's default: a full sample


def test_low_eval_noise_samples_the_drawn_mode_at_min_std_in_eval_only():
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(B=1, T=1), torch.randn(1, 32)
    policy.head.low_eval_noise = True
    with torch.no_grad():
        out = policy.eval()(obs, emb)
        assert torch.equal(out["stds"], torch.full_like(out["stds"], policy.head.min_std))
        assert (policy.train()(obs, emb)["stds"] > 1e-3).all()  # training is unaffected
    step, drawn = {k: v[:, 0] for k, v in obs.items()}, set()
    for seed in range(10):
        torch.manual_seed(seed)
        policy.reset()
        a = policy.get_action(step, emb)[0]
        far = np.abs(out["means"][0, 0].clamp(-1, 1).numpy() - a).max(1)  # (M,) from each mode's mean
        assert far.min() < 1e-3
        drawn.add(int(far.argmin()))
    assert len(drawn) > 1  # the mode is drawn from the mixture weights, not always the most likely one
    args = m2distill.parse_args(["--low-eval-noise"])
    assert args.low_eval_noise and "low_eval_noise" in m2distill.RUN_FLAGS


SLOW_EVAL = """
import faulthandler, os, signal, sys, time
import numpy as np
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks if this hangs
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts it, even if pytest runs as a
# background job of a non-interactive shell (`cmd &`), whose children inherit SIGINT ignored
sys.path.insert(0, {repo!r})
import evaluate


class SlowEnv:
    def reset(self):
        pass

    def set_init_state(self, s):
        return self.obs()

    def step(self, action):
        time.sleep(0.2)
        return self.obs(), 0.0, False, {{}}

    def obs(self):
        img = np.zeros((32, 32, 3), np.uint8)
        return {{"agentview_image": img, "robot0_eye_in_hand_image": img, "robot0_joint_pos": np.zeros(7),
                "robot0_gripper_qpos": np.zeros(2)}}

    def close(self):
        pass


def env_fn(suite, task):
    open(os.path.join({pids!r}, str(os.getpid())), "w").close()
    return SlowEnv(), np.arange(8)


def main():
    import model, torch
    ev = evaluate.Evaluator("libero_object", n_eval=8, max_steps=10 ** 6, workers=2, env_fn=env_fn)
    try:
        ev(model.ResNetT(d_lang=8, img_size=32), [0], torch.randn(1, 8))
    finally:
        ev.close()


if __name__ == "__main__":
    evaluate.cli(main)
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_workers_end_with_their_parent_and_ctrl_c_returns_quietly(tmp_path, sig):
    """A main process running an Evaluator with 2 workers mid-episode is killed (SIGKILL, SIGTERM), or gets
    Ctrl-C (SIGINT to its process group): the workers are gone within 10 s; Ctrl-C exits 130 with one line."""
    import signal
    import subprocess
    import sys
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "slow_eval.py"
    script.write_text(SLOW_EVAL.format(repo=os.path.dirname(os.path.abspath(__file__)), pids=str(pids)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, text=True)
    try:
        deadline = time.time() + 120
        while len(os.listdir(pids)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = [int(p) for p in os.listdir(pids)]
        assert len(workers) == 2, proc.communicate(timeout=10)
        time.sleep(1.0)  # both in an episode
        os.killpg(proc.pid, getattr(signal, sig)) if sig == "SIGINT" else proc.send_signal(getattr(signal, sig))
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            raise AssertionError("no exit within 30 s of " + sig + "; its threads:\n" + proc.communicate()[1])
        deadline = time.time() + 10
        while any(_running(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in workers)
        if sig == "SIGINT":
            assert proc.returncode == 130 and "Traceback" not in err and "Interrupted (Ctrl-C)" in err, err
            assert len(err.strip().splitlines()) == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers if "workers" in locals() else []:
            if _running(p):
                os.kill(p, signal.SIGKILL)


def test_user_facing_errors_are_short_lines_without_traceback(capsys):
    long = "--data-dir " + "x" * 30 + ": " + " ".join(["the file is not what it should be"] * 8) + "."

    def fails(exc):
        def main():
            raise exc
        return main
    for exc in (SystemExit(long), evaluate.EnvError(long)):
        with pytest.raises(SystemExit) as e:
            evaluate.cli(fails(exc))
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.split() == long.split() and all(len(line) <= 100 for line in err.splitlines())
        assert len(err.splitlines()) > 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        evaluate.cli(fails(KeyboardInterrupt()))
    assert e.value.code == 130 and "Interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("K", [1, 3, 10])
def test_success_matrix_png_is_not_cut_off(tmp_path, K):
    import matplotlib.image
    conf = [[0.5] * (k + 1) for k in range(K)]
    path = str(tmp_path / "m.png")
    evaluate.plot_success_matrix(conf, evaluate.lifelong_metrics(conf, [0.5] * K), path,
                                 "libero_object m2distill seed 10000", episodes=[[20] * (k + 1) for k in range(K)])
    img = matplotlib.image.imread(path)[..., :3]
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                             img[:, -3:].reshape(-1, 3)])
    assert border.min() > 0.99  # nothing drawn touches the edge: no clipped title, label or tick
    assert min(img.shape[:2]) >= 300


def test_the_run_says_where_it_wrote_and_what_a_rerun_has_left(suite_dir, tmp_path, monkeypatch, capsys):
    argv = ["--suite", SUITE, "--data-dir", suite_dir, "--out", str(tmp_path), "--n-tasks", "2", "--epochs", "1",
            "--batch-size", "8", "--n-demos", "2", "--val-demos", "1", "--img-size", "32", "--n-eval", "0",
            "--task-emb", "hash", "--device", "cpu"]
    learn, calls = m2distill.learn_task, []

    def task_1_interrupted(*a):  # task 0 is learnt; the run is stopped in task 1
        calls.append(a[6])
        if a[6] == 1:
            raise KeyboardInterrupt
        return learn(*a)

    monkeypatch.setattr(m2distill, "learn_task", task_1_interrupted)
    with pytest.raises(KeyboardInterrupt):
        m2distill.main(argv)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'task0.pt'}, {tmp_path / 'results.json'}" in out
    name0 = data.suite_benchmark(SUITE).get_task(0).name
    monkeypatch.setattr(m2distill, "learn_task", lambda *a: (calls.append(a[6]), ([None], None, [0], []))[1])
    m2distill.main(argv)
    out = capsys.readouterr().out
    assert f"--out {tmp_path} holds 1 finished task(s) of 2: {name0}; resuming with the next one." in out
    assert f"Results: {tmp_path / 'results.json'}; checkpoints: {tmp_path / 'task<k>.pt'} (k = 0..1)." in out
    m2distill.main(argv)
    out = capsys.readouterr().out
    assert "holds 2 finished task(s) of 2" in out and "nothing left to do" in out and calls == [0, 1, 1]
    assert json.load(open(tmp_path / "results.json"))["episodes"] == [[0], [0, 0]]


# ----------------------------------------------------------------------------- found by trying it as a new user
@pytest.mark.parametrize("flag, value", [("--n-eval", "0"), ("--max-steps", "0"), ("--eval-workers", "0"),
                                         ("--seed", "-1")])
def test_evaluate_flags_out_of_range_get_one_line_before_any_rollout(tmp_path, flag, value):
    argv = ["--checkpoint", str(tmp_path / "task0.pt"), "--n-eval", "2", "--max-steps", "10", flag, value]
    with pytest.raises(SystemExit, match=f"^{flag} {value}: out of range; allowed: "):
        evaluate.main(argv)


def test_a_device_this_torch_cannot_use_is_named_in_one_line(suite_dir, tmp_path):
    devices = ["foo"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for device in devices:
        with pytest.raises(SystemExit, match=f"^--device {device}: "):
            tiny_args(suite_dir, tmp_path, device=device)


def test_evaluate_refuses_a_suite_other_than_the_checkpoints(tmp_path):
    path = str(tmp_path / "task0.pt")
    m2distill.save_checkpoint(model.ResNetT(8, img_size=32), torch.randn(10, 8),
                              types.SimpleNamespace(suite=SUITE, algo="er", tasks=[0]), 0, path)
    with pytest.raises(SystemExit, match=f"^--suite libero_goal: .* was trained on {SUITE}"):
        evaluate.main(["--checkpoint", path, "--suite", "libero_goal", "--n-eval", "1", "--max-steps", "5"])


def test_evaluate_refuses_a_png_that_is_a_folder_and_a_video_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    msg = one_line_exit(lambda: evaluate.main(["--aggregate", "results/cmp_*.json", "--png", str(tmp_path)]))
    assert msg.startswith(f"--png {tmp_path} is a folder") and not list(tmp_path.parent.glob("*.tmp.png"))
    msg = one_line_exit(lambda: evaluate.main(["--checkpoint", str(tmp_path / "t.pt"), "--video-dir", str(tmp_path / "f")]))
    assert msg.startswith(f"--video-dir {tmp_path / 'f'} is a file")


def test_bench_time_split_takes_a_run_folder_and_names_a_file_that_is_not_a_record(finished_run, tmp_path, capsys):
    import bench
    bench.time_split(str(finished_run))  # a run folder, as the README's runs/<run>
    assert "| sum of the parts |" in capsys.readouterr().out
    (tmp_path / "x.json").write_text("{}")
    for bad in (tmp_path, tmp_path / "x.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match=f"^--results {bad}.*: not a results.json of m2distill.py"):
            bench.time_split(str(bad))


def test_a_run_stopped_by_bad_input_leaves_no_empty_out_folder(suite_dir, tmp_path):
    (tmp_path / "data").write_text("a file, not a folder")
    argv = ["--suite", SUITE, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--n-tasks", "1",
            "--task-emb", "hash", "--n-eval", "0"]
    assert one_line_exit(lambda: m2distill.main(argv)).startswith(f"--data-dir {tmp_path / 'data'} is a file")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_prints_one_line_even_when_freed_objects_raise():
    """Ctrl-C in demo collection frees the simulator's renderers with the interrupted frames, and their destructors
    raise (EGL): the one line is all the user sees."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import evaluate\n"
            "class Renderer:\n    def __del__(self): raise RuntimeError('EGL context already gone')\n"
            "def main():\n    r = Renderer()\n    raise KeyboardInterrupt\n"
            "evaluate.cli(main)\n")
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines() == [
        "Interrupted (Ctrl-C). Work finished before stays on disk; rerun the same command to resume."], proc.stderr


def test_evaluate_refuses_a_task_given_twice(tmp_path):
    """Its seeded episodes would run twice and count as 2 x --n-eval episodes of one cell."""
    path = str(tmp_path / "task0.pt")
    m2distill.save_checkpoint(model.ResNetT(8, img_size=32), torch.randn(10, 8),
                              types.SimpleNamespace(suite=SUITE, algo="er", tasks=[0]), 0, path)
    with pytest.raises(SystemExit, match="^--tasks 0 1 0: give each task once"):
        evaluate.main(["--checkpoint", path, "--tasks", "0", "1", "0", "--n-eval", "1", "--max-steps", "5"])


def test_a_damaged_progress_file_or_a_swapped_checkpoint_stops_the_resume_with_one_line(suite_dir, tmp_path,
                                                                                       monkeypatch):
    args = tiny_args(suite_dir, tmp_path, "sequential", epochs=2)
    # killed in task 1, after its first epoch (task 0: 2 x 4 steps, task 1: 2 x 3)
    killed_at_step(monkeypatch, 12, lambda: m2distill.run(args))
    progress = tmp_path / "progress.pt"
    progress.write_bytes(progress.read_bytes()[:3000])  # cut short by a kill while it was written
    with pytest.raises(SystemExit, match=f"^{progress} is damaged .*delete it to learn task 1 again"):
        m2distill.run(args)
    assert json.load(open(tmp_path / "results.json"))["tasks"] and os.path.exists(tmp_path / "task0.pt")
    os.remove(progress)
    m2distill.run(args)
    shutil.copy(tmp_path / "task0.pt", tmp_path / "task1.pt")  # a checkpoint of another task under task1.pt
    with pytest.raises(SystemExit, match="task1.pt holds the weights after task 0 of its run, not 1"):
        m2distill.run(args)


def test_a_progress_file_of_a_run_with_other_flags_stops_the_resume(suite_dir, tmp_path, monkeypatch):
    """A --first-task-from run killed in its second task has no results.json in --out yet: rerun with other flags
    into that --out, it must not resume the other run's weights, optimizer and epoch."""
    src = tmp_path / "src"
    m2distill.run(tiny_args(suite_dir, src, "sequential", epochs=2, tasks=[0]))
    args = lambda **kw: tiny_args(suite_dir, tmp_path / "m2d", epochs=2, first_task_from=src, **kw)
    killed_at_step(monkeypatch, 5, lambda: m2distill.run(args(lambda_policy=0.1)))  # task 1, 2 x 3 steps: epoch 2
    assert not os.path.exists(tmp_path / "m2d" / "results.json")
    progress = tmp_path / "m2d" / "progress.pt"
    with pytest.raises(SystemExit, match=f"^{progress} is task 1 of a run with other flags \\(lambda_policy \\S+ there, \\S+ here\\)"):
        m2distill.run(args(lambda_policy=1.0))
    assert os.path.exists(progress)  # nothing lost
    saved = torch.load(progress, weights_only=True)
    torch.save({**saved, "demos_sha1": "0" * 12}, progress)  # trained on other demos than --data-dir holds now
    with pytest.raises(SystemExit, match=f"^--data-dir {suite_dir}: {progress} learnt task 1 from other demos "
                                         f"\\(actions sha1 000000000000 there, {saved['demos_sha1']} here\\)"):
        m2distill.run(args(lambda_policy=0.1))
    torch.save(saved, progress)
    assert len(m2distill.run(args(lambda_policy=0.1))["tasks"]) == 2  # the same flags and demos resume


def test_a_first_task_progress_file_resumes_under_another_algorithm_but_not_other_task_flags(suite_dir, tmp_path,
                                                                                           monkeypatch, capsys):
    """Every algorithm learns the first task the same way (LATER_FLAGS act from the second on, as --first-task-from):
    a run killed in task 0 resumes under another --algo or lambdas, but not under another --lr."""
    args = lambda algo, **kw: tiny_args(suite_dir, tmp_path, algo, epochs=2, tasks=[0], **kw)
    killed_at_step(monkeypatch, 6, lambda: m2distill.run(args("sequential")))  # task 0, 2 x 4 steps: epoch 2
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'progress.pt'} is task 0 of a run with other flags \\(lr \\S+ there, \\S+ here\\)"):
        m2distill.run(args("m2distill", lr=3e-4))
    capsys.readouterr()
    res = m2distill.run(args("m2distill", lambda_policy=0.1))
    assert "task 0: resuming after epoch 1" in capsys.readouterr().out
    assert res["run"]["algo"] == "m2distill" and len(res["tasks"]) == 1

def test_aggregate_names_a_broken_results_file_and_makes_the_picture_folder(tmp_path):
    os.makedirs(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "a" / "results.json").write_text('{"success": [[')
    with pytest.raises(SystemExit, match="a/results.json is not a results.json of m2distill.py"):
        evaluate.main(["--aggregate", str(tmp_path / "runs" / "*")])
    (tmp_path / "runs" / "a" / "results.json").write_text(json.dumps(
        {"run": {"algo": "er", "seed": 1, "n_eval": 2}, "success": [[0.5]], "metrics": None, "nll": [None]}))
    evaluate.main(["--aggregate", str(tmp_path / "runs" / "*"), "--png", str(tmp_path / "new" / "dir" / "t.png")])
    assert os.path.exists(tmp_path / "new" / "dir" / "t.png")


def test_bert_is_only_read_from_disk_never_downloaded(tmp_path, monkeypatch):
    import transformers
    asked = []

    def from_pretrained(name, *a, **kw):
        asked.append(kw.get("local_files_only"))
        raise OSError(f"{name} is not on disk")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(data, "_minilm_embeddings", lambda langs: torch.zeros(len(langs), 384))
    emb, kind = data.task_embeddings(["pick up the soup"], "bert", str(tmp_path))
    assert kind == "minilm" and asked and all(asked)  # the hub is never asked: an offline machine does not wait


# ----------------------------------------------------------------------------- expert: no idle stretches, DART (issue 13)
def longest_idle_run(actions, tol=1e-3):
    """Longest run of consecutive steps whose arm action (dims 0..5) has norm below `tol`."""
    best = cur = 0
    for still in np.linalg.norm(np.asarray(actions)[:, :6], axis=1) < tol:
        cur = cur + 1 if still else 0
        best = max(best, cur)
    return best


@needs_simulator
def test_expert_demo_never_holds_the_arm_still(collected):
    """Closing and opening end on the fingers (gripper_states), not on a timer the policy cannot see, and
    the arm keeps moving meanwhile: no more than 2 consecutive steps with a zero arm action."""
    _, path = collected
    with h5py.File(path, "r") as f:
        a = f["data/demo_0/actions"][()]
    assert longest_idle_run(a) <= 2
    assert np.abs(a).max() <= 1.0 and set(np.unique(a[:, 6])) <= {-1.0, 1.0}


class CountingEnv:
    """Just enough of a LIBERO env for run_episode: keeps the actions it executes; done after 40 steps."""
    sim = types.SimpleNamespace(model=types.SimpleNamespace(get_xml=lambda: "<mujoco/>"))

    def reset(self):
        self.executed = []
        return {}

    def step(self, action):
        self.executed.append(np.array(action))
        return {}, 0.0, len(self.executed) >= expert.N_SETTLE + 40, {}

    def get_sim_state(self):
        return np.zeros(3)


class ConstantExpert:
    def act(self, obs):
        return np.array([0.5, -0.99, 0.0, 0.2, 0.0, 0.0, 1.0])


def test_dart_noises_executed_arm_actions_and_records_the_clean_ones(monkeypatch):
    monkeypatch.setattr(expert, "make_expert", lambda *a, **k: ConstantExpert())
    monkeypatch.setattr(expert, "restart", lambda env, model_file, state: {})
    monkeypatch.setattr(expert, "to_demo", lambda env, frames: np.stack([f[2] for f in frames]))
    clean = ConstantExpert().act(None)
    for sigma in (0.0, 0.1):
        env = CountingEnv()
        ok, n, recorded = expert.run_episode(env, SUITE, 0, np.random.default_rng(0), record=True, dart_noise=sigma)
        executed = np.stack(env.executed[expert.N_SETTLE:])
        assert ok and n == 40 and (recorded == clean).all()  # the clean expert action is recorded
        assert (executed[:, 6] == clean[6]).all() and np.abs(executed).max() <= 1.0  # gripper never noised
        noise = executed[:, :6] - clean[:6]
        if sigma == 0:
            assert (noise == 0).all()
        else:
            assert 0.07 < noise[:, 2:].std() < 0.13 and (noise[:, 1] >= -0.01 - 1e-12).all()  # clipped at -1
            assert np.abs(noise[:, 2:]).min() > 0


# ----------------------------------------------------------------------------- expert: every task of the paper's suites (issue 14)
NEW_BEHAVIOURS = {0: "drawer", 3: "into the drawer it opened", 5: "plate into a table region", 7: "knob", 9: "rack"}  # LIBERO-Goal task ids


@pytest.fixture(scope="module")
def goal_demos():
    """One real expert demo of each new LIBERO-Goal behaviour, made as `expert.collect(seed=1)` makes its first
    (same seeding, same run_episode recording) but without cameras, whose rendering is most of a collection's
    time: {task_id: (states, actions, model_file)}, states[0] the init_state."""
    bench, demos = data.suite_benchmark("libero_goal"), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(expert, "to_demo", lambda env, frames: (np.stack([f[1] for f in frames]),
                                                             np.stack([f[2] for f in frames]), env.sim.model.get_xml()))
        for task_id in sorted(NEW_BEHAVIOURS):
            for attempt in range(3):  # as collect seeds its attempts at demo 0 of task_id (max_tries_factor 3)
                np.random.seed([1, task_id, attempt])
                env = expert.make_env(bench.get_task(task_id), cameras=False)
                try:
                    ok, _, demos[task_id] = expert.run_episode(env, "libero_goal", task_id,
                                                               np.random.default_rng([1, task_id, attempt]), record=True)
                finally:
                    env.close()
                if ok:
                    break
            assert ok, NEW_BEHAVIOURS[task_id]
    return demos


@needs_simulator
@pytest.mark.parametrize("task_id", sorted(NEW_BEHAVIOURS))
def test_new_behaviour_demo_is_in_libero_convention(goal_demos, task_id):
    """An expert demo of each new behaviour (recorded as collect records it) has OSC deltas in [-1, 1], the
    gripper exactly +-1 and no idle stretch."""
    _, actions, _ = goal_demos[task_id]
    assert np.abs(actions).max() <= 1.0 and set(np.unique(actions[:, 6])) <= {-1.0, 1.0}
    assert longest_idle_run(actions) <= 2


@needs_simulator
@pytest.mark.parametrize("task_id", sorted(NEW_BEHAVIOURS))
def test_new_behaviour_demo_replays_to_success(goal_demos, task_id):
    """Replayed by its actions from its init state in its scene (expert.replay), a demo passes through every recorded
    state exactly and gets the env's success at its last action. Fails without either half of expert.restart: the
    fixtures' poses (the wine rack's replay misses) or the collection starting as its replay does (states drift)."""
    states, actions, model_file = goal_demos[task_id]
    env = expert.make_env(data.suite_benchmark("libero_goal").get_task(task_id), cameras=False)
    try:
        expert.restart(env, model_file, states[0])
        for t, a in enumerate(actions):
            np.testing.assert_array_equal(env.get_sim_state(), states[t], err_msg=f"step {t}")
            env.step(a)
        assert expert.replay(env, model_file, states[0], actions) == len(actions) - 1, NEW_BEHAVIOURS[task_id]
    finally:
        env.close()


def pointing_down_obs(yaw, q7):
    """Proprioception of a hand pointing straight down with its closing axis at `yaw` (rad)."""
    from robosuite.utils.transform_utils import mat2quat
    y = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    z = np.array([0.0, 0.0, -1.0])
    rot = np.stack([np.cross(y, z), y, z], axis=1)
    return {"robot0_gripper_qpos": np.array([0.04, -0.04]), "robot0_eef_quat": mat2quat(rot),
            "robot0_joint_pos": np.array([0, 0, 0, -2, 0, 2, q7])}


def test_hand_turns_the_way_its_last_wrist_joint_allows_and_never_flips_mid_turn():
    """Of the two symmetric grasps (closing axis c or -c), the hand takes the one that keeps wrist joint 7
    inside its range, and keeps that choice until it gets there: a half-turn flip mid-carry swung bowls
    off their plates (LIBERO-Spatial 4, 6, 9)."""
    hand = expert.Hand(pointing_down_obs(0.0, 2.0))
    hand.yaw = -0.5  # turns the hand about its own (downward) z axis by +0.5: joint 7 to 2.5, inside
    assert hand.rotation_error()[2] == pytest.approx(-0.5, abs=1e-4)
    hand.see(pointing_down_obs(-0.45, 2.7))  # nearly there, joint 7 now past 2.6: it still finishes the turn
    assert hand.rotation_error()[2] == pytest.approx(-0.05, abs=1e-4)
    hand = expert.Hand(pointing_down_obs(0.0, -2.5))
    hand.yaw = 0.5  # the short way would take joint 7 to -3.0, past its stop: the other way round
    assert hand.rotation_error()[2] == pytest.approx(-(np.pi - 0.5), abs=1e-4)
