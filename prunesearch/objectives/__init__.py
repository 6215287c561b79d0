"""Objectives: perplexity, model-wise reconstruction error (Gram trick), compression measures."""

from prunesearch.objectives.lm import perplexity
from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error
from prunesearch.objectives.registry import OBJECTIVES, ObjectiveInputs, directions, objective, reconstruction_pass

__all__ = ["OBJECTIVES", "DenseReference", "ObjectiveInputs", "directions", "objective", "perplexity", "reconstruction_error",
           "reconstruction_pass"]
