"""Diffusion backbones: the DiT family (Peebles & Xie) and the plain ViT used by Min-SNR-γ (Hang et al.).

DiT is state-dict compatible with the official facebookresearch/DiT checkpoints (same keys, shapes and
numerics; e.g. DiT-XL/2-256 loads with `model.load_state_dict(torch.load("DiT-XL-2-256x256.pt"))`).
The ViT follows the Min-SNR-γ paper's backbone: time and class enter as two extra tokens in front of the
patch tokens; see the `ViT` class for the exact recipe and where it departs from the official code.

Every model has the same interface:
    model(x, t, y) -> out                  x [B, C, H, W], t LongTensor [B] of integer timesteps,
                                           y LongTensor [B] labels (num_classes = the null label);
                                           out [B, C * (2 if learn_sigma else 1), H, W]
    model.forward_with_cfg(x, t, y, cfg_scale, guide_channels=None)
    model.blocks                           nn.ModuleList of transformer blocks
    model.gradient_checkpointing           bool switch (blocks run under activation checkpointing)
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


#################################################################################
#                        Layers shared by both families                         #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)                      # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)   # [B, T, D], tokens in row-major (h, w) order


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection -> scaled_dot_product_attention -> output projection."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        assert hidden_size % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)   # each [B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)      # [B, heads, N, D/heads]
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (DiT uses the tanh approximation of GELU, the Min-SNR ViT the exact one)."""

    def __init__(self, hidden_size, mlp_hidden_size, approximate):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size, bias=True)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with DiT's label dropout for classifier-free guidance.

    The table has num_classes + 1 rows; the last row (label == num_classes) is the null label that the
    unconditional half of classifier-free guidance uses. (Official DiT drops that row when
    class_dropout_prob == 0; we always keep it so every model can be guided and sampled the same way.)
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Denoiser(nn.Module):
    """What DiT and ViT share: the attributes other scripts read, the block loop, unpatchify and CFG."""

    def __init__(self, input_size, patch_size, in_channels, num_classes, learn_sigma):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.gradient_checkpointing = False

    def run_blocks(self, x, *cond):
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                # Recompute the block's activations in backward instead of storing them.
                x = checkpoint(block, x, *cond, use_reentrant=False)
            else:
                x = block(x, *cond)
        return x

    def unpatchify(self, x):
        """[B, T, p*p*C_out] -> [B, C_out, H, W]; each token holds its patch in (p, q, c) order."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """Classifier-free guided output for a plain batch of B inputs.

        Runs the B conditional rows and the same B rows with the null label as one batch of 2B and returns
        uncond + cfg_scale * (cond - uncond), shape [B, C_out, H, W]. Guidance applies to the first
        `guide_channels` channels (None = all C prediction channels; 3 = official DiT's behaviour, which
        guides only 3 of the 4 latent channels); the remaining channels, including the learned-variance
        channels when learn_sigma, come from the conditional half.

        Unlike official DiT, whose forward_with_cfg takes an already doubled batch [x; x] with labels
        [y; null] and returns a doubled batch, this takes and returns the plain batch. Call it in eval
        mode: in training mode label dropout would also hit the conditional half.
        """
        g = self.in_channels if guide_channels is None else guide_channels
        if not 0 < g <= self.in_channels:
            raise ValueError(f"guide_channels must be in 1..{self.in_channels}, got {guide_channels}")
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # [2B, C_out, H, W]
        cond, uncond = out.chunk(2)
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


#################################################################################
#                                      DiT                                      #
#################################################################################

def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)] of timesteps t [B], f_i = max_period^(-i/(dim/2)).

    Computed in float32 whatever the module's dtype: under FSDP mixed precision or bf16 weights a
    float timestep would be rounded to bf16 (t = 999 becomes 1000), so t arrives as an integer tensor
    and is cast here.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                 # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Integer timesteps -> 256-dim sinusoidal embedding -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def get_2d_sincos_pos_embed(hidden_size, grid_size):
    """Fixed 2-D sin-cos position embedding in MAE's layout, float64 numpy [grid_size**2, hidden_size].

    Token k = i * grid_size + j sits at row i, column j. Its first hidden_size/2 dims encode the column
    j and the last hidden_size/2 the row i (MAE's order, which the official checkpoints were trained
    with), each as [sin(pos * w), cos(pos * w)] with w_m = 10000^(-m / (hidden_size/4)).
    """
    assert hidden_size % 4 == 0, "hidden_size must be divisible by 4 for the 2-D sin-cos embedding"
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)    # [D/4]
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def embed_1d(pos):
        angles = np.outer(pos.reshape(-1).astype(np.float64), omega)          # [T, D/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)        # [T, D/2]

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)            # [T, D]


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its patch of output pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Denoiser):
    """Diffusion Transformer (Peebles & Xie, 2023), checkpoint-compatible with facebookresearch/DiT."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__(input_size, patch_size, in_channels, num_classes, learn_sigma)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # A Parameter (not a buffer) so that it is saved in the state dict, as in the official checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Same order of random draws as official DiT (apply() visits children first), so a given seed
        # gives the same initial weights.
        def linear_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(linear_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        # The patch embedding is initialised like a Linear over the flattened patch (bias keeps
        # PyTorch's default, as in DiT).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model outputs exactly 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed      # [B, T, D], T = H * W / p**2
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        x = self.run_blocks(x, c)                    # [B, T, D]
        x = self.final_layer(x, c)                   # [B, T, p * p * C_out]
        return self.unpatchify(x)                    # [B, C_out, H, W]


#################################################################################
#                                   DiT configs                                 #
#################################################################################
# (depth, hidden_size, num_heads). S/B/L/XL are the official ones; Ti is ours, small enough to train
# on a laptop CPU at 32x32 pixels (head width 64 like the others), and Mi (half Ti's width, 1.9 M
# parameters at 16x16 pixels) is the quickstart's: 2.7x Ti's training images/s at 16 px (README).
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "Ti": (6, 256, 4),
             "Mi": (6, 128, 2)}


def _config(cls, depth, hidden_size, num_heads, patch_size):
    """A constructor for one named size: build(**kwargs) -> cls(..., **kwargs), like DiT's DiT_XL_2()."""
    def build(**kwargs):
        return cls(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)
    return build


DiT_models = {
    f"DiT-{size}/{p}": _config(DiT, *DIT_SIZES[size], p)
    for size in DIT_SIZES for p in (2, 4, 8)
}


#################################################################################
#                       ViT (the Min-SNR-γ paper's backbone)                    #
#################################################################################

class ViTBlock(nn.Module):
    """Plain pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="none")

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ViT(Denoiser):
    """The plain ViT that Min-SNR-γ trains (official code: guided_diffusion/vision_transformer.py).

    Recipe, as in the official code: the timestep and the class label each become one token (learned
    lookup tables) placed in front of the patch tokens, [t, y, patches]; a learned absolute position
    embedding covers all 2 + T tokens; pre-norm blocks (LayerNorm eps 1e-6 with affine, exact GELU,
    qkv with bias); no long skip connections and no adaLN; no final LayerNorm (the official model's
    `norm` is an Identity with its default settings); a linear layer maps each patch token to its
    patch of output pixels. Initialisation as the official one: truncated-normal(0.02) linears and
    position embedding, attention/MLP output weights of block l scaled by 1/sqrt(2l), N(0, 1) time and
    class tables.

    Our departures: the output layer starts at exactly zero (official: 0.001 x truncated normal), so the
    model outputs 0 at init like DiT; the time table has `max_timesteps` rows (official: 4000, of which
    a 1000-step diffusion uses 1000); the qkv projection carries a key bias, which the official model
    leaves out but which cannot change the output (softmax is invariant to adding q.b_k to every logit
    of a row). `vit_state_dict_from_official` converts official checkpoints.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, max_timesteps=1000):
        super().__init__(input_size, patch_size, in_channels, num_classes, learn_sigma)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = nn.Embedding(max_timesteps, hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_patches, hidden_size))
        self.blocks = nn.ModuleList([ViTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels, bias=True)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Keep the residual stream's variance from growing with depth.
        for layer, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))
        nn.init.normal_(self.t_embedder.weight, std=1.0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=1.0)
        nn.init.zeros_(self.final_layer.weight)
        nn.init.zeros_(self.final_layer.bias)

    def forward(self, x, t, y):
        x = self.x_embedder(x)                                   # [B, T, D]
        cond = torch.stack([self.t_embedder(t), self.y_embedder(y)], dim=1)  # [B, 2, D]
        x = torch.cat([cond, x], dim=1) + self.pos_embed         # [B, 2 + T, D]
        x = self.run_blocks(x)
        x = self.final_layer(x[:, 2:])                           # [B, T, p * p * C_out]
        return self.unpatchify(x)                                # [B, C_out, H, W]


def vit_state_dict_from_official(official, max_timesteps=1000):
    """Official Min-SNR ViT checkpoint (e.g. ema_0.9999_xl.pt) -> state dict for our `ViT`.

    Only the renames and the qkv bias layout change: official q_bias and v_bias become one qkv bias
    with a zero key part, and the time table keeps its first `max_timesteps` rows.
    """
    renames = {"patch_embed.": "x_embedder.", "time_embedding.": "t_embedder.",
               "class_embedding.weight": "y_embedder.embedding_table.weight", "linear_projection.": "final_layer."}
    ours = {}
    for key, value in official.items():
        if key.endswith(".attn.q_bias"):
            v_bias = official[key.replace("q_bias", "v_bias")]
            ours[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        if key.endswith(".attn.v_bias"):
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        ours[key] = value
    ours["t_embedder.weight"] = ours["t_embedder.weight"][:max_timesteps]
    return ours


#################################################################################
#                                   ViT configs                                 #
#################################################################################
# (depth, hidden_size, num_heads). B, L and XL are the official runs' sizes (B: ImageNet-256 latents;
# L: depth 21 as in the official ImageNet-64 run; XL: depth 28, the FID 2.06 model); S and Ti as DiT's.
VIT_SIZES = {"XL": (28, 1152, 16), "L": (21, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "Ti": (6, 256, 4)}


ViT_models = {
    f"ViT-{size}/{p}": _config(ViT, *VIT_SIZES[size], p)
    for size in ("XL", "L", "B", "S", "Ti") for p in (2, 4)
}

ALL_MODELS = {**DiT_models, **ViT_models}
