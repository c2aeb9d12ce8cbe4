"""Command-line options shared by every `ldmkit train STAGE` command."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Mapping, TypeVar

from ldmkit.checkpoint import lock_run_dir
from ldmkit.config import apply_overrides, preset
from ldmkit.data import default_spec, load_dataset

T = TypeVar("T")


def train_parser(prog: str, description: str, presets: Mapping[str, object], default_preset: str,
                 data: bool = True, preset_by_data=None) -> argparse.ArgumentParser:
    """The arguments every training command shares. With `preset_by_data` (data spec -> preset name) the default
    preset is "auto": chosen from the resolved --data by `resolve_config`."""
    p = argparse.ArgumentParser(allow_abbrev=False, prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if data:
        p.add_argument("--data", default="auto",
                       help="fashion-mnist | shapes | folder:PATH; auto = fashion-mnist if installed, else shapes")
        p.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST idx .gz files")
        p.add_argument("--skip-bad", action="store_true", help="folder data: warn and skip unreadable files")
        p.add_argument("--image-size", type=int, default=None, metavar="S",
                       help="training resolution (folders and shapes); default: 64 for a *-64 preset, the "
                       "autoencoder's for stages trained on one (--autoencoder), else 32")
    if preset_by_data is None:
        p.add_argument("--preset", default=default_preset, choices=sorted(presets), help="named configuration")
    else:
        p.add_argument("--preset", default="auto", choices=["auto", *sorted(presets)],
                       help="named configuration; auto = the data's own preset")
        p.set_defaults(preset_by_data=preset_by_data)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--minutes", type=float, default=0.0, metavar="N",
                   help="opt-in wall-clock budget: save and stop after N minutes (presets are fixed step counts)")
    p.add_argument("--out", required=True, help="stage directory to write (config, weights, metrics, state)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run in --out")
    p.add_argument("--init-from", default=None, metavar="DIR", help="start from the weights of another run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def resolve_config(args: argparse.Namespace, presets: Mapping[str, T]) -> T:
    """The preset named by --preset with every --set override applied (type-checked)."""
    if args.preset == "auto":
        args.preset = args.preset_by_data(resolve_data(args.data, args.data_dir))
    if getattr(args, "overwrite", False):
        if args.resume:
            raise ValueError("--overwrite and --resume contradict each other; pass one")
        clear_run_dir(args.out)
    budget = [f"train.max_minutes={args.minutes}"] if getattr(args, "minutes", 0) else []
    return apply_overrides(preset(presets, args.preset), [*budget, *args.overrides])


def resolve_data(spec: str, data_dir: str | None = None) -> str:
    """`auto` -> fashion-mnist when its files are installed (or in --data-dir), else the generated shapes."""
    if spec != "auto":
        return spec
    return default_spec(data_dir)


def image_size_of(args) -> int:
    """--image-size, or the size the preset or the autoencoder (--autoencoder) implies; a mismatch is refused."""
    implied, source = None, None
    if getattr(args, "autoencoder", None):
        from ldmkit.stages import stage_config  # local: stages imports the model packages
        implied = stage_config(args.autoencoder, "autoencoder").get("data_options", {}).get("image_size")
        source = f"the autoencoder in {args.autoencoder}"
    elif str(getattr(args, "preset", "")).endswith("-64"):
        implied, source = 64, f"--preset {args.preset}"
    if args.image_size is not None and implied is not None and args.image_size != implied:
        raise ValueError(f"--image-size {args.image_size} differs from the {implied} pixels of {source}; drop "
                         "--image-size or train on an autoencoder of that size")
    size = args.image_size or implied or 32
    if not 8 <= size <= 1024:
        raise ValueError(f"--image-size {size} must lie in 8..1024 pixels")
    return size


def load_data(args, split: str = "train"):
    """The dataset named by --data / --data-dir / --skip-bad / --image-size (data_dir only for fashion-mnist)."""
    spec = resolve_data(args.data, args.data_dir)
    kw = {"image_size": image_size_of(args)}
    if spec == "fashion-mnist":
        kw["data_dir"] = args.data_dir
    elif args.data_dir is not None:
        raise ValueError(f"--data-dir {args.data_dir} only applies to fashion-mnist, not --data {spec}")
    if spec.startswith("folder:"):
        kw["skip_bad"] = args.skip_bad
    return spec, load_dataset(spec, split=split, **kw)


def clear_run_dir(out: str) -> None:
    """Delete a previous run in `out` (--overwrite): only a folder that holds a stage's config.json."""
    path = Path(out)
    if not path.exists():
        return
    if not (path / "config.json").is_file():
        raise FileExistsError(f"--overwrite: {path} holds no training run (no config.json); it is left alone")
    lock_run_dir(path)  # refuses while another process writes there
    shutil.rmtree(path)


def stage_main(prog: str, doc: str, presets: Mapping[str, object], train, argv: list[str] | None,
               on_autoencoder: bool = False, **parser_kw) -> int:
    """The command line of one training stage: parse, resolve the preset and overrides, load the data, train.
    `on_autoencoder`: the stage trains on a finished autoencoder (`--autoencoder DIR`: classifier, fast decoder)."""
    p = train_parser(prog, doc.splitlines()[0], presets, "fashion-mnist", **parser_kw)
    if on_autoencoder:
        p.add_argument("--autoencoder", required=True, help="autoencoder stage directory")
    args = p.parse_args(argv)
    cfg = resolve_config(args, presets)
    spec, ds = load_data(args)
    train(cfg, args.out, spec, ds, *([args.autoencoder] if on_autoencoder else []), resume=args.resume,
          init_from=args.init_from, progress=not args.no_progress)
    return 0
