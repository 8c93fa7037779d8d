"""Tests for m2distill: each asserts a property that fails if the math or the protocol is wrong.

Run: python -m pytest -q test_m2distill.py
"""
import copy
import importlib.util
import json
import os
import time

import h5py
import numpy as np
import pytest
import torch

import data
import evaluate
import expert
import m2distill
import model
from m2distill import loss_extra, loss_image, loss_policy, loss_text

SUITE = "libero_object"
needs_simulator = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                     reason="the LIBERO simulator is not installed: pip install -r requirements.txt")


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
        data.write_synthetic_task(data.task_file(root, SUITE, t.name), t.language, n_demos=3, length=10, seed=k)
    return str(root)


def tiny_args(suite_dir, out, algo="m2distill", **kw):
    argv = ["--suite", SUITE, "--data-dir", suite_dir, "--out", str(out), "--algo", algo, "--n-tasks", "2",
            "--epochs", "1", "--batch-size", "8", "--n-demos", "2", "--val-demos", "1", "--img-size", "32",
            "--n-eval", "0", "--task-emb", "hash", "--device", "cpu"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return m2distill.parse_args(argv)


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
    y = model.augment(x, jitter=0.0, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x.flatten(1, 2), (4,) * 4, mode="replicate").unflatten(1, (4, 3))
    for b in range(3):  # each sample is one crop of its padded images, the same offset for all 4 images
        hits = [(i, j) for i in range(9) for j in range(9)
                if torch.allclose(y[b], padded[b, :, :, i:i + 16, j:j + 16], atol=1e-5)]
        assert len(hits) == 1
    obs = fake_obs(B=3, T=2, img=16)
    aug = model.augment_obs(obs, torch.Generator().manual_seed(2))
    assert aug["agentview_rgb"].dtype == torch.uint8 and aug["agentview_rgb"].shape == obs["agentview_rgb"].shape
    assert torch.equal(aug["joint_states"], obs["joint_states"])


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
    assert loss_policy(out, out_old, 10).item() != 0.0


def test_total_loss_switches_terms_off_with_zero_lambda(suite_dir, tmp_path):
    policy, obs, emb = model.ResNetT(32, img_size=32), fake_obs(), torch.randn(2, 32)
    old = m2distill.freeze(policy)
    with torch.no_grad():
        for prm in policy.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    batch = {"obs": obs, "actions": torch.rand(2, 10, 7) * 2 - 1, "task_emb": emb}
    args = tiny_args(suite_dir, tmp_path, lambda_text=0, lambda_policy=2.0)
    total, terms = m2distill.total_loss(outputs(policy, obs, emb), outputs(old, obs, emb), batch, args)
    assert set(terms) == {"bc", "image", "extra", "policy"}
    torch.testing.assert_close(total, sum(terms.values()))
    _, bc_only = m2distill.total_loss(outputs(policy, obs, emb), None, batch, args)
    assert set(bc_only) == {"bc"}


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


# ----------------------------------------------------------------------------- data and bad input
def test_synthetic_file_has_the_official_layout_and_a_missing_key_is_named(tmp_path):
    path = str(tmp_path / "t_demo.hdf5")
    data.write_synthetic_task(path, "do it", n_demos=2)
    with h5py.File(path) as f:
        assert data.check_layout(f, path) == ["demo_0", "demo_1"]
        assert json.loads(f["data"].attrs["problem_info"])["language_instruction"] == "do it"
    with h5py.File(path, "a") as f:
        del f["data/demo_1/obs/gripper_states"]
    with pytest.raises(ValueError, match="demo_1/obs/gripper_states"):
        data.SequenceDataset.from_hdf5(path, 0)


def test_missing_data_is_collected_by_the_expert_after_one_line(tmp_path, monkeypatch, capsys):
    bench, calls = data.suite_benchmark(SUITE), []

    def fake_collect(suite, data_dir, n, task_ids, seed=0):  # the real one runs the simulator (its own tests)
        calls.append((suite, n, list(task_ids)))
        for k in task_ids:
            t = bench.get_task(k)
            data.write_synthetic_task(data.task_file(data_dir, suite, t.name), t.language, n_demos=n, length=10)

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
    with pytest.raises(SystemExit, match="--n-demos"):
        m2distill.run(tiny_args(suite_dir, tmp_path / "o2", n_demos=3, val_demos=1))
    args = tiny_args(suite_dir, tmp_path / "o3")
    policy = model.ResNetT(32, img_size=32)
    batch = {"obs": fake_obs(), "actions": torch.full((2, 10, 7), float("nan")), "task_emb": torch.randn(2, 32)}
    with pytest.raises(FloatingPointError, match="--lr"):
        m2distill.train_step(policy, None, batch, torch.optim.AdamW(policy.parameters()), args)


def test_task_embeddings_are_deterministic_cached_and_distinct(tmp_path):
    langs = ["pick up the soup", "pick up the milk"]
    h = data.task_embeddings(langs, "hash", str(tmp_path))
    assert torch.equal(h, data.task_embeddings(langs, "hash")) and not torch.allclose(h[0], h[1])
    assert len(list(tmp_path.glob("task_emb_hash_*.pt"))) == 1
    assert torch.equal(data.task_embeddings(langs, "onehot"), torch.eye(2))
    m = data.task_embeddings(langs + ["pick up the soup please"], "minilm")
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


def test_loop_keeps_the_best_checkpoint_and_fills_the_matrix(suite_dir, tmp_path):
    """Rollouts at epochs 0, 1, 2 score 0, .5, .25: epoch 1's weights are kept, FWT_k holds .5 after it."""
    scores, states = iter([0.0, 0.5, 0.25, 0.5, 0.0, 0.5, 0.25, 0.4, 0.3]), []

    def fake_rollouts(policy, ids):
        states.append(copy.deepcopy(policy.state_dict()))
        return {i: next(scores) for i in ids}

    res = m2distill.run(tiny_args(suite_dir, tmp_path, epochs=2, eval_every=1), evaluate=fake_rollouts)
    assert res["curves"] == [[0.0, 0.5, 0.25], [0.0, 0.5, 0.25]]
    assert res["fwt_k"] == [pytest.approx(1 / 3)] * 2  # (0 + .5 + .5) / 3, held at the best
    assert res["success"] == [[0.5], [0.4, 0.3]]
    kept = torch.load(tmp_path / "task0.pt")["state_dict"]
    assert all(torch.equal(v, states[1][k]) for k, v in kept.items())  # epoch 1, not the last epoch
    assert res["metrics"] == evaluate.lifelong_metrics(res["success"], res["fwt_k"])
    assert res["metrics"]["nbt"] == pytest.approx(0.1)
    assert json.load(open(tmp_path / "results.json"))["metrics"] == res["metrics"]
    assert open(tmp_path / "success.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


class FakeEnv:
    """A stand-in simulator for the worker tests: init state 1 crashes its process once, 2 hangs."""

    def __init__(self):
        self.t = 0

    def set_init_state(self, s):
        marker = os.environ["M2D_CRASH_MARKER"]
        if s == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        if s == 2:
            time.sleep(3600)
        return self.obs()

    def step(self, action):
        self.t += 1
        return self.obs(), 0.0, self.t >= evaluate.N_SETTLE + 3, {}

    def obs(self):
        img = np.zeros((32, 32, 3), np.uint8)
        return {"agentview_image": img, "robot0_eye_in_hand_image": img, "robot0_joint_pos": np.zeros(7),
                "robot0_gripper_qpos": np.zeros(2)}

    def reset(self):
        self.t = 0

    def close(self):
        pass


def fake_env_fn(suite, task):
    return FakeEnv(), np.arange(4)


def test_a_crashed_or_hung_worker_is_restarted_and_the_run_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_CRASH_MARKER", str(tmp_path / "crashed"))
    ev = evaluate.Evaluator(SUITE, n_eval=4, max_steps=10, workers=2, episode_timeout=8, env_fn=fake_env_fn)
    try:
        rates = ev(model.ResNetT(d_lang=8, img_size=32), [0], torch.randn(1, 8))
    finally:
        ev.close()
    assert rates == {0: 0.75}  # episode 1 crashed once and succeeded on retry; episode 2 hung twice
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
    """reset, set_init_state(init_state), step the recorded actions: the task's success check fires.
    Only noise-free demos replay by their actions (DART demos record the clean, not the executed, ones)."""
    _, path = collected
    with h5py.File(path, "r") as f:
        assert "dart_noise" not in json.loads(f["data"].attrs["env_args"])
        init_state, actions, states = f["data/demo_0"].attrs["init_state"], f["data/demo_0/actions"][()], \
            f["data/demo_0/states"][()]
    env = expert.make_env(data.suite_benchmark(SUITE).get_task(0), cameras=False)
    try:
        env.reset()
        env.set_init_state(init_state)
        done_at = None
        for t, a in enumerate(actions):
            if t == 1:  # the replay follows the recorded states
                assert np.abs(env.get_sim_state() - states[1]).max() < 1e-3
            _, _, done, _ = env.step(a)
            if done:
                done_at = t
                break
    finally:
        env.close()
    assert done_at is not None and done_at >= len(actions) - 5


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
def test_collect_resumes_from_partial_demos(collected, tmp_path):
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
NEW_BEHAVIOURS = {0: "drawer", 5: "plate into a table region", 7: "knob", 9: "rack"}  # LIBERO-Goal task ids


@pytest.fixture(scope="module")
def goal_demos(tmp_path_factory):
    """One real expert demo of each new LIBERO-Goal behaviour, collected at 32 px: {task_id: hdf5 path}."""
    root = tmp_path_factory.mktemp("goal_data")
    tasks = sorted(NEW_BEHAVIOURS)
    return dict(zip(tasks, expert.collect("libero_goal", str(root), 1, task_ids=tasks, seed=0, img_size=32)))


@needs_simulator
@pytest.mark.parametrize("task_id", sorted(NEW_BEHAVIOURS))
def test_new_behaviour_demo_replays_to_success_in_libero_convention(goal_demos, task_id):
    """A collected demo of each new behaviour, replayed by its actions from its init state, gets the env's
    success; its actions are OSC deltas in [-1, 1] with the gripper exactly +-1 and no idle stretch."""
    with h5py.File(goal_demos[task_id], "r") as f:
        init_state, actions = f["data/demo_0"].attrs["init_state"], f["data/demo_0/actions"][()]
    assert np.abs(actions).max() <= 1.0 and set(np.unique(actions[:, 6])) <= {-1.0, 1.0}
    assert longest_idle_run(actions) <= 2
    env = expert.make_env(data.suite_benchmark("libero_goal").get_task(task_id), cameras=False)
    try:
        env.reset()
        env.set_init_state(init_state)
        done_at = None
        for t, a in enumerate(actions):
            if env.step(a)[2]:
                done_at = t
                break
    finally:
        env.close()
    assert done_at is not None and done_at >= len(actions) - 5, NEW_BEHAVIOURS[task_id]


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
