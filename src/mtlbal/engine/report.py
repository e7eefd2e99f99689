"""What ran where: the path each shared parameter's per-task gradients took in a step.

Paths (at the parameters):

- ``identity``: the layer-wise activation identity (``G_ij += ⟨(a aᵀ) δ_i, δ_j⟩``, the layer
  input ``a`` ``[N, d_in]`` after im2col for a convolution, its output gradients ``δ_t``), no
  weight gradient formed per task (:mod:`mtlbal.engine.layerwise`);
- ``per-task``: per-task weight gradients rebuilt from ``δ_t`` and the layer input
  (``engine="layerwise"`` where the identity costs more);
- ``batched``: the parameter's own batched backward (``[m, *p.shape]`` per-task gradients from
  one vmapped backward, :mod:`mtlbal.engine.dense`); ``batched (per-task loop)`` where it ran
  as ``m`` plain backward passes: the graph cannot be vmapped (:mod:`mtlbal.engine.fallback`),
  or ``engine="auto"`` found every task's backward large enough on a CPU.

At a cut point the per-task gradients are those of the representation: no parameter path.

Example:
    >>> import torch, mtlbal
    >>> trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    >>> b = mtlbal.Balancer(trunk, aggregator=mtlbal.aggregation.UPGrad())
    >>> z = trunk(torch.randn(4, 64))
    >>> info = b.backward([z.pow(2).mean(), z.sin().mean()])
    >>> info.engine_paths["0.weight"], info.engine_paths["1.weight"]
    ('identity', 'batched')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

__all__ = ["EngineFallbackWarning", "batched_by_design", "describe_paths", "parameter_names"]


class EngineFallbackWarning(UserWarning):
    """A shared parameter's per-task gradients could not use the layer-wise path for a reason
    other than cost (an unsupported module, a functional use, ...) and took the exact batched
    backward instead. Warned once per :class:`~mtlbal.Balancer`; see ``Balancer.describe()``."""


def parameter_names(
    modules: Sequence[nn.Module], params: Sequence[Tensor]
) -> dict[int, tuple[str, str]]:
    """Per parameter id: its qualified name and the type of the module that owns it directly
    (``"-"`` for a tensor passed on its own, named ``param<i>``)."""
    out: dict[int, tuple[str, str]] = {}
    multi = len(modules) > 1
    for k, root in enumerate(modules):
        for mod_name, mod in root.named_modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in out:
                    continue
                full = f"{mod_name}.{name}" if mod_name else name
                if multi:
                    full = f"{k}.{full}"
                out[id(p)] = (full, type(mod).__name__)
    for i, p in enumerate(params):
        out.setdefault(id(p), (f"param{i}", "-"))
    return out


def batched_by_design(modules: Sequence[nn.Module]) -> dict[int, str]:
    """Parameters of known layers that take the exact batched backward by design (no
    layer-wise identity is implemented for them), with the reason: grouped/depthwise and 3-D
    convolutions, transposed convolutions, multi-head attention (its projections are used
    inside ``F.multi_head_attention_forward``, not through a recorded call). These are not
    warned about: for convolutions on real feature maps the batched backward is also what the
    cost model picks."""
    out: dict[int, str] = {}
    for root in modules:
        for mod in root.modules():
            why = None
            if isinstance(mod, nn.MultiheadAttention):
                why = "multi-head attention: projections used functionally (batched backward)"
            elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
                why = "transposed convolution: no identity implemented (batched backward)"
            elif isinstance(mod, nn.Conv3d):
                why = "3-D convolution: no identity implemented (batched backward)"
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1:
                why = "grouped convolution: no identity implemented (batched backward)"
            if why is not None:
                for p in mod.parameters():
                    out.setdefault(id(p), why)
    return out


def describe_paths(
    params: Sequence[Tensor],
    names: Mapping[int, tuple[str, str]],
    paths: Mapping[int, tuple[str, str, bool]] | None,
    header: str,
) -> str:
    """A plain-text table: parameter, owning module, shape, path, why."""
    rows = [("parameter", "module", "shape", "path", "why")]
    for p in params:
        name, owner = names.get(id(p), ("?", "?"))
        if paths is None:
            path, why = "-", "no step at the parameters yet"
        else:
            path, why, _ = paths.get(id(p), ("-", "not reached by any task this step", False))
        rows.append((name, owner, "×".join(map(str, p.shape)) or "scalar", path, why))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [header]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return "\n".join(lines)
