"""Class maps -> pseudo masks: merge and fill (:mod:`.masks`), PAMR refinement (:mod:`.pamr`),
dense CRF (:mod:`.crf`) and test-time augmentation (:mod:`.tta`)."""
