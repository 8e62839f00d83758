"""The command line end to end at tiny sizes: demo, predict, evaluate, train and resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.pyramidflow.cli import build_parser, main
from examples.pyramidflow.train import load_checkpoint

__all__: list[str] = []

TINY_FLAGS = ["--channels", "4", "--levels", "3", "--depth", "1", "--kernel-size", "3",
              "--no-progress", "--quiet"]

# The tiny demo (32 px, one epoch, 12 images) checks the pipeline, not training: on the demo
# data, made hard enough that training matters, its one epoch barely moves the untrained
# model, which reached pixel AUROC 0.91 (texture) and 0.91 (object) at data seed 0 with the
# local-nearest score (0.72 and 0.81 with the former mean-template score, 0.59-0.90 over data
# seeds 0-5). A map that missed the defects (shifted, flipped, noise) would score
# near 0.5. Whether training helps is tested on real photographs in test_training_matters.
MIN_PIXEL_AUROC = 0.65


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    status = main(["demo", "--out", str(out), "--image-size", "32", "--epochs", "1",
                   "--train-images", "12", "--test-images", "12", "--panels", "2",
                   *TINY_FLAGS])
    assert status == 0
    return out


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["evaluate"], ["predict"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m examples.pyramidflow" in capsys.readouterr().out


def test_train_help_states_the_run_folder_and_mask_rules(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--overwrite", "refused unless --overwrite", "the architecture must match",
                   "every non-zero mask pixel is a defect", "temporary name and renamed"):
        assert phrase in text, phrase


def test_booleans_are_flags_not_strings():
    parser = build_parser()
    assert getattr(parser.parse_args(["demo", "--augment"]), "config.augment") is True
    assert getattr(parser.parse_args(["demo", "--no-augment"]), "config.augment") is False
    assert not hasattr(parser.parse_args(["demo"]), "config.augment")  # the config decides
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--augment", "False"])


def test_preset_flag_sets_the_public_code_recipe_and_explicit_flags_win():
    from examples.pyramidflow.cli import _make_config

    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "synthetic", "--kind", "texture",
                              "--preset", "paper-code", "--resize", "bilinear"])
    config = _make_config({"levels": 2}, args)
    assert (config.pyramid, config.order, config.train_lifting) == (
        "blur_maxpool", "odd_first", False)
    assert config.resize == "bilinear" and config.levels == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--preset", "paper"])


def test_demo_writes_a_run_and_localises_defects(demo_run):
    for kind in ("texture", "object"):
        folder = demo_run / kind
        for name in ("config.json", "data.json", "model.pt", "image_template.png",
                     "checkpoints/epoch-001.pt"):
            assert (folder / name).is_file(), name
        assert len(list((folder / "heatmaps").glob("*.png"))) == 2
    results = json.loads((demo_run / "results.json").read_text())
    for kind in ("texture", "object"):
        metrics = results["categories"][kind]
        assert metrics["resolution"] == [32, 32]
        assert metrics["pixel_auroc"] >= MIN_PIXEL_AUROC, (kind, metrics)
    for kind in ("texture", "object"):  # the untrained baseline is reported beside it
        assert set(results["untrained"][kind]) >= {"pixel_auroc", "aupro_0.3", "image_auroc"}
    table = (demo_run / "results.md").read_text()
    assert "| texture |" in table and "| **mean** |" in table and "32×32 pixels" in table


def test_predict_reads_grayscale_and_rgba_images(demo_run, tmp_path):
    images = tmp_path / "incoming"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(images / "g.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA").save(
        images / "a.png")
    out = tmp_path / "predicted"
    assert main(["predict", str(demo_run / "object"), str(images), "--out", str(out),
                 "--quiet"]) == 0
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["path"]).name for row in rows] == ["a.png", "g.png"]
    assert {row["verdict"] for row in rows} <= {"normal", "defective"}
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["a.png", "g.png"]
    assert len(json.loads((out / "scores.json").read_text())["images"]) == 2


def test_evaluate_a_run_folder_with_full_range_aupro(demo_run, tmp_path):
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(demo_run / "texture"), "--out", str(out),
                 "--full-range-aupro", "--panels", "0", "--quiet"]) == 0
    metrics = json.loads((out / "results.json").read_text())["categories"]["texture"]
    assert metrics["aupro_full_range"] >= metrics["aupro_0.3"]
    assert "AUPRO full range (not comparable)" in (out / "results.md").read_text()


def test_train_then_resume_from_the_latest_checkpoint(tmp_path):
    run = ["train", "--dataset", "synthetic", "--kind", "object", "--train-images", "8",
           "--image-size", "16", "--out", str(tmp_path), "--no-evaluate", *TINY_FLAGS]
    assert main([*run, "--epochs", "1"]) == 0
    assert main([*run, "--epochs", "2", "--resume"]) == 0
    assert load_checkpoint(tmp_path / "checkpoints" / "epoch-002.pt")["epoch"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(("arguments", "message"), [
    (["train", "--dataset", "mvtec"], "--dataset mvtec needs --root and --category"),
    (["demo", "--image-size", "30", "--levels", "3"], "must be divisible by 4"),
    (["demo", "--holdout", "1.5"], r"config.holdout must be in [0, 1), received 1.5"),
    (["predict", "nowhere", "images"], "neither a run folder nor a checkpoint"),
])
def test_errors_are_one_clear_line(arguments, message, capsys):
    assert main([*arguments, "--quiet"]) == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
