"""The README's commands chain as pasted: every store a training config or evaluate.py reads is one an
extraction command in the README writes (same size and kind), and every checkpoint sample.py reads is
one its training run exports."""
import os
import re
import shlex

from config import load_config
from train import DEFAULTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """The README's bash blocks as token lists, one per command (continuation lines joined, comments dropped,
    a shell variable set by one line, NAME="...", expanded where a later one uses it as $NAME)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
                name, value = tokens[0].split("=", 1)
                variables[name] = value.split()
                continue
            tokens = [word for token in tokens for word in variables.get(token[1:], [token])
                      ] if any(t.startswith("$") for t in tokens) else tokens
            if tokens:
                commands.append(tokens)
    return commands


def flag(tokens, name):
    return tokens[tokens.index(name) + 1] if name in tokens else None


def script_commands(script):
    return [tokens[tokens.index(t) + 1:] for tokens in readme_commands() for t in tokens if t == script]


def test_readme_commands_chain():
    stores = {flag(t, "--out"): t for t in script_commands("extract_latents.py")}
    assert "data/cifar10" in stores
    runs = {(flag(t, "--config"), tuple(v for k, v in zip(t, t[1:]) if k == "--set" and v.startswith("data.")))
            for t in script_commands("train.py")}
    assert "configs/cifar10.yaml" in {config for config, _ in runs}
    for config, data_sets in runs:
        cfg = load_config(DEFAULTS, os.path.join(ROOT, config), list(data_sets))
        path = cfg["data"]["path"]
        if config == "configs/quickstart.yaml":   # quickstart.sh builds data/builtin<image size> itself
            assert "DATA=${QS_DATA:-data/builtin$SIZE}" in open(os.path.join(ROOT, "quickstart.sh")).read()
            assert path == f"data/builtin{cfg['data']['image_size']}"
            continue
        assert path in stores, f"{config} reads {path}, which no README extraction writes"
        extraction = stores[path]
        assert int(flag(extraction, "--image-size")) == cfg["data"]["image_size"], config
        assert (flag(extraction, "--vae") == "none") == (cfg["data"]["mode"] == "pixels"), config
        # sample.py's checkpoints of this run are ones it exports: every export_every steps and at the end
        name = os.path.splitext(os.path.basename(config))[0]
        for tokens in script_commands("sample.py"):
            found = re.fullmatch(rf"results/{name}/checkpoints/step-(\d{{7}})\.pt", flag(tokens, "--ckpt"))
            if found:
                step, every = int(found.group(1)), cfg["checkpoint"]["export_every"]
                assert step == cfg["train"]["steps"] or (every and step % every == 0), tokens
    for tokens in script_commands("evaluate.py"):
        if flag(tokens, "--save-stats") and tokens[0].startswith("data/"):
            assert tokens[0] in stores, f"evaluate.py reads {tokens[0]}, which no README extraction writes"


def test_readme_extractions_do_not_share_a_store():
    """Two extractions into one store with other settings: the second refuses (the store is another
    dataset), so a reader pasting both in order would be stopped. quickstart.sh's store counts too."""
    written = {}
    for tokens in script_commands("extract_latents.py"):
        written.setdefault(flag(tokens, "--out"), set()).add(" ".join(tokens))
    cfg = load_config(DEFAULTS, os.path.join(ROOT, "configs/quickstart.yaml"), [])
    num_images = re.search(r"NUM_IMAGES=\$\{QS_NUM_IMAGES:-(\d+)\}", open(os.path.join(ROOT, "quickstart.sh")).read())
    quickstart = f"--data builtin --num-images {num_images.group(1)} --image-size {cfg['data']['image_size']} --vae none"
    written.setdefault(cfg["data"]["path"], set()).add(quickstart + f" --out {cfg['data']['path']}")
    for out, commands in written.items():
        assert len(commands) == 1, f"README extractions write {out} with different settings: {commands}"
