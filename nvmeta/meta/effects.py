"""Effect-size estimators (pooled Hedges' g): registered into :data:`nvmeta.meta.estimators.ESTIMATORS`."""
