"""Exporting a fitted PyramidFlow for deployment, as an ONNX or a TorchScript file.

The exported model maps a float32 batch of images ``(B, 3, S, S)`` in ``[0, 1]`` (``S`` the
config's ``image_size``; ``B`` any batch size, or the one given at export) to
``(maps, scores)``: the anomaly maps ``(B, S, S)`` and image scores ``(B,)`` of
:meth:`Detector.predict` (:meth:`PyramidFlow.localize`). The weights, the latent
template, the spread and the bank of training latents are constants of the file, so it runs
with ``onnxruntime`` or ``torch.jit.load`` alone, without this package or autoflow. It neither
resizes nor checks its input (resize to ``S × S`` first, as the detector does with antialiased
bilinear interpolation); decision thresholds stay in the run's ``model.pt``.

How: ``torch.export`` traces :class:`AnomalyMapModel` into a graph of plain tensor operations
(autoflow's Python-side shape checks run once, at trace time); the log-determinants, which
inference discards, are pruned from it; the graph is then converted to ONNX, or traced to
TorchScript. In ONNX the batch size is symbolic (the ``images`` input's first axis has a
name, not a size) unless one is fixed at export (``batch_size=N``, for runtimes that want
static shapes); a TorchScript trace records sizes as constants, so there it is always fixed
(default 1).

Example:
    >>> import torch
    >>> from examples.pyramidflow.config import PyramidFlowConfig
    >>> from examples.pyramidflow.inference import latent_statistics
    >>> model = PyramidFlow(PyramidFlowConfig(channels=4, levels=2, depth=1, kernel_size=3,
    ...                                       image_size=8))
    >>> model.set_template(latent_statistics(model, torch.rand(4, 3, 8, 8)))
    >>> maps, scores = AnomalyMapModel(model)(torch.rand(2, 3, 8, 8))
    >>> tuple(maps.shape), tuple(scores.shape)
    ((2, 8, 8), (2,))
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import write_atomically
from .model import PyramidFlow

__all__ = ["FORMATS", "AnomalyMapModel", "check_onnx", "export", "export_onnx", "export_program",
           "export_torchscript"]

FORMATS = ("onnx", "torchscript")
"""The file formats :func:`export` writes."""

_ONNX_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB limit on one file, with room for the graph
_INPUT_NAMES = ["images"]
_OUTPUT_NAMES = ["maps", "scores"]
# A deprecation inside torch's own export code, not in this module's calls.
_TORCH_NOTICE = ".*isinstance.treespec, LeafSpec"


class AnomalyMapModel(nn.Module):
    """A fitted PyramidFlow as one function: images to anomaly maps and image scores.

    Holds a private eval-mode copy of ``model`` on the CPU, in float32, without the
    memory-saving engine (inference needs none); its template, spread and bank are buffers,
    which export bakes into the file. With ``config.test_time_flips`` the maps of the 8 flips
    and 90° rotations are averaged, as :func:`~.inference.batch_maps` does.

    Args:
        model: A PyramidFlow whose template is set (fitted, or
            :meth:`PyramidFlow.set_template` called).

    Raises:
        RuntimeError: If ``model`` has no latent template.
    """

    def __init__(self, model: PyramidFlow) -> None:
        super().__init__()
        if model.template is None or model.spread is None:
            raise RuntimeError("cannot export a model without a latent template: fit it first")
        self.model = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
        self.model.flow.memory_saving = False
        self.size = model.config.image_size
        self.flips = model.config.test_time_flips
        for name in ("template", "spread", "bank"):
            values = getattr(self.model, name)
            if values is None:
                continue
            for level, value in enumerate(values):
                self.register_buffer(f"{name}_{level}", value)
            # The copy reads the very tensors registered here, so a tracer sees buffers.
            setattr(self.model, name, tuple(getattr(self, f"{name}_{level}")
                                            for level in range(len(values))))
        for module in self.model.modules():
            # LiftingConv1x1 checks its weight's rank on every call, with a Python branch on
            # the weight's values, which a tracer cannot follow; the weights are frozen here,
            # so check once now and not again.
            if callable(getattr(module, "_check_rank", None)):
                module._check_rank()
                module._check_rank = _checked

    def _maps(self, images: Tensor) -> Tensor:
        return self.model.anomaly_map(self.model.scored_states(images), (self.size, self.size))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(maps (B, S, S), scores (B,))`` of ``(B, 3, S, S)`` images in ``[0, 1]``."""
        if not self.flips:
            maps = self._maps(images)
        else:
            maps = torch.zeros_like(images[:, 0])
            for turns in range(4):
                for flip in (False, True):
                    view = (images.flip(-1) if flip else images).rot90(turns, (-2, -1))
                    found = self._maps(view).rot90(-turns, (-2, -1))
                    maps = maps + (found.flip(-1) if flip else found)
            maps = maps / 8
        return self.model.localize(maps)


def _checked() -> None:
    """Stands in for a check already passed (see :class:`AnomalyMapModel`)."""


def _scorer(source: Any) -> AnomalyMapModel:
    """An :class:`AnomalyMapModel` of a Detector, a PyramidFlow or an AnomalyMapModel."""
    if isinstance(source, AnomalyMapModel):
        return source
    if isinstance(source, PyramidFlow):
        return AnomalyMapModel(source)
    if hasattr(source, "thresholds") and hasattr(source, "model"):  # a Detector
        if source.model is None:
            raise RuntimeError("cannot export a detector that is not fitted: call fit() or "
                               "Detector.load(path) first")
        return AnomalyMapModel(source.model)
    raise TypeError("expected a Detector, a PyramidFlow or an AnomalyMapModel, received "
                    f"{type(source).__name__}")


def _check_batch_size(batch_size: int | None) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be None (any) or an int of at least 1, received "
                         f"{batch_size!r}")
    return batch_size


def export_program(source: Any, *, batch_size: int | None = None
                   ) -> torch.export.ExportedProgram:
    """``source``'s anomaly maps and scores as a graph of tensor operations.

    Args:
        source: A fitted :class:`~.detector.Detector`, a PyramidFlow with a template, or an
            :class:`AnomalyMapModel`.
        batch_size: Images per call of the exported model; None (the default): any number.

    Returns:
        The exported program, its log-determinant computations pruned.
    """
    scorer = _scorer(source)
    size = scorer.size
    fixed = _check_batch_size(batch_size)
    # An example batch of 2, not 1: torch.export would specialise a size-1 axis to the constant.
    example = torch.rand(fixed or 2, 3, size, size, generator=torch.Generator().manual_seed(0))
    dynamic = None if fixed else ({0: torch.export.Dim("batch", min=1)},)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCH_NOTICE, FutureWarning)
        program = torch.export.export(scorer, (example,), dynamic_shapes=dynamic, strict=False)
    graph = program.graph_module.graph
    # Metadata assertions keep otherwise unused branches (the discarded log-dets, with their
    # QR factorisation that ONNX lacks) alive; the module documents that it checks no input.
    for node in list(graph.nodes):
        if node.op == "call_function" and "assert_tensor_metadata" in str(node.target):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    program.graph_module.recompile()
    return program


def export_torchscript(source: Any, path: str | os.PathLike[str], *,
                       batch_size: int = 1) -> Path:
    """Write a TorchScript file of ``source``'s anomaly maps and scores (see the module).

    Load it with ``torch.jit.load(path)``; calling it on ``(batch_size, 3, S, S)`` images
    returns ``(maps, scores)`` (a trace: other batch sizes are refused or wrong).

    Args:
        source: A fitted :class:`~.detector.Detector`, a PyramidFlow with a template, or an
            :class:`AnomalyMapModel`.
        path: The file to write (atomically: whole or not at all).
        batch_size: Images per call.

    Returns:
        The file's path.
    """
    if batch_size is None:
        raise ValueError("a TorchScript trace fixes the batch size: give an int, or export to "
                         "onnx for any batch size")
    program = export_program(source, batch_size=batch_size)
    module = program.module()
    example = torch.rand(*program.example_inputs[0][0].shape)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit's deprecation notice: TorchScript is still what many runtimes load.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The exported graph's input-shape assertion: constant here, as the shape is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,))
        return write_atomically(path, lambda partial: torch.jit.save(traced, str(partial)))


def export_onnx(source: Any, path: str | os.PathLike[str], *, batch_size: int | None = None,
                opset: int | None = None, optimize: bool = True) -> Path:
    """Write an ONNX file of ``source``'s anomaly maps and scores (see the module).

    The input is named ``images``, the outputs ``maps`` and ``scores``::

        session = onnxruntime.InferenceSession(path)
        maps, scores = session.run(None, {"images": images.numpy()})

    Args:
        source: A fitted :class:`~.detector.Detector`, a PyramidFlow with a template, or an
            :class:`AnomalyMapModel`.
        path: The file to write (atomically: whole or not at all), weights included.
        batch_size: Images per call; None (the default): any number (a symbolic axis).
        opset: ONNX opset version; torch's recommended one when None.
        optimize: Simplify the ONNX graph (constant folding, dead code) before writing it, as
            ``torch.onnx.export`` does by default. ``False`` writes the graph as exported, the
            same maps and scores (onnxruntime optimises it again when it loads it), 3 to 4
            times faster: the optimiser takes most of an export's time.

    Returns:
        The file's path.

    Raises:
        ImportError: Without the ``onnx`` and ``onnxscript`` packages (``pip install
            'autoflow[export]'``).
        ValueError: If the weights and constants exceed the 2 GiB an ONNX file can hold, or
            ``optimize`` is not a bool.
    """
    if not isinstance(optimize, bool):
        raise ValueError(f"optimize must be True or False, received {optimize!r}")
    check_onnx()
    scorer = _scorer(source)
    held = sum(t.numel() * t.element_size() for t in (*scorer.parameters(), *scorer.buffers()))
    if held > _ONNX_LIMIT:
        raise ValueError(f"the model's weights and constants take {held / 2**30:.2f} GiB, more "
                         "than one ONNX file can hold (2 GiB): export to torchscript instead")
    program = export_program(scorer, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCH_NOTICE, FutureWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=_INPUT_NAMES,
                                         output_names=_OUTPUT_NAMES, opset_version=opset,
                                         optimize=optimize, verbose=False)
    return write_atomically(path, lambda partial: onnx_program.save(str(partial),
                                                                    external_data=False))


def check_onnx() -> None:
    """Raise ImportError, naming the extra to install, if ONNX export is unavailable."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as error:
            raise ImportError(f"ONNX export needs the '{package}' package: pip install "
                              "'autoflow[export]' (onnx, onnxscript, onnxruntime)") from error


def export(source: Any, path: str | os.PathLike[str], format: str, *,
           batch_size: int | None = None) -> Path:
    """Write ``source`` to ``path`` as ``format``, one of :data:`FORMATS`.

    ``batch_size=None``: any batch size in ONNX, 1 in TorchScript (see the module).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, received {format!r}")
    if format == "onnx":
        return export_onnx(source, path, batch_size=batch_size)
    return export_torchscript(source, path, batch_size=1 if batch_size is None else batch_size)
