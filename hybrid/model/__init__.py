"""The model: recipes (YAML -> validated config), ``HybridLM`` built from them, and its decoding state."""
