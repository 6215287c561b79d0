"""prunesearch: search the best way to prune an LLM."""
