"""Fine-tuning spectral adapters on the served base model: training data, trainer and jobs."""
