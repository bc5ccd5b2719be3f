"""DELLA (``della``, ``della_linear``): the MAGPRUNE sparsification of each update, then a consensus.

DELLA-Merging (Deep, Bhardwaj, Majumder, Poria 2024, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling", arXiv:2406.11617; code: declare-lab/della) drops the entries
of each task vector τᵢ = ΔWᵢ at random, like DARE, but with a probability that depends on their
magnitude: in each **row** of τᵢ the entries are ranked by magnitude, ρ = 0 (smallest) … k − 1
(largest), and entry p is kept with probability

    p = (density − ε) + 2ε · ρ / (k − 1)        (spread linearly over [density − ε, density + ε]),

so the mean keep probability of a row is ``density``. The survivors are rescaled by 1/p (the paper's
1/(1 − drop probability)), so E[τ̂ᵢ] = τᵢ entry by entry. Then ``della`` elects signs and takes TIES'
disjoint mean (DELLA's "elect" and "fuse" steps), ``della_linear`` sums Σ λᵢτ̂ᵢ.

Choices, following the authors' code where the paper is vague, and mergekit 0.1.5 (which ships both
names) where it is silent:

* rows are the (out, in) layout's rows of ΔWᵢ = sᵢBᵢAᵢ (the authors' ``rank_magnitude``, mergekit's
  ``della_magprune``: ranks along dim 1 of the weight); a row of one entry is kept with probability
  ``density``; equal magnitudes rank by column index (the lower one as the larger);
* the mask is drawn as DARE's is (`ops.task_vectors.pcg64_uniforms`: one seed per input from the
  merge's ``seed``, a 32-bit uniform u per entry, kept where u < round(p·2³²)), so ``epsilon=0`` gives
  exactly ``dare_ties`` / ``dare_linear`` with the same seed; any chunking gives the same mask;
* ``density=1`` keeps everything and ignores ``epsilon`` (as mergekit does); otherwise
  density ± epsilon must lie in [0, 1];
* ``convention="mergekit"``: mergekit 0.1.5's ``della_magprune`` keeps m ⊙ τ without 1/p (its
  ``rescale``, default true for both methods there, matches the L1 norm instead); its random numbers
  (torch's global ``bernoulli``) are not reproduced.
"""
from __future__ import annotations

from ..ops import chunked
from .task_vectors import Sparsifier, _convention

#: DELLA's magnitude-based sampling, planned over whole tasks and applied chunk by chunk (`ops.chunked.MagPrune`)
MAGPRUNE = Sparsifier(
    "MAGPRUNE", ("density", "epsilon", "seed", "convention"),
    lambda o: chunked.MagPrune(o["density"], o["epsilon"], _convention(o)),
)

__all__ = ["MAGPRUNE"]
