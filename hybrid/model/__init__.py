"""The model: recipes (YAML -> validated config, within the limits of ``limits``), ``HybridLM`` built
from them, its decoding state and that state's shapes at any context, the device names, and what
``hybrid info`` prints about a recipe."""
