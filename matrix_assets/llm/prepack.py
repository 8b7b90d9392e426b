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

Inference only: the packed weight is an opaque oneDNN tensor outside autograd. A prepacked model cannot be
trained, converted (`.to(dtype)`), deep-copied or saved; pack a model once it is in its final dtype and device.
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
        # Non-persistent buffers, not parameters: nothing trains them and no state_dict carries them.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint),
                             persistent=False)
        # A copy, so the layer never keeps the checkpoint's memory map alive.
        bias = None if linear.bias is None else linear.bias.detach().clone()
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
    try:
        with torch.no_grad():
            expected, got = linear(probe), packed(probe)
    except RuntimeError as exc:
        logger.warning("oneDNN prepacked linear fails for %s: %s", (linear.in_features, linear.out_features), exc)
        return False
    tolerance = 1e-3 if expected.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(expected.float(), got.float(), rtol=tolerance, atol=tolerance))


def prepack_linear_layers(model: torch.nn.Module, batch_size_hint: int = 8) -> int:
    """Replace every `nn.Linear` of an inference model with a `PrepackedLinear`; returns how many were packed.

    A layer stays as it is where the packed kernel disagrees with the plain one on a probe (checked once per
    shape), and the whole model where oneDNN is missing, the model is not on the CPU, or this torch build lacks
    the ops, so callers can always ask for it. A Linear that sits under two parents is packed once and stays
    shared. Subclasses of nn.Linear (e.g. PEFT's LoRA layers) are left alone: merge adapters first.
    """
    if not prepack_supported(model):
        return 0
    # Names, not modules: the original layer is dropped as soon as it is replaced, so a model whose weights are
    # in ordinary memory never holds two full copies (a memory-mapped checkpoint stays mapped, and resident as
    # far as it was read, until `_own_remaining_parameters` lets it go).
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    agrees: dict[tuple[int, int, bool], bool] = {}
    packed_by_layer: dict[int, PrepackedLinear] = {}
    for parent, name in slots:
        linear = getattr(parent, name)
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        if agrees.get(shape) is False:
            continue
        packed = packed_by_layer.get(id(linear))
        if packed is None:
            try:
                packed = PrepackedLinear(linear, batch_size_hint)
            except (RuntimeError, AttributeError) as exc:  # ops missing or refused in this torch build
                logger.warning("oneDNN weight prepacking unavailable (%s): keeping nn.Linear", exc)
                break
            if shape not in agrees:
                agrees[shape] = _agrees(linear, packed)
                if not agrees[shape]:
                    logger.warning("oneDNN prepacked linear disagrees with nn.Linear for %s: keeping it", shape)
                    continue
            packed_by_layer[id(linear)] = packed
        setattr(parent, name, packed)
    if packed_by_layer:
        _own_remaining_parameters(model)
    return len(packed_by_layer)


def _own_remaining_parameters(model: torch.nn.Module) -> None:
    """Copy the parameters left (embeddings, norms) out of the checkpoint's memory map.

    transformers maps the safetensors file and the parameters are views of it; packing read every page of it,
    so the whole file stayed resident (~the model's size again in RSS) for as long as any parameter still
    pointed into it. Own copies let the map go."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
