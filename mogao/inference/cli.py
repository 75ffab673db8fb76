"""`mogao generate` and `mogao chat`: the generation loop from the command line.

    mogao generate --ckpt RUN/model --prompt "Draw a red circle." [--image in.png ...] [--draw] --out DIR
    mogao chat --ckpt RUN/model [--out DIR]            (lines from stdin; /draw TEXT, /image PATH, /quit)

Guidance is Mogao's multi-modal CFG, or BAGEL's with `--cfg-mode bagel` (its branches, formula, interval rule
and renorm, `--cfg-renorm-type`); `mogao generate --noise N.npy` starts the image from the given noise.

MODEL_DIR is a saved model directory as a fit writes it (`<run>/model`: mogao_config.json, model.safetensors
and the tokenizer). Errors a user can cause are printed as one line naming the argument or file (exit 2).
`--out` must be new or empty unless `--overwrite` is given, and an input image is never written over. What the
model wrote is printed with its control characters escaped (newlines and tabs kept), so it cannot drive the
terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mogao.bagel.rules import RENORM_TYPES
from mogao.data.check import printable
from mogao.errors import ConfigError, MogaoError
from mogao.inference.guidance import GUIDANCE_MODES

_MODEL_TEXT_KEEP = "\n\t"  # control characters model text may print as they are


def _check_out(out: Path, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """`out` must be new or empty unless `overwrite`; and no input image may live in it (it could be written
    over by an output of the same name)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{out}' is not empty; give a new folder, or --overwrite to write over what "
                          "is there")
    for image in inputs:
        p = Path(image).expanduser()
        if p.exists() and out.exists() and p.resolve().parent == out.resolve():
            raise ConfigError(f"--image '{image}' is in --out '{out}', where outputs are written; copy it "
                              "elsewhere or choose another --out")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="saved model directory (<run>/model)")
    p.add_argument("--lora", default=None, help="LoRA adapter directory to load on top of the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="Euler steps per image")
    p.add_argument("--shift", type=float, default=None, help="σ schedule shift (default: the model's training one)")
    p.add_argument("--cfg-text", type=float, default=7.5, help="text guidance scale γ (1 = none)")
    p.add_argument("--cfg-image", type=float, default=1.5, help="image guidance scale γ_img (1 = none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="σ range where guidance applies (mogao: LO <= σ <= HI; bagel: LO < σ <= HI)")
    p.add_argument("--cfg-renorm", type=float, default=None, metavar="MIN",
                   help="rescale the guided velocity to at most the conditional one's norm, by at least MIN "
                        "(--cfg-mode bagel renormalises always, by at least 0 unless given)")
    p.add_argument("--cfg-mode", choices=GUIDANCE_MODES, default="mogao",
                   help="guidance branches and formula: mogao (full / image only / none) or bagel (full / text "
                        "dropped / images dropped, BAGEL's nested formula)")
    p.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default="global",
                   help="what renorm measures: the whole image, each token (channel), or each token after the "
                        "text step only (text_channel, --cfg-mode bagel)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="PX",
                   help="side, or width height, in pixels (multiples of the model's VAE patch)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy text")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _load(args: argparse.Namespace):
    """Model and tokenizer from --ckpt, with --lora applied; ConfigError naming the path on failure."""
    import torch

    from mogao.inference.inputs import load_model_dir

    model, tokenizer = load_model_dir(args.ckpt)
    if args.lora:
        from mogao.lora import load_adapter

        model = load_adapter(model, args.lora)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _configs(args: argparse.Namespace):
    from mogao.inference.guidance import Guidance
    from mogao.inference.session import GenerationConfig

    size = None
    if args.image_size:
        if len(args.image_size) > 2:
            raise ConfigError(f"--image-size takes one or two numbers, got {args.image_size}")
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, max_images=args.max_images, image_size=size,
                           steps=args.steps, shift=args.shift, temperature=args.temperature, seed=args.seed)
    guidance = Guidance(text_scale=args.cfg_text, image_scale=args.cfg_image, interval=tuple(args.cfg_interval),
                        renorm=True if args.cfg_renorm is not None else None, renorm_min=args.cfg_renorm or 0.0,
                        mode=args.cfg_mode, renorm_type=args.cfg_renorm_type)
    return cfg, guidance


MAX_NOISE_VALUES = 1 << 26  # the largest noise array read (far above any image's latent)


def load_noise(path: str):
    """A starting noise from a .npy file (read without pickles: a file cannot run code) as a float32 tensor:
    latent tokens (gh*gw, token_dim) or an autoencoder latent (C, h, w). ConfigError naming the file."""
    import numpy as np
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--noise '{path}' is not a file (give a .npy array saved with numpy.save)")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        if arr.ndim not in (2, 3) or arr.size > MAX_NOISE_VALUES or arr.dtype.kind != "f":
            raise ValueError(f"a float array of 2 or 3 dimensions is needed, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(np.array(arr, dtype=np.float32))
    except ValueError as e:
        raise ConfigError(f"--noise '{path}': {e}") from e
    except OSError as e:
        raise ConfigError(f"--noise '{path}' cannot be read as a .npy array: {e}") from e


def _settings(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def generate_main(argv: Sequence[str] | None = None) -> int:
    """`mogao generate`: one prompt (with optional input images) -> PNGs, conversation.json and .html."""
    p = argparse.ArgumentParser(prog="mogao generate", description=__doc__.split("\n\n")[0])
    _add_common(p)
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable), before the prompt")
    p.add_argument("--draw", action="store_true", help="make the answer begin with an image (t2i, editing)")
    p.add_argument("--noise", action="append", default=[], metavar="NPY",
                   help="starting noise of the answer's images in order (repeatable): a .npy float array, latent "
                        "tokens (gh*gw, token_dim) or an autoencoder latent (C, h, w); default: seeded")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        _check_out(Path(args.out), args.overwrite, args.image)
        from mogao.inference.inputs import check_prompt
        from mogao.inference.report import save_conversation
        from mogao.inference.session import GenerationSession

        check_prompt(args.prompt, "--prompt")
        cfg, guidance = _configs(args)
        noise = [load_noise(n) for n in args.noise]
        model, tokenizer = _load(args)
        session = GenerationSession(model, tokenizer, 1, cfg, guidance, progress=True)
        session.add_user_turn([[*({"image": i} for i in args.image), {"text": args.prompt}]])
        response = session.respond(draw=args.draw, noise=[noise] if noise else None)[0]
        paths = save_conversation(session.history[0], Path(args.out), title=args.prompt[:80],
                                  settings=_settings(args))
    except MogaoError as e:
        print(f"mogao generate: error: {printable(e)}", file=sys.stderr)
        return 2
    for seg in response.segments:
        if seg.text:
            print(printable(seg.text, keep=_MODEL_TEXT_KEEP))
    for key, path in paths.items():
        if key.startswith("image_"):
            print(printable(f"image: {path}"))
    print(printable(f"page: {paths['html']}  (stopped: {response.stop_reason})"))
    return 0


def chat_main(argv: Sequence[str] | None = None) -> int:
    """`mogao chat`: a multi-turn session over stdin lines; images are saved (and their paths printed) as made.

    Each line is a user turn. `/image PATH` attaches an image to the next turn, `/draw TEXT` asks for an image,
    `/quit` ends (so does end of input). conversation.json and .html are written at the end.
    """
    p = argparse.ArgumentParser(prog="mogao chat", description="a multi-turn terminal session")
    _add_common(p)
    p.add_argument("--out", default="chat", help="where images and the conversation are written (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it is not empty")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    try:
        _check_out(out, args.overwrite)
        from mogao.inference.inputs import check_prompt
        from mogao.inference.report import save_conversation
        from mogao.inference.session import GenerationSession

        cfg, guidance = _configs(args)
        model, tokenizer = _load(args)
        session = GenerationSession(model, tokenizer, 1, cfg, guidance, progress=sys.stderr.isatty())
        out.mkdir(parents=True, exist_ok=True)
    except MogaoError as e:
        print(f"mogao chat: error: {printable(e)}", file=sys.stderr)
        return 2
    saved: dict[int, Path] = {}
    attached: list[str] = []
    print("mogao chat: type a message (/draw TEXT for an image, /image PATH to attach one, /quit to end)")
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        if line.startswith("/image "):
            image = line[len("/image "):].strip()
            p_img = Path(image).expanduser()
            if p_img.exists() and p_img.resolve().parent == out.resolve():
                print(printable(f"error: {image} is in --out '{out}', where outputs are written; copy it elsewhere"))
                continue
            attached.append(image)
            continue
        draw = line.startswith("/draw ")
        text = line[len("/draw "):] if draw else line
        try:
            check_prompt(text, "message")
            session.add_user_turn([[*({"image": a} for a in attached), {"text": text}]])
            attached = []
            response = session.respond(draw=draw)[0]
        except MogaoError as e:
            print(f"error: {printable(e)}")
            attached = []
            continue
        first = len(session.history[0]) - len(response.segments)
        for k, seg in enumerate(response.segments):
            if seg.text:
                print(f"model: {printable(seg.text, keep=_MODEL_TEXT_KEEP)}")
            if seg.image is not None:
                path = out / f"image_{len(saved):03d}.png"
                seg.image.save(path)
                saved[first + k] = path
                print(printable(f"model: [image saved: {path}]"))
        sys.stdout.flush()
    paths = save_conversation(session.history[0], out, title="mogao chat", settings=_settings(args),
                              image_paths=saved)
    print(printable(f"conversation: {paths['html']}"))
    return 0
