"""Per-image stage: download, t -> z, resampling onto the template, effect sizes, per-analysis QC."""
