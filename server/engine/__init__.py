"""Serving engine: model runner, continuous-batching scheduler and the generation loop."""
