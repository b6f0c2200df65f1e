"""The single-file checkpoint format: written by train.py, read by sample.py and the experiments.

An export is a torch.save'd dict of plain tensors and plain Python values, loadable with
torch.load(weights_only=True):
  {"model": state dict, "ema": state dict,          models.py's own keys (DiT's for DiT models)
   "args": {"model":     ALL_MODELS name + constructor kwargs,
            "diffusion": GaussianDiffusion kwargs,
            "data":      {"mode": "pixels" | "latents", "image_size", "vae", "scale_factor", "class_names"},
            "config":    the resolved training config,
            "step":      optimizer steps taken}}
load_export also reads an official DiT checkpoint, a plain state dict that records nothing: its model,
size and VAE come from the caller (defaults: DIT_DEFAULTS), and its diffusion is DiT's (linear
schedule, ε-prediction).
"""
import os
from typing import NamedTuple

import torch

from diffusion import GaussianDiffusion
from distributed import atomic_write
from models import ALL_MODELS
from store import SD_VAE_SCALE_FACTOR

# Settings of the official DiT checkpoints (plain state dicts carry none of their own).
DIT_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "learn_sigma": True,
                "vae": "stabilityai/sd-vae-ft-ema"}


class ExportError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one line meant for the user."""


class Loaded(NamedTuple):
    model: torch.nn.Module        # on the CPU, in train mode as built
    diffusion: GaussianDiffusion
    vae: str | None               # hub id or folder of the VAE for latent models, None for pixel models
    scale_factor: float | None    # latent scale (model space = VAE latent * scale_factor)
    class_names: list | None      # None for official DiT files


def save_export(path, model_state, ema_state, *, model_args, diffusion_args, data, config, step):
    """Write an export atomically (see the module docstring for the fields)."""
    args = {"model": model_args, "diffusion": diffusion_args, "data": data, "config": config, "step": step}
    atomic_write(path, lambda f: torch.save({"model": model_state, "ema": ema_state, "args": args}, f))


def load_export(path, weights="ema", *, model=None, image_size=None, num_classes=None, learn_sigma=None, vae=None):
    """Build the model (with `weights`: "ema" or "model") and the diffusion a checkpoint needs.

    model/image_size/num_classes/learn_sigma describe an official DiT state dict and are refused for an
    export, which records them; vae overrides the VAE an export (or DIT_DEFAULTS) names."""
    if not os.path.isfile(path):
        raise ExportError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects such as DiT's argparse.Namespace
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load {path} with torch.load(weights_only=True) ({reason}); a DiT training "
                          f"checkpoint pickles its args: save its 'ema' state dict alone and pass that") from None

    plain = {"model": model, "image_size": image_size, "num_classes": num_classes, "learn_sigma": learn_sigma}
    if isinstance(ckpt, dict) and {"model", "ema", "args"} <= ckpt.keys():
        given = [k for k, v in plain.items() if v is not None]
        if given:
            raise ExportError(f"{given[0]} is for plain state dicts; {path} records it in its args")
        a = ckpt["args"]
        name, state = a["model"]["name"], ckpt[weights]
        model_kwargs = {k: v for k, v in a["model"].items() if k != "name"}
        diffusion = GaussianDiffusion(**a["diffusion"])
        class_names, vae_id, scale_factor = a["data"]["class_names"], None, None
        if a["data"]["mode"] == "latents":
            vae_id, scale_factor = vae or a["data"]["vae"], a["data"]["scale_factor"]
            if vae_id is None:
                raise ExportError(f"{path} is a latent model but records no VAE; pass --vae")
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        flags = {k: DIT_DEFAULTS[k] if v is None else v for k, v in plain.items()}
        if flags["image_size"] % 8:
            raise ExportError(f"image size must be a multiple of 8 (the VAE downsamples by 8), got {flags['image_size']}")
        name, state = flags["model"], ckpt
        model_kwargs = {"input_size": flags["image_size"] // 8, "in_channels": 4,
                        "num_classes": flags["num_classes"], "learn_sigma": flags["learn_sigma"],
                        "class_dropout_prob": 0.1}  # > 0 so the table has DiT's extra null-label row
        diffusion = GaussianDiffusion(schedule="linear", target="eps", learn_sigma=flags["learn_sigma"])
        class_names, vae_id, scale_factor = None, vae or DIT_DEFAULTS["vae"], SD_VAE_SCALE_FACTOR
    else:
        raise ExportError(f"{path} is neither an exported checkpoint ({{'model', 'ema', 'args'}}) nor a plain state dict")

    if name not in ALL_MODELS:
        raise ExportError(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
    net = ALL_MODELS[name](**model_kwargs)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        if mismatched:
            k = mismatched[0]
            problems.append(f"{len(mismatched)} shape mismatches (first {k!r}: checkpoint "
                            f"{list(state[k].shape)} vs model {list(own[k].shape)})")
        raise ExportError(f"{path} does not fit {name} {model_kwargs}: {'; '.join(problems)}")
    net.load_state_dict(state)
    return Loaded(net, diffusion, vae_id, scale_factor, class_names)
