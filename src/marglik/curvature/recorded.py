"""One batch's recorded layers after the backward pass of the output columns.

:func:`layer_batches` backpropagates the columns U to every recorded layer output in one pass
(:func:`~marglik.curvature.backprop.backprop_columns`); the :class:`LayerBatches` it returns forms
each layer's statistics only when asked, one layer at a time: (a, b) for the diagonal and full
structures, the KFAC sums for ``"kron"`` (:meth:`~marglik.curvature.layers.LayerRecord.kfac`).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from marglik.curvature.backprop import backprop_columns
from marglik.curvature.layers import LayerRecord
from marglik.curvature.local import OwnerRecord, owner_outputs


class LayerBatches:
    """(record, a (N, R, D_in), b (K, N, R, D_out)) per layer of one batch, formed lazily.

    Holds the column gradients w.r.t. the recorded outputs (one list, in layer and call order)
    and forms each layer's (a, b) only when iterated, one layer at a time. Keeping the object
    until the next batch's gradients exist (as the engine does) lets the allocator reuse the
    buffers instead of returning them to the system and faulting them in again.
    """

    def __init__(self, layers: list[LayerRecord], grads: list[Tensor],
                 owners: list[OwnerRecord] | None = None, owner_grads: list[Tensor] | None = None):
        self.layers, self.grads = layers, grads
        self.owners, self.owner_grads = owners or [], owner_grads or []

    def owner_gradients(self) -> dict[str, Tensor]:
        """Per-sample column gradients (K, N, numel) of the owners' parameters, by full name
        (:mod:`marglik.curvature.local`)."""
        grads = iter(self.owner_grads)
        return {name: g for rec in self.owners for name, g in rec.gradients(grads).items()}

    def __iter__(self) -> Iterator[tuple[LayerRecord, Tensor, Tensor]]:
        grads = iter(self.grads)
        for rec in self.layers:
            yield (rec, *rec.data(grads))

    def kfac(self, approx: str) -> Iterator[tuple[LayerRecord, Tensor, Tensor, int]]:
        """(record, A_sum, G_sum, count) per layer (:meth:`LayerRecord.kfac`)."""
        grads = iter(self.grads)
        for rec in self.layers:
            yield (rec, *rec.kfac(grads, approx))


def layer_batches(
    f: Tensor,
    layers: list[LayerRecord],
    U: Tensor | None,
    create_graph: bool = False,
    owners: list[OwnerRecord] | None = None,
    reuse: LayerBatches | None = None,
) -> LayerBatches:
    """Backpropagate the output columns U (K, N, *S, C) of f to every recorded layer output
    (and to the outputs of the recorded owners of other parameters, ``owners``).

    All columns go through one backward pass (:func:`backprop_columns`); the per-layer tensors
    come lazily from iterating the result, so the caller may drop ``f`` (and its graph) first.
    Without layers and owners (or columns) nothing is backpropagated. ``reuse``: the previous
    batch's result, done with: its buffers take this batch's gradients where shapes match.
    """
    owners = owners or []
    if not (layers or owners) or U is None:
        return LayerBatches([], [])
    outs = [o for rec in layers for o in rec.outputs]
    spare = [*reuse.grads, *reuse.owner_grads] if reuse is not None else None
    grads = backprop_columns(f, outs + owner_outputs(owners), U, create_graph, out=spare)
    return LayerBatches(layers, grads[: len(outs)], owners, grads[len(outs):])
