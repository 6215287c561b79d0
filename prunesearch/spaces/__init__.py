"""Search spaces: trial -> Candidate, and known configurations back into trial parameters."""

from prunesearch.spaces.candidate import Candidate
from prunesearch.spaces.layout import ModelLayout, block_to_units, kept_bits, kept_units, linear_units, linears_in_order, unit_of
from prunesearch.spaces.spaces import (REMOVAL_PARAM, SPACES, BlockwiseSpace, OwlSpace, SearchSpace, VectorSpace,
                                      check_removal_choices, kept_target, make_space, make_study_space, space_names)
from prunesearch.spaces.optishear import Gene, OptiShearSpace  # registers "optishear"
from prunesearch.spaces.levels import LevelSpace  # registers "levels"

__all__ = ["REMOVAL_PARAM", "SPACES", "BlockwiseSpace", "Candidate", "Gene", "LevelSpace", "ModelLayout", "OptiShearSpace",
           "OwlSpace", "SearchSpace", "VectorSpace", "block_to_units", "check_removal_choices", "kept_bits", "kept_target",
           "kept_units", "linear_units", "linears_in_order", "make_space", "make_study_space", "space_names", "unit_of"]
