"""Lower bounds of the Laplace evidence and their stochastic estimates (Immer, van der Ouderaa,
van der Wilk, Rätsch & Schölkopf, ICML 2023).

- :mod:`~marglik.evidence.bounds.partitioned`: :class:`PartitionedEvidence`, the
  data-partitioned bound with any curvature structure fitted per data block (Laplace fits);
- :mod:`~marglik.evidence.bounds.kernel`: :class:`KernelBound`, data-, output- and
  parameter-partitioned bounds of the exact-GGN evidence from the function-space rows Λ^½ J
  (:mod:`~marglik.evidence.bounds.rows`), and the single-output estimate;
- :mod:`~marglik.evidence.bounds.partitions`: random and class-grouped blocks of M points.
"""

from marglik.evidence.bounds.kernel import KernelBound
from marglik.evidence.bounds.partitioned import PartitionedEvidence
from marglik.evidence.bounds.partitions import (
    check_partitions,
    class_partitions,
    partition_batches,
    random_partitions,
)

__all__ = ["KernelBound", "PartitionedEvidence", "check_partitions", "class_partitions",
           "partition_batches", "random_partitions"]
