"""The `ldmkit` command: a table of subcommands, each a `main(argv)` function imported only when used.

A user error (a bad value, a missing or unreadable file, an existing output) ends in one line naming it and the
fix, exit code 2; `--debug` anywhere on the command line shows the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

# command words -> ("module:function", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "preview"): ("ldmkit.data.preview:main", "write a labelled grid of a dataset's images and captions"),
    ("data", "export"): ("ldmkit.data.export:main", "write a built-in dataset as an image folder with captions"),
    ("train", "autoencoder"): ("ldmkit.train.autoencoder:main", "train the KL autoencoder (L1/L2 + KL + LPIPS + GAN)"),
    ("train", "eval-classifier"): ("ldmkit.train.eval_classifier:main",
                                   "train the frozen Fashion-MNIST evaluation classifier"),
    ("train", "shapes-judge"): ("ldmkit.train.shapes_judge:main",
                                "train the frozen per-attribute judges of generated shapes images"),
    ("train", "clip"): ("ldmkit.train.clip:main", "train CLIP (text transformer + ViT, contrastive loss)"),
    ("train", "ldm"): ("ldmkit.train.ldm:main", "train the latent denoiser (UNet or DiT) on cached latents"),
    ("train", "classifier"): ("ldmkit.train.classifier:main",
                              "train the noise-aware latent classifier for classifier guidance"),
    ("train", "fast-decoder"): ("ldmkit.train.fast_decoder:main",
                                "train a small, fast decoder for a trained autoencoder's latents"),
    ("train", "distill"): ("ldmkit.train.distill:main",
                           "guidance distillation: a denoiser that needs one network call per sampling step"),
    ("train", "pipeline"): ("ldmkit.train.pipeline:main", "train every stage of a text-to-image pipeline in order"),
    ("autoencoder", "eval"): ("ldmkit.eval.autoencoder_eval:main",
                              "PSNR/SSIM/LPIPS, latent statistics and a reconstruction grid"),
    ("clip", "eval"): ("ldmkit.eval.clip_cli:eval_main", "zero-shot accuracy and retrieval recall of a CLIP stage"),
    ("clip", "embed"): ("ldmkit.eval.clip_cli:embed_main", "print CLIP text embeddings of prompts"),
    ("clip", "score"): ("ldmkit.eval.clip_cli:score_main", "CLIP score of an npz of generated images"),
    ("eval", "implicit-classifier"): ("ldmkit.eval.implicit_classifier:main",
                                      "zero-shot accuracy of the classifier CFG implicitly follows (Bayes' rule)"),
    ("eval",): ("ldmkit.eval.score:main", "score an npz of images with the evaluation classifier (acc, FD, P/R)"),
    ("sample",): ("ldmkit.sample:main", "generate images from prompts with a pipeline directory"),
    ("export",): ("ldmkit.export:main", "copy a pipeline for sharing: weights only (bf16 or fp32), hashes rebound"),
    ("serve",): ("ldmkit.serve:main", "a local web UI: text to image, edits, a look inside the latent space"),
    ("experiment",): ("ldmkit.experiments:main", "the lecture's claims, measured: plots, numbers, docs/experiments.md"),
    ("demo",): ("ldmkit.demo:main", "the lecture on the bundled pipelines: an HTML report with every stage at work"),
}


def _usage() -> str:
    width = max(len(" ".join(k)) for k in COMMANDS) + 2
    lines = ["usage: ldmkit COMMAND [args]   (ldmkit COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {' '.join(words):<{width}}{help_}" for words, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# what a user can fix: bad values and configs (ValueError, with ConfigError and BadFileError), files and folders
# (OSError: missing, unreadable, unwritable, full), a run that diverged (its message names the step and the fix)
USER_ERRORS = (ValueError, OSError)  # bad values and configs; files, folders, permissions, a full disk


def _user_error_types() -> tuple[type[BaseException], ...]:
    from ldmkit.train.common import TrainingDiverged  # local: `ldmkit --help` stays free of torch
    return (*USER_ERRORS, TrainingDiverged)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return _dispatch(argv)
    try:
        return _dispatch(argv)
    except KeyboardInterrupt as e:
        print(f"ldmkit: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except _user_error_types() as e:
        words = next((" ".join(argv[:n]) for n in (2, 1) if tuple(argv[:n]) in COMMANDS), "")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"ldmkit {words}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ldmkit import __version__  # local: like every command, loaded only when asked for
        print(f"ldmkit {__version__}")
        return 0
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            target, _ = COMMANDS[key]
            module, func = target.split(":")
            fn = getattr(importlib.import_module(module), func)
            return int(fn(argv[n:]) or 0)
    known = sorted({" ".join(k) for k in COMMANDS if k[0] == argv[0]})
    hint = f"; did you mean one of: {', '.join(known)}" if known else "; run `ldmkit --help` for the list"
    print(f"ldmkit: unknown command {' '.join(argv[:2])!r}{hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
