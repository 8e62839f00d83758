"""Exported detectors (ONNX, TorchScript) give Detector.predict's maps and scores, standalone."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.pyramidflow import Detector
from examples.pyramidflow.cli import main
from examples.pyramidflow.export import (
    AnomalyMapModel,
    export,
    export_onnx,
    export_torchscript,
)
from examples.pyramidflow.model import PyramidFlow
from examples.pyramidflow.train import save_checkpoint

__all__: list[str] = []

try:
    import onnxruntime
except ImportError:  # the optional [export] extra
    onnxruntime = None

needs_onnxruntime = pytest.mark.skipif(
    onnxruntime is None, reason="ONNX export tests need onnx, onnxscript and onnxruntime: "
                                "pip install 'autoflow[export]'")

TOLERANCE = 1e-4
BATCH = 3


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"images": images.numpy()})
    return maps, scores


def _run_torchscript(path: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's notice
        module = torch.jit.load(str(path))
    maps, scores = module(images)
    return maps.numpy(), scores.numpy()


VARIANTS = {
    "local_nearest": {"score": "local_nearest"},
    "standardized": {"score": "standardized"},
    "difference": {"score": "difference"},
    "input_weight": {"score": "local_nearest", "input_weight": 0.5},  # two pyramids scored
}

RUNNERS = {
    "onnx": (export_onnx, _run_onnx),
    "torchscript": (export_torchscript, _run_torchscript),
}


@pytest.fixture(scope="module")
def detectors(normal_images) -> dict[str, Detector]:
    """One tiny detector per variant, trained for one epoch (thresholds included)."""
    settings = {"channels": 4, "levels": 3, "depth": 1, "kernel_size": 3, "image_size": 16,
                "epochs": 1, "batch_size": 4, "holdout": 0.25}
    return {name: Detector(**variant, **settings).fit(normal_images)
            for name, variant in VARIANTS.items()}


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("form", [
    pytest.param("onnx", marks=needs_onnxruntime),
    "torchscript",
])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_matches_predict(detectors, test_images, tmp_path, form, variant):
    detector = detectors[variant]
    write, run = RUNNERS[form]
    # The ONNX optimiser is covered by the other three variants; here it would take half a
    # minute more of the suite.
    options = {"optimize": False} if (form, variant) == ("onnx", "input_weight") else {}
    path = write(detector, tmp_path / f"model.{form}", batch_size=BATCH, **options)
    maps, scores = run(path, test_images)
    expected = detector.predict(test_images)
    assert maps.shape == (BATCH, 16, 16) and scores.shape == (BATCH,)
    np.testing.assert_allclose(maps, expected.maps.numpy(), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(scores, expected.scores.numpy(), rtol=0, atol=TOLERANCE)
    # The maps are not flat: a template or bank left out of the file would show here.
    assert expected.maps.std() > 100 * TOLERANCE


@needs_onnxruntime
def test_onnx_export_takes_any_batch_size(detectors, tmp_path):
    import onnx

    detector = detectors["local_nearest"]
    # No batch size: a symbolic one. Unoptimised, as the graph's optimiser takes 4 minutes
    # over a symbolic batch here (test_exported_model_matches_predict covers the optimiser).
    path = export_onnx(detector, tmp_path / "model.onnx", optimize=False)
    axis = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert axis.dim_param and not axis.HasField("dim_value")  # a name, not a size
    for batch in (1, 2, 5):
        images = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        maps, scores = _run_onnx(path, images)
        expected = detector.predict(images)
        assert maps.shape == (batch, 16, 16) and scores.shape == (batch,)
        np.testing.assert_allclose(maps, expected.maps.numpy(), rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(scores, expected.scores.numpy(), rtol=0, atol=TOLERANCE)


def test_onnx_optimize_must_be_a_bool(detectors, tmp_path):
    with pytest.raises(ValueError, match="optimize must be True or False, received 'no'"):
        export_onnx(detectors["difference"], tmp_path / "model.onnx", optimize="no")
    assert not any(tmp_path.iterdir())


def test_torchscript_needs_a_batch_size(detectors, tmp_path):
    with pytest.raises(ValueError, match="fixes the batch size"):
        export_torchscript(detectors["difference"], tmp_path / "model.pt", batch_size=None)
    with pytest.raises(ValueError, match="None \\(any\\) or an int of at least 1"):
        export_torchscript(detectors["difference"], tmp_path / "model.pt", batch_size=0)
    with pytest.raises(ValueError, match="None \\(any\\) or an int of at least 1"):
        export(detectors["difference"], tmp_path / "model.pt", "torchscript", batch_size=0)
    assert not any(tmp_path.iterdir())


def test_the_wrapper_copies_and_leaves_the_detector_alone(detectors, test_images):
    model = detectors["local_nearest"].model
    wrapper = AnomalyMapModel(model)
    assert wrapper.model is not model and model.flow.memory_saving
    with torch.no_grad():
        maps, scores = wrapper(test_images)
    expected = detectors["local_nearest"].predict(test_images)
    torch.testing.assert_close(maps, expected.maps)
    torch.testing.assert_close(scores, expected.scores)


def test_an_unfitted_model_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        export_torchscript(Detector(channels=4, levels=2, depth=1, kernel_size=3,
                                    image_size=8), tmp_path / "model.pt")
    with pytest.raises(TypeError, match="expected a Detector"):
        export_torchscript("model.pt", tmp_path / "model.pt")
    assert not any(tmp_path.iterdir())


def test_export_command_writes_a_model_that_runs_alone(detectors, test_images, tmp_path,
                                                         capsys):
    run = tmp_path / "run"
    detector = detectors["local_nearest"]
    detector.save(run / "model.pt")
    status = main(["export", str(run), "--format", "torchscript", "--batch-size", str(BATCH),
                   "--quiet"])
    assert status == 0, capsys.readouterr().err
    assert "thresholds: image score >" in capsys.readouterr().out
    maps, _ = _run_torchscript(run / "model.torchscript.pt", test_images)
    np.testing.assert_allclose(maps, detector.predict(test_images).maps.numpy(), atol=TOLERANCE)
    assert sorted(p.name for p in run.iterdir()) == ["model.pt", "model.torchscript.pt"]


@needs_onnxruntime
def test_export_command_onnx_to_a_named_file(detectors, test_images, tmp_path):
    run = tmp_path / "run"
    detector = detectors["difference"]
    detector.save(run / "model.pt")
    out = tmp_path / "deploy" / "detector.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--quiet"]) == 0
    maps, scores = _run_onnx(out, test_images[:1])
    np.testing.assert_allclose(scores, detector.predict(test_images[:1]).scores.numpy(),
                               atol=TOLERANCE)


def test_export_command_checks_before_writing(detectors, tmp_path, capsys):
    run = tmp_path / "run"
    detectors["difference"].save(run / "model.pt")

    def refused(*flags: str) -> str:
        assert main(["export", *flags, "--quiet"]) == 1
        return capsys.readouterr().err

    assert "neither a run folder nor a checkpoint" in refused(
        str(tmp_path / "missing"), "--format", "torchscript")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no model.pt" in refused(str(empty), "--format", "torchscript")
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", str(run), "--format", "tflite"])
    assert "invalid choice" in capsys.readouterr().err
    assert "--batch-size must be at least 1" in refused(str(run), "--format", "torchscript",
                                                        "--batch-size", "0")
    assert "is a folder" in refused(str(run), "--format", "torchscript", "--out", str(run))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in refused(str(run), "--format", "torchscript",
                                     "--out", str(blocker / "model.pt"))
    unfinished = run / "checkpoints" / "epoch-001.pt"
    save_checkpoint(unfinished, PyramidFlow(detectors["difference"].config), epoch=1)
    assert "no fitted model" in refused(str(unfinished), "--format", "torchscript",
                                        "--out", str(tmp_path / "out.pt"))
    existing = tmp_path / "taken.pt"
    existing.write_text("keep")
    assert "already exists" in refused(str(run), "--format", "torchscript",
                                       "--out", str(existing))
    assert existing.read_text() == "keep"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "model.pt"]
