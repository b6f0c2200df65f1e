import math

import numpy as np
import pytest
import torch

import models
from models import DiT, DiT_models, ViT, ViT_models, ALL_MODELS


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: extra intra-op threads only add overhead on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_models(in_channels=3, learn_sigma=False, **kwargs):
    """One tiny model per family: fast on a CPU, same code paths as the big ones."""
    common = dict(input_size=16, in_channels=in_channels, num_classes=10, learn_sigma=learn_sigma, **kwargs)
    return [
        DiT(patch_size=4, hidden_size=64, depth=2, num_heads=2, **common),
        ViT(patch_size=4, hidden_size=64, depth=2, num_heads=2, **common),
    ]


def randomize(model, seed=0):
    """Give every trainable weight a non-zero random value (zero-init models output exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(fan_in)))
    return model


def inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


# --------------------------------------------------------------------------------------------------
# DiT checkpoint compatibility: keys, shapes, parameter count (built on the meta device: no memory)
# --------------------------------------------------------------------------------------------------

def test_dit_xl2_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    D, p, T, C_out = 1152, 2, 256, 8
    expected = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, 4, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (p * p * C_out, D), "final_layer.linear.bias": (p * p * C_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(28):
        expected.update({
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D), f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        })
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert not model.pos_embed.requires_grad


# (depth, width, heads) per size, written out from the DiT paper (Table 1) and the Min-SNR/U-ViT ViTs,
# independently of models.py's tables; Ti and Mi are this repository's CPU sizes.
SIZES = {"DiT": {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "Ti": (6, 256, 4),
                 "Mi": (6, 128, 2)},
         "ViT": {"S": (12, 384, 6), "B": (12, 768, 12), "L": (21, 1024, 16), "XL": (28, 1152, 16), "Ti": (6, 256, 4)}}
PATCHES = {"DiT": (2, 4, 8), "ViT": (2, 4)}


@pytest.mark.parametrize("family", ["DiT", "ViT"])
def test_every_name_builds_the_model_it_names(family):
    """ALL_MODELS["DiT-XL/2"] etc.: the depth, width, heads and patch size the name stands for, and
    nothing else registered under the family's prefix."""
    names = {f"{family}-{size}/{p}" for size in SIZES[family] for p in PATCHES[family]}
    assert {n for n in ALL_MODELS if n.startswith(family + "-")} == names
    for size, (depth, width, heads) in SIZES[family].items():
        for p in PATCHES[family]:
            with torch.device("meta"):
                model = ALL_MODELS[f"{family}-{size}/{p}"](input_size=32, in_channels=4, num_classes=1000,
                                                           learn_sigma=True, class_dropout_prob=0.1)
            assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
            assert tuple(model.x_embedder.proj.weight.shape) == (width, 4, p, p)


# --------------------------------------------------------------------------------------------------
# ViT: the paper's backbone, and loading the official Min-SNR checkpoints
# --------------------------------------------------------------------------------------------------

def test_vit_configs_and_token_layout():
    assert {"ViT-S/2", "ViT-B/2", "ViT-L/2", "ViT-XL/2"} <= set(ViT_models)
    assert set(ViT_models) <= set(ALL_MODELS)
    with torch.device("meta"):
        model = ViT_models["ViT-B/2"](input_size=32, in_channels=4, num_classes=1000, learn_sigma=False)
    assert len(model.blocks) == 12
    assert model.pos_embed.shape == (1, 2 + 256, 768) and model.pos_embed.requires_grad   # learned, covers [t, y]
    assert model.t_embedder.weight.shape == (1000, 768)
    assert model.y_embedder.embedding_table.weight.shape == (1001, 768)
    assert model.final_layer.weight.shape == (2 * 2 * 4, 768)


def test_vit_converts_official_checkpoint_layout():
    D, nc = 64, 10
    model = ViT(input_size=16, patch_size=4, in_channels=3, hidden_size=D, depth=2, num_heads=2, num_classes=nc,
                learn_sigma=False)
    # The official model's state-dict layout (guided_diffusion/vision_transformer.py, default settings).
    official = {
        "pos_embed": torch.randn(1, 2 + 16, D),
        "patch_embed.proj.weight": torch.randn(D, 3, 4, 4), "patch_embed.proj.bias": torch.randn(D),
        "time_embedding.weight": torch.randn(4000, D), "class_embedding.weight": torch.randn(nc + 1, D),
        "linear_projection.weight": torch.randn(4 * 4 * 3, D), "linear_projection.bias": torch.randn(4 * 4 * 3),
    }
    for i in range(2):
        for name, shape in [("norm1.weight", (D,)), ("norm1.bias", (D,)), ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                            ("attn.qkv.weight", (3 * D, D)), ("attn.q_bias", (D,)), ("attn.v_bias", (D,)),
                            ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
                            ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)),
                            ("mlp.fc2.weight", (D, 4 * D)), ("mlp.fc2.bias", (D,))]:
            official[f"blocks.{i}.{name}"] = torch.randn(shape)
    model.load_state_dict(models.vit_state_dict_from_official(official))   # strict: every key maps
    qkv_bias = model.blocks[1].attn.qkv.bias.detach()
    torch.testing.assert_close(qkv_bias[:D], official["blocks.1.attn.q_bias"])
    assert torch.count_nonzero(qkv_bias[D:2 * D]) == 0
    torch.testing.assert_close(qkv_bias[2 * D:], official["blocks.1.attn.v_bias"])
    torch.testing.assert_close(model.t_embedder.weight.detach(), official["time_embedding.weight"][:1000])
    torch.testing.assert_close(model.final_layer.weight.detach(), official["linear_projection.weight"])


def test_key_bias_does_not_change_attention():
    # Why our fused qkv may carry the key bias that the official ViT leaves out.
    attn = randomize(models.Attention(32, num_heads=2))
    x = torch.randn(2, 5, 32)
    before = attn(x)
    with torch.no_grad():
        attn.qkv.bias[32:64].normal_()
    torch.testing.assert_close(attn(x), before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Closed-form pieces
# --------------------------------------------------------------------------------------------------

def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 17, 999])
    emb = models.timestep_embedding(t, 256).double()
    i = torch.arange(128, dtype=torch.float64)
    freqs = 10000.0 ** (-i / 128)
    args = t.double()[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    assert emb.shape == (4, 256)
    torch.testing.assert_close(emb, expected, atol=2e-4, rtol=0)   # float32 math, |args| <= 999


def test_timestep_embedding_is_float32_in_a_bf16_model():
    model = randomize(small_models()[0]).to(torch.bfloat16).eval()
    assert models.timestep_embedding(torch.tensor([999]), 256).dtype == torch.float32
    x, t, y = inputs(model)
    out = model(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_pos_embed_matches_formula_and_layout():
    D, G = 16, 3
    pe = models.get_2d_sincos_pos_embed(D, G)
    assert pe.shape == (G * G, D)
    for i in range(G):              # row
        for j in range(G):          # column
            for m in range(D // 4):
                w = 10000.0 ** (-m / (D // 4))
                k = i * G + j
                np.testing.assert_allclose(
                    pe[k, [m, D // 4 + m, D // 2 + m, 3 * D // 4 + m]],
                    [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)], atol=1e-12)
    # Transposing the grid swaps the column half with the row half.
    swapped = pe.reshape(G, G, D).transpose(1, 0, 2).reshape(G * G, D)
    np.testing.assert_array_equal(swapped, np.concatenate([pe[:, D // 2:], pe[:, :D // 2]], axis=1))
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2)
    np.testing.assert_array_equal(model.pos_embed[0].numpy(), models.get_2d_sincos_pos_embed(64, 4).astype(np.float32))


@pytest.mark.parametrize("p", [1, 2, 4])
def test_unpatchify_inverts_patch_layout(p):
    model = DiT(input_size=8, patch_size=p, in_channels=3, hidden_size=32, depth=1, num_heads=2, learn_sigma=False)
    x = torch.randn(2, 3, 8, 8)
    h = 8 // p
    # Token k = i * h + j holds patch (i, j), flattened in (p, q, c) order.
    tokens = x.reshape(2, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * h, p * p * 3)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)


def test_patch_embed_token_order_is_row_major():
    embed = models.PatchEmbed(patch_size=2, in_channels=1, hidden_size=1)
    with torch.no_grad():
        embed.proj.weight.fill_(0.25)
        embed.proj.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Mean of each 2x2 patch, rows first: patches (0,0), (0,1), (1,0), (1,1).
    torch.testing.assert_close(embed(x)[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


# --------------------------------------------------------------------------------------------------
# Behaviour shared by every family
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_shapes_and_zero_output_at_init(in_channels, learn_sigma):
    for model in small_models(in_channels, learn_sigma):
        x, t, y = inputs(model)
        out = model(x, t, y)
        assert out.shape == (4, in_channels * (2 if learn_sigma else 1), 16, 16)
        assert model.out_channels == out.shape[1]
        assert torch.count_nonzero(out) == 0


def test_input_size_must_be_divisible_by_patch():
    with pytest.raises(ValueError):
        DiT(input_size=30, patch_size=4, hidden_size=32, depth=1, num_heads=2)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_equals_two_separate_forwards(learn_sigma):
    for model in small_models(in_channels=4, learn_sigma=learn_sigma):
        randomize(model).eval()
        x, t, y = inputs(model)
        null = torch.full_like(y, model.num_classes)
        with torch.no_grad():
            cond, uncond = model(x, t, y), model(x, t, null)
            for g in (None, 3):
                n = 4 if g is None else g
                expected = cond.clone()
                expected[:, :n] = uncond[:, :n] + 2.5 * (cond[:, :n] - uncond[:, :n])
                got = model.forward_with_cfg(x, t, y, 2.5, guide_channels=g)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError):
            model.forward_with_cfg(x, t, y, 2.5, guide_channels=5)


def test_label_dropout_only_in_training():
    for model in small_models(class_dropout_prob=1.0):
        randomize(model)
        x, t, y = inputs(model)
        null = torch.full_like(y, model.num_classes)
        with torch.no_grad():
            model.train()
            dropped = model(x, t, y)
            model.eval()
            torch.testing.assert_close(dropped, model(x, t, null))
            assert not torch.allclose(model(x, t, y), dropped)
    for model in small_models(class_dropout_prob=0.0):
        randomize(model).train()
        x, t, y = inputs(model)
        with torch.no_grad():
            assert not torch.allclose(model(x, t, y), model(x, t, torch.full_like(y, model.num_classes)))


def test_gradient_checkpointing_gives_identical_gradients():
    for model in small_models(learn_sigma=True, class_dropout_prob=0.0):
        randomize(model).train()
        x, t, y = inputs(model)
        grads = []
        for use_checkpoint in (False, True):
            model.gradient_checkpointing = use_checkpoint
            model.zero_grad()
            model(x, t, y).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    for model in small_models(class_dropout_prob=0.0):
        x0, t, y = inputs(model, batch=8)
        noise = torch.randn_like(x0)
        x_t = 0.6 * x0 + 0.8 * noise
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for _ in range(100):
            loss = (model(x_t, t, y) - noise).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] / 10, (type(model).__name__, losses[0], losses[-1])
