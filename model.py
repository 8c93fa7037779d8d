"""model.py: ResNet-T, LIBERO's BCTransformerPolicy written out in one file (SPEC.md section 2).

Per timestep t the policy makes 5 tokens of size E=64, in this order: [text, joint, gripper, agentview,
eye_in_hand]; a block-causal temporal transformer mixes the tokens of steps <= t, and a GMM head reads the text
token of each step. One forward pass returns the GMM parameters *and* every latent that M2Distill distils."""
import math
import os
import pickle
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ACTION_DIM, CAMERAS, LOW_DIM


# ----------------------------------------------------------------------------- the GMM policy
def gmm_log_prob(means, stds, logits, a):
    """log pi(a|s) of a mixture of M diagonal Gaussians over the D-d action:

        log pi(a|s) = logsumexp_m [ log w_m + sum_j log N(a_j; mu_mj, sigma_mj) ],  w = softmax(logits)

    means, stds (..., M, D), logits (..., M), a (..., D) -> (...)"""
    log_w = torch.log_softmax(logits, -1)  # (..., M)
    z = (a.unsqueeze(-2) - means) / stds  # (..., M, D)
    log_n = (-0.5 * z.pow(2) - stds.log() - 0.5 * math.log(2 * math.pi)).sum(-1)  # (..., M)
    return torch.logsumexp(log_w + log_n, -1)


def gmm_sample(means, stds, logits, n, generator=None):
    """n samples a ~ pi(.|s): pick a mode m ~ Categorical(w), then a = mu_m + sigma_m * eps.

    means, stds (..., M, D), logits (..., M) -> (n, ..., D)"""
    probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])  # (S, M), S = prod(...)
    m = torch.multinomial(probs, n, replacement=True, generator=generator).T  # (n, S)
    m = m.reshape(n, *logits.shape[:-1], 1, 1).expand(n, *means.shape[:-2], 1, means.shape[-1])  # (n, ..., 1, D)
    mu = means.expand(n, *means.shape).gather(-2, m).squeeze(-2)  # (n, ..., D)
    sigma = stds.expand(n, *stds.shape).gather(-2, m).squeeze(-2)  # (n, ..., D)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + sigma * eps


class GMMHead(nn.Module):
    """MLP 64 -> 1024 -> 1024 -> 1024, then mean = tanh(.), std = softplus(.) + 1e-4, 5 mixture logits. With
    `low_eval_noise` (LIBERO's option, off by default; libero/lifelong/models/policy_head.py) every std is the
    minimum (1e-4) in eval mode: a sample is the mean of the mode drawn from the mixture weights (training as ever)."""

    def __init__(self, d_in=64, hidden=1024, modes=5, d_act=ACTION_DIM, min_std=1e-4, low_eval_noise=False):
        super().__init__()
        self.modes, self.d_act, self.min_std, self.low_eval_noise = modes, d_act, min_std, low_eval_noise
        self.share = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden))
        self.mean, self.std = nn.Linear(hidden, d_act * modes), nn.Linear(hidden, d_act * modes)
        self.logits = nn.Linear(hidden, modes)

    def forward(self, x):  # x (..., 64)
        h = self.share(x)
        means = torch.tanh(self.mean(h)).unflatten(-1, (self.modes, self.d_act))  # (..., M, D)
        stds = (F.softplus(self.std(h)) + self.min_std).unflatten(-1, (self.modes, self.d_act))  # (..., M, D)
        if self.low_eval_noise and not self.training:
            stds = torch.full_like(means, self.min_std)
        return means, stds, self.logits(h)  # logits (..., M)


# ----------------------------------------------------------------------------- image encoder
class BasicBlock(nn.Module):
    """ResNet-18's BasicBlock: two 3x3 convs with batch norm and a (projected) skip."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + skip)


class FiLMResNetEncoder(nn.Module):
    """ResNet-18 through layer2 (not pretrained), FiLM on the task embedding after each BasicBlock,
    spatial softmax over 32 keypoints, Linear(64 -> E). (N, 3, H, W) in [0, 1] -> (N, E).
    LIBERO: modules/rgb_modules.py ResnetEncoder + SpatialProjection (keypoints in its order)."""

    def __init__(self, d_lang, img_size=128, d_out=64, n_kp=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.ModuleList([BasicBlock(64, 64), BasicBlock(64, 64), BasicBlock(64, 128, 2),
                                     BasicBlock(128, 128)])
        self.film = nn.ModuleList([nn.Linear(d_lang, 2 * b.conv2.out_channels) for b in self.blocks])
        self.keypoints = nn.Conv2d(128, n_kp, 1)
        s = img_size // 8  # feature map side after the stride-2 conv, maxpool and layer2
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        # LIBERO's SpatialSoftmax order (its pos_x, pos_y): the coordinate along the rows, then along the columns
        self.register_buffer("pos", torch.stack([rows.flatten(), cols.flatten()]), persistent=False)  # (2, s*s)
        self.proj = nn.Linear(2 * n_kp, d_out)

    def forward(self, x, lang):  # x (N, 3, H, W), lang (N, d_lang)
        h = self.stem(x)
        for block, film in zip(self.blocks, self.film):
            h = block(h)
            beta, gamma = film(lang)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
            h = (1 + gamma) * h + beta  # FiLM
        attention = self.keypoints(h).flatten(2).softmax(-1)  # (N, K, s*s)
        kp = torch.einsum("nks,cs->nck", attention, self.pos).flatten(1)  # (N, 2K): all rows, then all columns
        return self.proj(kp)


@torch.no_grad()
def fold_batchnorm(policy):
    """Fold each BatchNorm of the policy's image encoders into the conv before it: the same function, one pass less
    over every feature map (~10-25% of a CPU forward). Inference only (pi_old, rollouts; no batch stats): eval mode."""
    fuse = nn.utils.fusion.fuse_conv_bn_eval
    for encoder in policy.eval().image_encoders.values():
        encoder.stem = nn.Sequential(fuse(encoder.stem[0], encoder.stem[1]), *encoder.stem[2:])
        for b in encoder.blocks:
            b.conv1, b.bn1 = fuse(b.conv1, b.bn1), nn.Identity()
            b.conv2, b.bn2 = fuse(b.conv2, b.bn2), nn.Identity()
            if b.downsample is not None:
                b.downsample = fuse(*b.downsample)
    return policy


# ----------------------------------------------------------------------------- augmentation
def _rgb_to_hsv(x):  # (..., 3, H, W) in [0, 1]
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    c = v - x.min(-3).values
    s = c / v.clamp_min(1e-8)
    cs = c.clamp_min(1e-8)
    h = torch.where(v == r, ((g - b) / cs) % 6, torch.where(v == g, (b - r) / cs + 2, (r - g) / cs + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, v], -3)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(-3)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1) + h.unsqueeze(-3) * 6) % 6  # (..., 3, H, W)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * (torch.minimum(k, 4 - k).clamp(0, 1))


def augment_obs(obs, generator=None):
    """LIBERO's training augmentation of a batch's images, done once per batch so that the policy and
    the old model see the same pixels. uint8 (B, T, H, W, 3) per camera in, the same out."""
    imgs = torch.stack([obs[c] for c in CAMERAS], 1)  # (B, 2, T, H, W, 3)
    x = imgs.flatten(1, 2).permute(0, 1, 4, 2, 3).float().div(255)  # (B, 2T, 3, H, W)
    y = augment(x, generator=generator).mul(255).round().to(torch.uint8)
    y = y.permute(0, 1, 3, 4, 2).unflatten(1, imgs.shape[1:3])  # (B, 2, T, H, W, 3)
    return {**obs, **{c: y[:, i] for i, c in enumerate(CAMERAS)}}


def augment(x, jitter=0.3, p_jitter=0.9, pad=None, generator=None):
    """LIBERO's training augmentation on images (B, V, 3, H, W) in [0, 1], V = cameras x timesteps: colour jitter
    (brightness, contrast, saturation, hue, each +-0.3) with probability 0.9, then a random shift (replicate-pad
    `pad` px, random HxW crop). One draw per sample, shared by all V images. LIBERO's TranslationAug (libero/lifelong/
    models/modules/data_augmentation.py, translation 8) pads 4 px at 128 px, a shift of up to 1/32 of the image:
    `pad` defaults to that fraction of H (1 px at 32, 2 at 64, 4 at 128). The jitters act per pixel or on image
    means: their strength does not depend on the size (torchvision draws the jitters' order; here it is fixed)."""
    B, V, C, H, W = x.shape
    pad = max(1, round(H / 32)) if pad is None else pad
    u = lambda: (torch.rand(B, 1, 1, 1, 1, generator=generator) * 2 - 1) * jitter  # (B, 1, 1, 1, 1)
    on = (torch.rand(B, 1, 1, 1, 1, generator=generator) < p_jitter).float()
    gray = lambda y: (0.299 * y[:, :, :1] + 0.587 * y[:, :, 1:2] + 0.114 * y[:, :, 2:])  # (B, V, 1, H, W)
    y = (x * (1 + u() * on)).clamp(0, 1)  # brightness
    m = gray(y).mean((-3, -2, -1), keepdim=True)
    y = (m + (1 + u() * on) * (y - m)).clamp(0, 1)  # contrast
    g = gray(y)
    y = (g + (1 + u() * on) * (y - g)).clamp(0, 1)  # saturation
    hsv = _rgb_to_hsv(y)
    y = _hsv_to_rgb(torch.cat([(hsv[:, :, :1] + u() * on) % 1.0, hsv[:, :, 1:]], 2))  # hue
    y = F.pad(y.flatten(1, 2), (pad,) * 4, mode="replicate")  # (B, V*3, H+2p, W+2p)
    oy, ox = (torch.randint(0, 2 * pad + 1, (2, B), generator=generator))
    rows = (oy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    y = y[torch.arange(B)[:, None, None, None], torch.arange(V * C)[None, :, None, None], rows, cols]
    return y.unflatten(1, (V, C))  # (B, V, 3, H, W)


# ----------------------------------------------------------------------------- temporal transformer
def sinusoidal(T, E, inv_freq_factor=10.0):
    """LIBERO's temporal encoding: (T, E), [sin(t w_i), cos(t w_i)], w_i = factor^(-2i/E)."""
    w = 1.0 / inv_freq_factor ** (torch.arange(0, E, 2).float() / E)  # (E/2,)
    tw = torch.arange(T).float()[:, None] * w  # (T, E/2)
    return torch.cat([tw.sin(), tw.cos()], -1)


def block_causal_mask(T, n_tokens):
    """(T*n, T*n) boolean, True = may attend: a token sees every token of its own and earlier steps."""
    step = torch.arange(T).repeat_interleave(n_tokens)  # (T*n,)
    return step[None, :] <= step[:, None]


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer: 6 heads of size 64 (qkv without bias), MLP 64 -> 256 -> 64 with GELU,
    dropout 0.1, and stochastic depth 0.1 on the MLP branch (LIBERO's TransformerDecoder)."""

    def __init__(self, E=64, heads=6, head_size=64, mlp=256, dropout=0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.qkv = nn.Linear(E, 3 * heads * head_size, bias=False)
        self.out = nn.Linear(heads * head_size, E)
        self.mlp = nn.Sequential(nn.Linear(E, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, E),
                                 nn.Dropout(dropout))

    def forward(self, x, mask):  # x (B, N, E), mask (N, N)
        q, k, v = self.qkv(self.ln1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, h, N, 64)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, 64)
        x = x + F.dropout(self.out(a.transpose(1, 2).flatten(2)), self.dropout, self.training)
        h = self.mlp(self.ln2(x))
        if self.training and self.dropout > 0:  # stochastic depth: drop the whole branch per sample
            keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.dropout
            h = h * keep / (1 - self.dropout)
        return x + h


# ----------------------------------------------------------------------------- the policy
class ResNetT(nn.Module):
    """ResNet-T (LIBERO's BCTransformerPolicy). `ResNetT(**policy.config)` rebuilds a policy."""

    def __init__(self, d_lang, img_size=128, seq_len=10, E=64, layers=4, modes=5):
        super().__init__()
        self.config = dict(d_lang=d_lang, img_size=img_size, seq_len=seq_len, E=E, layers=layers, modes=modes)
        self.image_encoders = nn.ModuleDict({c: FiLMResNetEncoder(d_lang, img_size, E) for c in CAMERAS})
        self.language_encoder = nn.Linear(d_lang, E)
        self.extra_encoders = nn.ModuleDict({k: nn.Linear(d, E) for k, d in LOW_DIM.items()})
        self.layers = nn.ModuleList([TransformerLayer(E) for _ in range(layers)])
        self.head = GMMHead(E, modes=modes)
        self.register_buffer("pos", sinusoidal(seq_len, E), persistent=False)  # (T_max, E)
        self.queue = []

    def spatial_encode(self, obs, task_emb):
        """obs: uint8 images (B, T, H, W, 3) and floats (B, T, d) -> tokens (B, T, 5, E) and the latents."""
        B, T = obs[CAMERAS[0]].shape[:2]
        lang = task_emb[:, None].expand(B, T, -1).flatten(0, 1)  # (B*T, d_lang) for FiLM
        lat = {"text": self.language_encoder(task_emb)}  # (B, E)
        lat.update({k: enc(obs[k]) for k, enc in self.extra_encoders.items()})  # (B, T, E) each
        for c, enc in self.image_encoders.items():
            x = obs[c].flatten(0, 1).permute(0, 3, 1, 2).float().div(255)  # (B*T, 3, H, W), channels_last
            lat[c] = enc(x, lang).view(B, T, -1)  # (B, T, E)
        tokens = [lat["text"][:, None].expand(B, T, -1)] + [lat[k] for k in (*LOW_DIM, *CAMERAS)]
        return torch.stack(tokens, 2), lat  # (B, T, 5, E)

    def temporal_encode(self, tokens):
        """(B, T, n, E) -> the text token of each step after the block-causal transformer, (B, T, E)."""
        B, T, n, E = tokens.shape
        x = (tokens + self.pos[:T, None]).flatten(1, 2)  # (B, T*n, E)
        mask = block_causal_mask(T, n).to(x.device)
        for layer in self.layers:
            x = layer(x, mask)
        return x.view(B, T, n, E)[:, :, 0]

    def forward(self, obs, task_emb):
        """One pass: GMM parameters at every step and every distilled latent: dict(means (B,T,M,7), stds (B,T,M,7),
        logits (B,T,M), text (B,E), joint_states/gripper_states/agentview_rgb/eye_in_hand_rgb (B,T,E))."""
        tokens, lat = self.spatial_encode(obs, task_emb)
        means, stds, logits = self.head(self.temporal_encode(tokens))
        return dict(means=means, stds=stds, logits=logits, **lat)

    def reset(self):
        self.queue = []

    @torch.no_grad()
    def get_action(self, obs, task_emb):
        """One env step: obs with dataset keys, images uint8 (B, H, W, 3), floats (B, d); -> actions (B, 7).
        Keeps the tokens of the last `seq_len` steps and samples from the GMM at the newest one."""
        self.eval()
        tokens, _ = self.spatial_encode({k: v[:, None] for k, v in obs.items()}, task_emb)  # (B, 1, 5, E)
        self.queue = (self.queue + [tokens])[-self.config["seq_len"]:]
        x = self.temporal_encode(torch.cat(self.queue, 1))[:, -1]  # (B, E)
        return gmm_sample(*self.head(x), 1)[0].clamp(-1, 1).cpu().numpy()  # (B, 7)


# ----------------------------------------------------------------------------- checkpoints
CKPT_FORMAT = 2  # 2: keypoints in LIBERO's order; a checkpoint without "format" had them [columns, rows]

_nth = lambda names, m: dict(enumerate(names)).get(int(m[1]), m[1])  # an index past the end stays (unmatched)
# LIBERO's BCTransformerPolicy parameter names -> ResNetT's, applied in order (libero/lifelong/models/
# bc_transformer_policy.py, policy_head.py, modules/{rgb,language,transformer}_modules.py). encoders.0 = agentview.
LIBERO_NAMES = [
    (r"^encoders\.(\d+)\.", lambda m: f"image_encoders.{_nth(CAMERAS, m)}."),
    (r"\.resnet18_base\.", ".stem."),
    (r"\.block_(\d)\.", lambda m: f".blocks.{int(m[1]) - 1}."),
    (r"\.lang_proj(\d)\.", lambda m: f".film.{int(m[1]) - 1}."),
    (r"\.projection_layer\.spatial_softmax\._spatial_conv\.", ".keypoints."),
    (r"\.projection_layer\.projection\.", ".proj."),
    (r"^language_encoder\.projection\.0\.", "language_encoder."),
    (r"^extra_encoder\.encoders\.(\d+)\.0\.", lambda m: f"extra_encoders.{_nth(LOW_DIM, m)}."),
    (r"^temporal_transformer\.layers\.(\d+)\.0\.norm\.", r"layers.\1.ln1."),
    (r"^temporal_transformer\.layers\.(\d+)\.1\.qkv\.", r"layers.\1.qkv."),
    (r"^temporal_transformer\.layers\.(\d+)\.1\.output_layer\.0\.", r"layers.\1.out."),
    (r"^temporal_transformer\.layers\.(\d+)\.2\.norm\.", r"layers.\1.ln2."),
    (r"^temporal_transformer\.layers\.(\d+)\.3\.net\.", r"layers.\1.mlp."),
    (r"^policy_head\.share\.", "head.share."),
    (r"^policy_head\.(mean|logstd|logits)_layer\.", lambda m: f"head.{dict(logstd='std').get(m[1], m[1])}."),
]


def libero_name(k):
    """ResNetT's name for LIBERO's parameter name `k` (LIBERO_NAMES); an unknown name comes back unmapped."""
    for pattern, repl in LIBERO_NAMES:
        k = re.sub(pattern, repl, k)
    return k


def rename_libero(sd, policy):
    """A dict keyed by LIBERO's BCTransformerPolicy names (its state_dict, or gradients) -> (ResNetT's names, problems).

    LIBERO registers its last proprio MLP twice (`extra_encoder.proprio_mlp.*` is `extra_encoder.encoders.1.*`), and
    holds constants ResNetT computes (spatial-softmax grids `pos_x` / `pos_y`, the temporal encoding's `inv_freq`):
    these are dropped, and each that is not equal to its twin or to `policy`'s value is a problem (a string)."""
    twin, out, problems = f"extra_encoder.encoders.{len(LOW_DIM) - 1}.", {}, []  # the twin of proprio_mlp
    pos, step1 = next(iter(policy.image_encoders.values())).pos, policy.pos[1]  # (2, s*s), [sin w, cos w] (E,)
    for k, v in sd.items():
        grid = re.fullmatch(r"encoders\.\d+\.projection_layer\.spatial_softmax\.pos_([xy])", k)
        same = k.replace("extra_encoder.proprio_mlp.", twin)
        if same != k and same in sd:
            if not torch.equal(v, sd[same]):
                problems.append(f"{k} differs from its twin {same}")
        elif grid:  # LIBERO's pos_x: the coordinate along the rows of the s x s feature map (pos_y: the columns)
            if v.shape != (1, pos.shape[1]) or not torch.allclose(v.to(pos), pos["xy".index(grid[1])]):
                problems.append(f"{k} {tuple(v.shape)} is the grid of {8 * math.isqrt(v.numel())} px images, "
                                f"this policy takes {policy.config['img_size']} px (--img-size)")
        elif k == "temporal_position_encoding_fn.inv_freq":
            if v.shape != (len(step1) // 2,) or not torch.allclose(torch.cat([v.sin(), v.cos()]).to(step1), step1):
                problems.append(f"{k} is not LIBERO's default (inv_freq_factor 10)")
        else:
            out[libero_name(k)] = v
    return out, problems


def check_fits(policy, sd, what, names=None, problems=()):
    """ValueError, one line: `what` does not fit `policy`, naming every key of `sd` it lacks ('unmatched'), every key
    it needs that `sd` lacks ('missing'), every one of another shape ('mis-shaped'), shown as `names` maps them, then
    `problems`. Returns nothing when `policy.load_state_dict(sd)` would succeed."""
    own, name = policy.state_dict(), lambda k: (names or {}).get(k, k)
    problems = ([f"mis-shaped {name(k)} {tuple(getattr(v, 'shape', ()))} (ResNetT: {tuple(own[k].shape)})"
                 for k, v in sd.items() if k in own and getattr(v, "shape", None) != own[k].shape]
                + [f"unmatched {name(k)}" for k in sd if k not in own] + [f"missing {k}" for k in own if k not in sd]
                + list(problems))
    if problems:
        config = ", ".join(f"{k}={v}" for k, v in policy.config.items())
        raise ValueError(f"{what} does not fit ResNetT({config}): " + "; ".join(problems))


def load_libero_state_dict(policy, sd, what="LIBERO state_dict"):
    """Load LIBERO's BCTransformerPolicy weights (its `state_dict()`, default bc_transformer_policy config) into
    `policy`, a ResNetT of the same task-embedding (LIBERO's: bert-base-cased, 768) and image size: it then computes
    LIBERO's function (tested against LIBERO's outputs). Returns the policy. ValueError, one line naming every
    unmatched, mis-shaped or unequal key (LIBERO's names) and every missing one (ResNetT's); `what` names the source."""
    renamed, problems = rename_libero(sd, policy)
    check_fits(policy, renamed, what, {libero_name(k): k for k in sd}, problems)
    policy.load_state_dict(renamed)
    return policy


def read_checkpoint(path, map_location="cpu", libero=False,
                    fix="pass a task<k>.pt that m2distill.py wrote in its --out"):
    """Read and check a checkpoint, its tensors on `map_location` (a run trained on a GPU reads on a CPU-only machine).

    Ours, m2distill.py's task<k>.pt: dict(config, state_dict, task_embs (n_tasks, d_lang), task k, suite, algo, format),
    returned once the state_dict fits ResNetT(**config), one older than format 2 with its keypoint projections' inputs
    reordered (LIBERO's keypoint order). With libero=True, LIBERO's own file (lifelong/utils.py torch_save_model:
    dict(state_dict, cfg, previous_masks), or a bare state_dict) comes back as dict(libero_state_dict=...).
    weights_only=True (LIBERO's easydict cfg reads as OrderedDicts). FileNotFoundError/ValueError: the file, `fix`."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
        raise ValueError(f"{path} is a directory; {fix} ({', '.join(found) or 'none here'}).")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; {fix}.")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals([(OrderedDict, n) for n in names]):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a file that is not a torch checkpoint raises anything: KeyError, EOFError, RuntimeError
        with open(path, "rb") as f:
            what = {b"PK\x03\x04": "a truncated or damaged torch file", b"\x89HDF": "an HDF5 file"}.get(f.read(4))
        raise ValueError(f"{path} is {what or 'not a torch checkpoint'} ({type(e).__name__}); {fix}.") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint; {fix}.")
    sd = ckpt.get("state_dict", ckpt)
    if "config" not in ckpt and isinstance(sd, dict) and "policy_head.logits_layer.bias" in sd:  # LIBERO's
        if libero:
            return {"libero_state_dict": sd}
        raise ValueError(f"{path} is LIBERO's checkpoint (no task embeddings); start a run from it: m2distill.py "
                         f"--init-from {path}.")
    lacks = [k for k, t in [("config", dict), ("state_dict", dict), ("task_embs", torch.Tensor), ("task", int)]
             if not isinstance(ckpt.get(k), t)]
    if lacks:
        raise ValueError(f"{path} lacks {', '.join(lacks)} (or holds them of other types); {fix}.")
    try:
        with torch.device("meta"):
            policy = ResNetT(**ckpt["config"])
    except TypeError as e:
        raise ValueError(f"{path}: its config does not build a ResNetT ({e}); {fix}.") from None
    check_fits(policy, sd, path)
    embs, k = ckpt["task_embs"], ckpt["task"]
    if not (embs.shape[1:] == (policy.config["d_lang"],) and 0 <= k < len(embs)):
        raise ValueError(f"{path}: task_embs {tuple(embs.shape)} and task {k} do not fit d_lang "
                         f"{policy.config['d_lang']} (want (n_tasks, d_lang) and 0 <= task < n_tasks); {fix}.")
    if ckpt.get("format", 1) < 2:  # keypoints were [columns, rows]: swap the two halves of the projection's inputs
        for k in (f"image_encoders.{c}.proj.weight" for c in CAMERAS):
            sd[k] = sd[k].roll(sd[k].shape[1] // 2, 1)
    return ckpt


def init_from(policy, path):
    """Initialise `policy` (a ResNetT) from LIBERO's BCTransformerPolicy checkpoint (`load_libero_state_dict`) or from
    one of ours (a task<k>.pt of the same config). The task-embedding size must match (LIBERO's: bert, 768).
    Raises FileNotFoundError or ValueError, one line naming the file and the fix. Returns the policy."""
    ckpt = read_checkpoint(path, next(policy.parameters()).device, libero=True,
                           fix="pass LIBERO's BCTransformerPolicy checkpoint or a task<k>.pt of m2distill.py")
    sd = ckpt.get("libero_state_dict")
    lang = ckpt["task_embs"] if sd is None else sd.get("language_encoder.projection.0.weight", torch.zeros(0))
    if lang.numel() and lang.shape[-1] != policy.config["d_lang"]:
        raise ValueError(f"{path} takes {lang.shape[-1]}-d task embeddings, this run's are "
                         f"{policy.config['d_lang']}-d; pass the --task-emb it was trained with (LIBERO's: bert, "
                         "768-d, with bert-base-cased on disk).")
    if sd is not None:
        return load_libero_state_dict(policy, sd, path)
    diff = [f"{k} {v} (this run: {policy.config[k]})" for k, v in ckpt["config"].items() if policy.config.get(k) != v]
    if diff:
        raise ValueError(f"{path} was trained with {', '.join(diff)}; pass the same flags (e.g. --img-size).")
    policy.load_state_dict(ckpt["state_dict"])
    return policy
