"""Mask proposals (SAM automatic masks, precomputed RLE files, superpixels) and seeding from them.

Importing this package does not import ``transformers`` or scikit-image; the sources that need
them import them when built.
"""

from tag2mask.proposals.base import MaskProposals, ProposalError, ProposalSource

__all__ = ["MaskProposals", "ProposalError", "ProposalSource"]
