"""Command line of the PyramidFlow example: ``python -m examples.pyramidflow <command>``.

Commands:

* ``demo``: train and evaluate on the built-in synthetic data (a texture and an object
  category), write heatmap panels and image templates, print the metrics and the wall time.
* ``train``: train on MVTec AD, BTAD, a folder of your own images or synthetic data, then
  evaluate on the test split when there is one.
* ``evaluate``: metrics of a run folder or checkpoint on a test set.
* ``predict``: heatmaps, scores and verdicts for a folder of images.
* ``export``: the fitted model as an ONNX or TorchScript file, images to anomaly maps and
  scores (:mod:`.export`).

Every config field is a flag (``--image-size``, ``--epochs``, ``--seed``, ``--volume-norm``...);
booleans come as ``--augment`` / ``--no-augment``. A run folder (``--out``, by default
``runs/<name>``) holds ``config.json``, ``data.json`` (how to rebuild the datasets),
``checkpoints/``, ``model.pt`` (the detector), ``image_template.png``, ``heatmaps/`` and
``results.json`` / ``results.md``.

Run folders never lose or mix runs (:data:`RUN_FOLDER_RULES`): everything (data layout and
masks, device, config, folders writable, a resumed checkpoint) is checked before the first
write; a folder that holds a run is refused unless ``--overwrite`` (clear it first) or
``--resume`` (continue it); ``config.json``, ``data.json`` and ``model.pt`` are written only
when training succeeds, and every file atomically (written aside, then renamed).

``train`` also runs as several processes, one DistributedDataParallel replica each:
``torchrun --nproc-per-node N -m examples.pyramidflow train ...`` (gloo on the CPU, nccl with
``--device cuda``). ``--batch-size`` is then the global batch, split evenly; the run computes
what one process computes with that batch, process 0 alone writes the run folder and prints,
and a check that fails on any process stops all of them (:mod:`.distributed`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed
from .config import PRESETS, PyramidFlowConfig, mvtec_defaults
from .datasets import BTAD, AnomalyImageDataset, ImageFolder, MVTecAD
from .detector import Detector
from .distributed import Distributed, PeerError, together
from .evaluate import collect_maps, metrics_from_maps, results_table, write_results
from .export import FORMATS, check_onnx, export
from .files import write_text_atomically
from .model import PyramidFlow
from .synthetic import SyntheticDefects
from .train import (
    RESUMABLE_CHANGES,
    check_device,
    check_resume,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    training_split,
)
from .visualize import color_range, save_image, save_panel

__all__ = ["DEMO_DEFAULTS", "RUN_FOLDER_RULES", "build_parser", "main"]

logger = logging.getLogger(__name__)

DEMO_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "channels": 16,
    "levels": 4,
    "depth": 2,
    "kernel_size": 7,
    "epochs": 6,
    "batch_size": 4,
}
"""Config of ``demo``: the paper's C, L and kernel with fewer stacks, epochs and pixels, so
both categories train and evaluate in well under five minutes on two CPU cores."""

_DEMO_KINDS = ("texture", "object")
_LATEST = "latest"
_MODEL_FILE = "model.pt"
# What a run writes into its folder; --overwrite removes these and nothing else.
_RUN_FILES = ("config.json", "data.json", _MODEL_FILE, "image_template.png", "results.json",
              "results.md")
_RUN_FOLDERS = ("checkpoints", "heatmaps", "predictions")
_EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
_PATH_KEYS = ("root", "good", "test_good", "defective", "masks")

RUN_FOLDER_RULES = (
    "Run folders: everything (data layout and masks, --device, the config, whether the "
    "folders can be written, a checkpoint to resume) is checked before anything is written. A "
    "folder that already holds a run is refused unless --overwrite (its run files are removed "
    "first; other files stay) or --resume (continue its latest checkpoint; the architecture "
    f"must match, {', '.join(RESUMABLE_CHANGES)} may change). config.json, data.json and "
    "model.pt are written only when training succeeds, and every file is written to a "
    "temporary name and renamed, so an interrupted run never leaves a truncated file. After "
    "a NaN or a numerical failure the last checkpoint is the last finite one: resume it with "
    "a lower --learning-rate."
)
"""How ``train`` and ``demo`` treat run folders (also shown by ``--help``)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on a reported error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only this example's loggers: a host application's (or pytest's) logging stays as it is.
    logging.basicConfig(format="%(message)s")
    package_logger = logging.getLogger(__package__)
    package_logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    args.where, joined, leave = None, False, False
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, received {args.threads}")
            torch.set_num_threads(args.threads)
        check_device(args.device)
        already = distributed.initialized()
        args.where = _join(args)
        joined = not already and distributed.initialized()  # ours to leave at the end
        if args.where is not None and not args.where.is_main:
            package_logger.setLevel(logging.ERROR)  # process 0 reports for all
            args.progress = False
        with logging_redirect_tqdm():
            status = args.command(args)
        leave = True
        return status
    except PeerError as error:  # another process failed; process 0 says which and why
        leave = True
        if not error.quiet:
            print(f"{parser.prog} {args.command_name}: error: {error}", file=sys.stderr)
        return 1
    # Bad flags, files, data or settings, a diverging loss: one line instead of a traceback.
    except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
        leave = distributed.stopped_every_process(error)
        where = "" if args.where is None else f" (process {args.where.rank})"
        print(f"{parser.prog} {args.command_name}{where}: error: {error}", file=sys.stderr)
        return 1
    finally:
        # Leaving the group waits for the others; after a failure of this process alone they
        # may wait in a collective for ever: exit, and torchrun stops them.
        if joined and leave:
            torch.distributed.destroy_process_group()


def _join(args: argparse.Namespace) -> Distributed | None:
    """Under torchrun, join the process group and take this process's device; else None."""
    where = distributed.from_environment()
    if where is None:
        return None
    if args.command_name != "train":
        raise ValueError(f"only the train command runs as several processes; run "
                         f"{args.command_name} as one (python -m examples.pyramidflow "
                         f"{args.command_name} ...), not under torchrun with "
                         f"WORLD_SIZE={where.world_size}")
    where, device = distributed.setup(args.device, args.backend)
    args.device = str(device)
    return where


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its five sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.pyramidflow",
        description="PyramidFlow (CVPR 2023) defect localisation: demo, train, evaluate, "
                    "predict, export.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = _command(commands, "demo", _demo,
                    "train and evaluate on the built-in synthetic data, end to end")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="run folder (default: runs/demo)")
    _add_overwrite_flag(demo)
    demo.add_argument("--train-images", type=int, default=64,
                      help="normal training images per category (default: 64)")
    demo.add_argument("--test-images", type=int, default=64,
                      help="test images per category, half defective (default: 64)")
    demo.add_argument("--data-seed", type=int, default=0,
                      help="seed of the synthetic products (default: 0)")
    demo.add_argument("--panels", type=int, default=6,
                      help="heatmap panels per category (default: 6)")
    _add_config_flags(demo, DEMO_DEFAULTS)

    train = _command(commands, "train", _train, "train on a dataset, then evaluate")
    _add_data_flags(train, required=True)
    train.add_argument("--out", type=Path, help="run folder (default: runs/<name>)")
    train.add_argument("--resume", nargs="?", const=_LATEST, metavar="CHECKPOINT",
                       help="continue from CHECKPOINT, or without a value from the run "
                            "folder's latest checkpoint; the architecture must match, "
                            f"{', '.join(RESUMABLE_CHANGES)} may change (e.g. a lower "
                            "--learning-rate after a NaN)")
    _add_overwrite_flag(train)
    train.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                       help="evaluate on the test split after training (default: yes)")
    train.add_argument("--panels", type=int, default=8, help="heatmap panels (default: 8)")
    train.add_argument("--backend", choices=("gloo", "nccl"),
                       help="process-group backend under torchrun (default: nccl with "
                            "--device cuda, gloo otherwise)")
    _add_config_flags(train)

    evaluate = _command(commands, "evaluate", _evaluate,
                        "metrics of a run folder or checkpoint on a test set")
    evaluate.add_argument("source", type=Path, help="run folder or checkpoint file")
    _add_data_flags(evaluate, required=False)
    evaluate.add_argument("--out", type=Path,
                          help="where to write results (default: the run folder)")
    evaluate.add_argument("--panels", type=int, default=8, help="heatmap panels (default: 8)")

    predict = _command(commands, "predict", _predict,
                       "heatmaps, scores and verdicts for a folder of images")
    predict.add_argument("source", type=Path, help="run folder or checkpoint file")
    predict.add_argument("images", type=Path, help="folder of images (not searched recursively)")
    predict.add_argument("--out", type=Path,
                         help="output folder (default: <run>/predictions/<images folder name>)")

    exporter = _command(commands, "export", _export,
                        "write the fitted model as an ONNX or TorchScript file: images to "
                        "anomaly maps and scores, template baked in")
    exporter.add_argument("source", type=Path, help="run folder or checkpoint file")
    exporter.add_argument("--format", choices=FORMATS, required=True,
                          help="onnx (run with onnxruntime; needs pip install "
                               "'autoflow[export]') or torchscript (torch.jit.load)")
    exporter.add_argument("--out", type=Path,
                          help="file to write (default: <run>/model.onnx or "
                               "<run>/model.torchscript.pt)")
    exporter.add_argument("--batch-size", type=int,
                          help="fix the images per call of the exported model (default: any "
                               "number in onnx, a symbolic batch axis; 1 in torchscript, "
                               "whose traces fix it)")
    exporter.add_argument("--overwrite", action="store_true",
                          help="replace the output file if it exists")
    return parser


def _command(commands: Any, name: str, function: Any, summary: str) -> argparse.ArgumentParser:
    epilog = RUN_FOLDER_RULES if name in ("demo", "train") else None
    command = commands.add_parser(name, help=summary, description=summary, epilog=epilog)
    command.set_defaults(command=function, command_name=name)
    command.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                         help="show progress bars (default: yes)")
    command.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    command.add_argument("--workers", type=int, default=0,
                         help="DataLoader worker processes (default: 0)")
    command.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    command.add_argument("--threads", type=int,
                         help="CPU threads for torch (default: torch's choice); 1 is often "
                              "faster for small images on busy machines")
    return command


def _add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the run folder: its run files "
                             "(config.json, data.json, model.pt, checkpoints/, heatmaps/, "
                             "results...) are removed once every check has passed")


def _add_data_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group(
        "data", "mvtec: --root R --category C; btad: --root R --product 01; "
                "folder: --good DIR [--test-good DIR] [--defective DIR [--masks DIR]]; "
                "synthetic: --kind texture|object"
        + ("" if required else " (default: the run folder's data.json)"))
    group.add_argument("--dataset", choices=("mvtec", "btad", "folder", "synthetic"),
                       required=required)
    group.add_argument("--root", type=Path, help="dataset root (mvtec, btad)")
    group.add_argument("--category", help="MVTec AD category, e.g. bottle")
    group.add_argument("--product", help="BTAD product: 01, 02 or 03")
    group.add_argument("--good", type=Path, help="folder of normal training images")
    group.add_argument("--test-good", type=Path,
                       help="folder of normal test images (never the training ones)")
    group.add_argument("--defective", type=Path, help="folder of defective test images")
    group.add_argument("--masks", type=Path,
                       help="folder of their masks (same stems); every non-zero mask pixel "
                            "is a defect, and a mask that marks none is an error")
    group.add_argument("--kind", choices=_DEMO_KINDS, help="synthetic product kind")
    group.add_argument("--train-images", type=int, default=128,
                       help="synthetic training images (default: 128)")
    group.add_argument("--test-images", type=int, default=64,
                       help="synthetic test images (default: 64)")
    group.add_argument("--data-seed", type=int, default=0, help="synthetic seed (default: 0)")
    group.add_argument("--full-range-aupro", action=argparse.BooleanOptionalAction,
                       default=False, help="also report the full-range AUPRO (fpr_limit=1; "
                                           "not comparable to AUPRO@0.3)")


def _add_config_flags(parser: argparse.ArgumentParser,
                      defaults: dict[str, Any] | None = None) -> None:
    """One flag per config field; unset flags keep the config's (or the dataset's) default."""
    group = parser.add_argument_group(
        "config", "settings of PyramidFlowConfig; with --dataset mvtec, volume_norm, levels, "
                  "augment and search_radius default to the per-category recipe "
                  "(mvtec_defaults)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="start from a named preset: 'paper-code' reproduces the public "
                            "PyramidFlow code's architecture and recipe; flags given "
                            "explicitly still win")
    helps = _field_help()
    shown = PyramidFlowConfig().to_dict() | (defaults or {})
    for field in dataclasses.fields(PyramidFlowConfig):
        default = shown[field.name]
        options: dict[str, Any] = {
            "dest": f"config.{field.name}", "default": argparse.SUPPRESS,
            "help": f"{helps.get(field.name, field.name)} (default: {default})",
        }
        if isinstance(default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            options |= {"nargs": 2, "type": float, "metavar": ("B1", "B2")}
        elif isinstance(default, (int, float)) or field.type == "int | None":
            number = int if default is None else type(default)
            options |= {"type": number, "metavar": "N" if number is int else "X"}
        else:
            options["metavar"] = "PATH" if field.name.endswith("weights") else "NAME"
        group.add_argument("--" + field.name.replace("_", "-"), **options)


def _field_help() -> dict[str, str]:
    """First sentence of each field's entry under ``Attributes:`` in the config docstring."""
    helps: dict[str, str] = {}
    section = (PyramidFlowConfig.__doc__ or "").split("Attributes:", 1)[-1]
    for names, text in re.findall(r"^\s{8}(\w+(?:, \w+)*): (.+?)(?=^\s{8}\w|\Z)", section,
                                  flags=re.MULTILINE | re.DOTALL):
        sentence = " ".join(text.split()).replace("``", "").replace("%", "%%")
        for name in names.split(", "):
            helps[name] = sentence
    return helps


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key.removeprefix("config."): value for key, value in vars(args).items()
            if key.startswith("config.")}


def _make_config(base: dict[str, Any], args: argparse.Namespace) -> PyramidFlowConfig:
    # Precedence: the config's defaults, then the preset, then the dataset's (or a resumed
    # run's) settings, then explicit flags.
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    return PyramidFlowConfig.from_dict(
        PyramidFlowConfig().to_dict() | preset | base | _overrides(args))


# --- datasets ---------------------------------------------------------------------------------


def _data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset flags that matter for ``args.dataset``, checked, as JSON-able values."""
    needed = {"mvtec": ("root", "category"), "btad": ("root", "product"), "folder": ("good",),
              "synthetic": ("kind",)}[args.dataset]
    missing = [f"--{name}" for name in needed if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--dataset {args.dataset} needs {' and '.join(missing)}")
    spec: dict[str, Any] = {"dataset": args.dataset}
    keys = {"mvtec": ("root", "category"), "btad": ("root", "product"),
            "folder": ("good", "test_good", "defective", "masks"),
            "synthetic": ("kind", "train_images", "test_images", "data_seed")}[args.dataset]
    for key in keys:
        value = getattr(args, key)
        spec[key] = str(value) if isinstance(value, Path) else value
    return spec


def _category(spec: dict[str, Any]) -> str:
    """The results' name of a dataset: its category, product or kind, or ``parent-folder``."""
    if spec["dataset"] == "folder":
        good = Path(spec["good"]).resolve()  # e.g. parts/ok: "parts-ok", not a bare "ok"
        return f"{good.parent.name}-{good.name}"
    return str(spec[{"mvtec": "category", "btad": "product", "synthetic": "kind"}[
        spec["dataset"]]])


def _datasets(spec: dict[str, Any], image_size: int, split: str) -> Any:
    """The ``split`` ("train" or "test") dataset of a spec; None for a folder without a test."""
    kind = spec["dataset"]
    if kind == "mvtec":
        return MVTecAD(spec["root"], spec["category"], split, image_size)
    if kind == "btad":
        return BTAD(spec["root"], spec["product"], split, image_size)
    if kind == "synthetic":
        count = spec["train_images"] if split == "train" else spec["test_images"]
        return SyntheticDefects(spec["kind"], split, count, image_size, seed=spec["data_seed"])
    if split == "train":
        return ImageFolder(spec["good"], image_size=image_size)
    if spec["defective"] is None and spec["test_good"] is None:
        return None
    test = ImageFolder(spec["test_good"] or spec["good"], spec["defective"], spec["masks"],
                       image_size=image_size)
    if spec["test_good"] is None:
        # The normal images of --good were trained on; testing on them would flatter the model.
        test.records = [record for record in test.records if record.label == 1]
        logger.info("no --test-good folder: the test set has defective images only")
    return test


# --- commands ---------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = _make_config(DEMO_DEFAULTS, args)
    folders = {kind: args.out / kind for kind in _DEMO_KINDS}
    held = _run_contents(args.out, _RUN_FILES) + [
        f"{kind}/{name}" for kind, folder in folders.items() for name in _run_contents(folder)]
    _refuse_a_held_folder(args.out, held, args.overwrite, resumable=False)
    specs = {kind: {"dataset": "synthetic", "kind": kind, "train_images": args.train_images,
                    "test_images": args.test_images, "data_seed": args.data_seed}
             for kind in _DEMO_KINDS}
    # Both categories are checked before either trains: nothing is written until all pass.
    data = {kind: _prepare(config, specs[kind], folders[kind], resume=None, evaluate=True)
            for kind in _DEMO_KINDS}
    if args.overwrite:
        _clear_run(args.out)
        for folder in folders.values():
            _clear_run(folder)
    results, baseline = {}, {}
    for kind in _DEMO_KINDS:
        train_set, test_set, _ = data[kind]
        detector = _fit(config, specs[kind], folders[kind], args, None, data[kind])
        results[kind] = _report(detector, test_set, folders[kind], args.panels,
                                full_range_aupro=False, workers=args.workers)
        # The same model without a training step: what training adds over it is the point.
        untrained = Detector(config, device=args.device, epochs=0).fit(
            train_set, num_workers=args.workers)
        baseline[kind] = untrained.evaluate(test_set, num_workers=args.workers)
    write_results(results, args.out, extra={"config": config.to_dict(),
                                            "untrained": baseline})
    elapsed = time.perf_counter() - started
    print(f"Untrained baseline (same model and template, no training step):\n"
          f"{results_table(baseline)}\n\nTrained ({config.epochs} epochs):")
    print(results_table(results))
    print(f"\ndemo finished in {elapsed:.1f} s; results, heatmaps and templates in {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    where: Distributed | None = args.where
    writes = where is None or where.is_main
    # Under torchrun every process checks (reading only); a failure on one stops all.
    with together(where):
        spec = _data_spec(args)
        base = mvtec_defaults(spec["category"]) if spec["dataset"] == "mvtec" else {}
        folder = args.out or Path("runs") / f"{spec['dataset']}-{_category(spec)}"
        resume = _resume_source(args, folder, spec)
        if resume is not None:
            base = load_checkpoint(resume)["config"].to_dict()
        config = _make_config(base, args)
        distributed.check_batch_size(config.batch_size, where)
        train_set, test_set = _check_run(config, spec, resume, evaluate=args.evaluate)
    created = None
    with together(where):  # after every process has read the folder: only then write
        if writes:
            created = _make_run_folders(folder)
            if args.overwrite:
                _clear_run(folder)
    detector = _fit(config, spec, folder, args, resume, (train_set, test_set, created))
    if not writes:
        return 0
    if test_set is not None:
        results = {_category(spec): _report(detector, test_set, folder, args.panels,
                                            args.full_range_aupro, args.workers)}
        write_results(results, folder, extra={"config": config.to_dict()})
        print(results_table(results))
    elif args.evaluate:
        logger.info("no test images (pass --defective and --test-good): not evaluated")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    checkpoint, folder = _resolve_source(args.source)
    detector = Detector.load(checkpoint, device=args.device)
    if args.dataset is None:
        stored = folder / "data.json"
        if not stored.is_file():
            raise ValueError(f"pass --dataset and its flags: {folder} has no data.json")
        spec = json.loads(stored.read_text())
    else:
        spec = _data_spec(args)
    test_set = _datasets(spec, detector.config.image_size, "test")
    if test_set is None:
        raise ValueError("the folder dataset has no test images: pass --defective "
                         "(and --masks, --test-good)")
    out = args.out or folder
    results = {_category(spec): _report(detector, test_set, out, args.panels,
                                        args.full_range_aupro, args.workers)}
    write_results(results, out, extra={"config": detector.config.to_dict(),
                                       "checkpoint": str(checkpoint)})
    print(results_table(results))
    return 0


def _predict(args: argparse.Namespace) -> int:
    checkpoint, folder = _resolve_source(args.source)
    detector = Detector.load(checkpoint, device=args.device)
    images = ImageFolder(args.images, image_size=detector.config.image_size)
    out = args.out or folder / "predictions" / args.images.name
    prediction = detector.predict(images, batch_size=detector.config.batch_size)
    thresholds = detector.thresholds
    # With thresholds, a fixed scale puts the pixel threshold mid-colormap in every call.
    scale = ((0.0, 2 * thresholds.pixel) if thresholds is not None
             else color_range(prediction.maps.numpy()))
    template = _template(detector)
    rows = []
    for index, record in enumerate(images.records):
        sample = images[index]
        save_panel(out / "heatmaps" / f"{record.image.stem}.png", sample["image"].numpy(),
                   prediction.maps[index].numpy(), template=template, color_scale=scale,
                   mask=None if prediction.masks is None else prediction.masks[index].numpy(),
                   mask_title="predicted defects")
        verdict = ("unknown" if prediction.verdicts is None
                   else "defective" if prediction.verdicts[index] else "normal")
        rows.append({
            "path": str(record.image),
            "score": float(prediction.scores[index]),
            "verdict": verdict,
            "defective_pixels": None if prediction.masks is None
            else float(prediction.masks[index].float().mean()),
        })
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(out / "scores.csv", table.getvalue())
    write_text_atomically(out / "scores.json", json.dumps({
        "checkpoint": str(checkpoint),
        "thresholds": None if thresholds is None else dataclasses.asdict(thresholds),
        "resolution": [detector.config.image_size] * 2,
        "images": rows,
    }, indent=2) + "\n")
    defective = sum(row["verdict"] == "defective" for row in rows)
    print(f"{len(rows)} images, {defective} judged defective; scores and heatmaps in {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    checkpoint, folder = _resolve_source(args.source)
    out = args.out or folder / _EXPORT_FILES[args.format]
    # Everything is checked before the (slow) export and the write.
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, received {args.batch_size}")
    if args.format == "onnx":
        try:
            check_onnx()
        except ImportError as error:
            raise RuntimeError(str(error)) from error
    if out.is_dir():
        raise ValueError(f"--out '{out}' is a folder; name the file to write")
    if out.exists() and not args.overwrite:
        raise ValueError(f"'{out}' already exists; pass --overwrite to replace it")
    check_writable(out.parent)
    detector = Detector.load(checkpoint)
    if detector.model is None or detector.model.template is None:
        raise ValueError(f"'{checkpoint}' holds no fitted model (no latent template: a "
                         "checkpoint of an unfinished run); export the run's model.pt")
    export(detector, out, args.format, batch_size=args.batch_size)
    size = detector.config.image_size
    batch = args.batch_size or ("B" if args.format == "onnx" else 1)
    print(f"wrote {out} ({args.format}): images ({batch}, 3, {size}, {size}) in "
          f"[0, 1] -> maps ({batch}, {size}, {size}), scores ({batch},)")
    if detector.thresholds is not None:
        print(f"thresholds: image score > {detector.thresholds.image:.6g} is defective, "
              f"pixel > {detector.thresholds.pixel:.6g} is a defect")
    return 0


# --- shared steps -----------------------------------------------------------------------------


def _resume_source(args: argparse.Namespace, folder: Path,
                   spec: dict[str, Any]) -> Path | None:
    """The checkpoint ``train`` resumes from, or None; refuses what would mix two runs."""
    held = _run_contents(folder)
    if args.resume is None:
        _refuse_a_held_folder(folder, held, args.overwrite, resumable=True)
        return None
    if args.overwrite:
        raise ValueError("--overwrite and --resume exclude each other: --overwrite removes the "
                         "run that --resume would continue")
    own = folder / "checkpoints"
    if args.resume == _LATEST:
        resume = latest_checkpoint(own)
    else:
        resume = Path(args.resume)
        if not resume.is_file():
            raise FileNotFoundError(f"checkpoint '{resume}' to resume from does not exist")
        if held and resume.resolve().parent != own.resolve():
            raise ValueError(f"run folder '{folder}' already holds a run; continuing "
                             f"'{resume}' there would mix two runs: pick another --out, or "
                             "pass --resume without a value to continue the folder's own run")
        if held and latest_checkpoint(own).resolve() != resume.resolve():
            raise ValueError(f"'{resume}' is not the latest checkpoint in '{own}' "
                             f"({latest_checkpoint(own).name} is): its continuation would mix "
                             "with the later ones; resume the latest, or remove the later ones")
    stored = folder / "data.json"
    if stored.is_file():
        previous = json.loads(stored.read_text())
        changed = sorted(k for k in set(previous) | set(spec)
                         if not _same_data_value(k, previous.get(k), spec.get(k)))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {spec.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume the run in '{folder}' on other data ({details}); "
                             "give the same dataset flags")
    return resume


def _same_data_value(key: str, stored: Any, given: Any) -> bool:
    if key in _PATH_KEYS and isinstance(stored, str) and isinstance(given, str):
        return Path(stored).resolve() == Path(given).resolve()  # ./a/b is a/b
    return stored == given


def _run_contents(folder: Path, files: Sequence[str] = _RUN_FILES) -> list[str]:
    """The run files and non-empty run folders present in ``folder``."""
    found = [name for name in files if (folder / name).is_file()]
    return found + [f"{name}/" for name in _RUN_FOLDERS
                    if (folder / name).is_dir() and any((folder / name).iterdir())]


def _refuse_a_held_folder(folder: Path, held: list[str], overwrite: bool,
                          resumable: bool) -> None:
    if held and not overwrite:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        resume = "--resume to continue it, " if resumable else ""
        raise ValueError(f"run folder '{folder}' already holds a run ({listed}); pass "
                         f"{resume}--overwrite to replace it, or another --out")


def _clear_run(folder: Path) -> None:
    """Remove the files and folders a run writes (only those) from ``folder``."""
    for name in _RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in _RUN_FOLDERS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def _prepare(config: PyramidFlowConfig, spec: dict[str, Any], folder: Path,
             resume: Path | None, evaluate: bool) -> tuple[Any, Any, Path | None]:
    """Check everything a run needs before it writes anything; returns its datasets.

    Checks the data layout and every mask (sizes, orphans, empty masks), that a batch is left
    after the hold-out, the checkpoint to resume, the model's construction, and that the run
    folder and its ``checkpoints/`` can be written (creating them).

    Returns:
        ``(train_set, test_set, created)``: ``test_set`` is None without evaluation or test
        images; ``created`` is the outermost folder made here, None if the folder existed.
    """
    return (*_check_run(config, spec, resume, evaluate), _make_run_folders(folder))


def _check_run(config: PyramidFlowConfig, spec: dict[str, Any], resume: Path | None,
               evaluate: bool) -> tuple[Any, Any]:
    """The reading half of :func:`_prepare`: ``(train_set, test_set)``, checked."""
    train_set = _datasets(spec, config.image_size, "train")
    test_set = _datasets(spec, config.image_size, "test") if evaluate else None
    for dataset in (train_set, test_set):
        if isinstance(dataset, AnomalyImageDataset):
            dataset.validate()
    _, holdout = training_split(config, len(train_set))
    if resume is not None:
        check_resume(resume, config, holdout)
    PyramidFlow(config)  # a bad setting or a missing ResNet weights file fails here
    return train_set, test_set


def _make_run_folders(folder: Path) -> Path | None:
    """The writing half of :func:`_prepare`: make the folders, check they can be written.

    Returns:
        The outermost folder made here, None if ``folder`` existed.
    """
    created = _missing_ancestor(folder)
    try:
        check_writable(folder / "checkpoints")
        check_writable(folder)
    except OSError:
        if created is not None:
            _remove_empty_folders(folder / "checkpoints", created)
        raise
    return created


def _missing_ancestor(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet, if any."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _remove_empty_folders(innermost: Path, outermost: Path) -> None:
    """Remove ``innermost`` and its parents up to ``outermost`` while they are empty."""
    if outermost not in (innermost, *innermost.parents):
        return
    for path in (innermost, *innermost.parents):
        if not path.is_dir() or any(path.iterdir()):
            return
        path.rmdir()
        if path == outermost:
            return


def _fit(config: PyramidFlowConfig, spec: dict[str, Any], folder: Path,
         args: argparse.Namespace, resume: Path | None, prepared: tuple[Any, Any, Path | None]
         ) -> Detector:
    """Train a detector for a checked run folder, then write its model, config and data spec.

    Written only after training succeeds, so a failed run leaves at most its checkpoints (to
    resume from) and never a config that describes no model; a folder made by
    :func:`_prepare` that stays empty is removed again. Under torchrun only process 0 writes.
    """
    train_set, _, created = prepared
    logger.info("training %s on %d images at %d×%d", folder.name, len(train_set),
                config.image_size, config.image_size)
    started = time.perf_counter()
    try:
        detector = Detector(config, device=args.device).fit(
            train_set, checkpoint_dir=folder / "checkpoints", resume=resume,
            num_workers=args.workers, progress=args.progress)
    except BaseException:
        if created is not None:
            _remove_empty_folders(folder / "checkpoints", created)
        raise
    if args.where is not None and not args.where.is_main:
        return detector
    logger.info("trained %s in %.1f s", folder.name, time.perf_counter() - started)
    detector.save(folder / _MODEL_FILE)
    write_text_atomically(folder / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    write_text_atomically(folder / "data.json", json.dumps(spec, indent=2) + "\n")
    template = _template(detector)
    if template is not None:
        save_image(folder / "image_template.png", template, min_side=128)
    return detector


def _template(detector: Detector) -> Any:
    if detector.config.front != "lifting":
        return None  # the ResNet-18 stem has no inverse, hence no image template
    return detector.image_template().numpy()


def _report(detector: Detector, test_set: AnomalyImageDataset | SyntheticDefects, folder: Path,
            panels: int, full_range_aupro: bool, workers: int) -> dict[str, Any]:
    """Metrics of a test set, plus heatmap panels of its first images (defective first)."""
    if detector.model is None:
        raise RuntimeError("cannot evaluate a detector that is not fitted")
    maps, masks, labels, scores = collect_maps(detector.model, test_set,
                                               batch_size=detector.config.batch_size,
                                               num_workers=workers)
    has_masks = getattr(test_set, "has_masks", True)
    metrics = metrics_from_maps(maps, masks, labels, image_scores=scores, has_masks=has_masks,
                                full_range_aupro=full_range_aupro)
    template = _template(detector)
    scale = color_range(maps.numpy())
    chosen = sorted(range(len(labels)), key=lambda i: -int(labels[i]))[:max(panels, 0)]
    for index in chosen:
        sample = test_set[index]
        source = Path(sample["path"])  # e.g. .../test/crack/000.png: name it crack-000.png
        save_panel(folder / "heatmaps" / f"{source.parent.name}-{source.stem}.png",
                   sample["image"].numpy(), maps[index].numpy(), template=template,
                   color_scale=scale, mask=masks[index].numpy() if has_masks else None)
    return metrics


def _resolve_source(source: Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` of a run folder or a checkpoint file."""
    if source.is_dir():
        checkpoint = source / _MODEL_FILE
        if not checkpoint.is_file():
            raise FileNotFoundError(f"run folder '{source}' has no {_MODEL_FILE}; pass a "
                                    "checkpoint file instead, e.g. checkpoints/epoch-NNN.pt")
        return checkpoint, source
    if not source.is_file():
        raise FileNotFoundError(f"'{source}' is neither a run folder nor a checkpoint file")
    folder = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    return source, folder
