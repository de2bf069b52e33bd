"""Everything about drafts, in one place, low in the house: how they are named and parsed
(:mod:`.grammar`), the cascade of levels and the separate draft model (:mod:`.cascade`), the
n-gram lookup (:mod:`.ngram`), layer-skip sets and their calibration (:mod:`.layer_skip`),
and what ``auto`` weighs and how it decides (:mod:`.auto`). Import the submodules; this
package imports nothing (``auto`` sits above the cost model, the rest below it)."""
