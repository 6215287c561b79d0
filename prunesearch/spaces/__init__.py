"""Search spaces: trial -> Candidate, and known configurations back into trial parameters."""

from prunesearch.spaces.candidate import Candidate
from prunesearch.spaces.layout import ModelLayout, unit_of
from prunesearch.spaces.spaces import SPACES, BlockwiseSpace, OwlSpace, SearchSpace, make_space
from prunesearch.spaces.optishear import Gene, OptiShearSpace  # registers "optishear"

__all__ = ["SPACES", "BlockwiseSpace", "Candidate", "Gene", "ModelLayout", "OptiShearSpace", "OwlSpace", "SearchSpace",
           "make_space", "unit_of"]
