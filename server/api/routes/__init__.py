"""HTTP routes: TGI/LoRAX generation, the OpenAI-compatible API, health and info."""
