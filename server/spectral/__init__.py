"""Spectral adapters (FourierFT, sDCTFT) and the routed layer that serves many of them at once."""
