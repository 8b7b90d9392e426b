"""oneDNN-prepacked linear layers for CPU inference.

On CPU, `nn.Linear` goes to MKL's sgemm, which on this project's AMD EPYC machines runs far below the
core's peak and packs the weight again on every call. That shows most at decoding batch sizes (a few
rows): one step at batch 8 cost ~2x a step at batch 1, although a step should mostly cost one pass over
the weights. oneDNN's linear with the weight reordered once into its blocked layout is the kernel
PyTorch's own compiler uses for frozen CPU linears (inductor's `freezing`, the `mkldnn._linear_pointwise`
op); calling it directly gives the same kernel without compiling a graph per batch shape.

Measured on SmolLM2-135M, 1 thread (`benchmarks/README.md`): a decode step went from 39 to 25 ms at batch 1
and from 77 to 41 ms at batch 8, and prefill from ~2.3 to ~1.2 ms per token. Logits differ from MKL's by
float rounding only (the check below bounds it).

Inference only: the packed weight is a copy outside autograd, so a prepacked model cannot be trained.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class PrepackedLinear(torch.nn.Module):
    """`nn.Linear` for inference, computed by oneDNN with its weight reordered once at construction."""

    def __init__(self, linear: torch.nn.Linear, batch_size_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # Buffers, not parameters: they move with .to() but never reach an optimizer or a state_dict save path
        # that expects the plain layout.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint),
                             persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_supported(model: torch.nn.Module) -> bool:
    """oneDNN is built in and the model sits on the CPU in float32 or bfloat16."""
    if not torch.backends.mkldnn.is_available():
        return False
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cpu" and parameter.dtype in (
        torch.float32, torch.bfloat16
    )


def _agrees(linear: torch.nn.Linear, packed: PrepackedLinear) -> bool:
    """The packed layer computes what the plain one does, up to float rounding (checked once per shape)."""
    probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
    with torch.no_grad():
        expected, got = linear(probe), packed(probe)
    tolerance = 1e-3 if expected.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(expected.float(), got.float(), rtol=tolerance, atol=tolerance))


def prepack_linear_layers(model: torch.nn.Module, batch_size_hint: int = 8) -> int:
    """Replace every `nn.Linear` of an inference model with a `PrepackedLinear`; returns how many were replaced.

    Leaves a layer as it is where the packed kernel is missing or disagrees with the plain one on a probe, and
    the whole model where oneDNN is missing or the model is not on the CPU, so callers can always ask for it.
    """
    if not prepack_supported(model):
        return 0
    linears = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear  # not subclasses (e.g. LoRA-wrapped layers): merge adapters first
    ]
    checked: dict[tuple[int, int, bool], bool] = {}
    replaced = 0
    # One layer at a time, so a large model never holds two full copies of its weights. A half-packed model is
    # still correct: every packed shape was checked before it was used.
    for parent, name, linear in linears:
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        try:
            packed = PrepackedLinear(linear, batch_size_hint)
            if shape not in checked:
                checked[shape] = _agrees(linear, packed)
        except (RuntimeError, AttributeError) as exc:  # op missing or refused in this torch build
            logger.warning("oneDNN weight prepacking unavailable (%s): keeping nn.Linear", exc)
            break
        if not checked[shape]:
            logger.warning("oneDNN prepacked linear disagrees with nn.Linear for %s: keeping nn.Linear", shape)
            continue
        setattr(parent, name, packed)
        replaced += 1
    if replaced:
        _own_remaining_parameters(model)
    return replaced


def _own_remaining_parameters(model: torch.nn.Module) -> None:
    """Copy the parameters left (embeddings, norms) out of the checkpoint's memory map.

    transformers maps the safetensors file and the parameters are views of it; packing read every page of it,
    so the whole file stayed resident (~the model's size again in RSS) for as long as any parameter still
    pointed into it. Own copies let the map go."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
