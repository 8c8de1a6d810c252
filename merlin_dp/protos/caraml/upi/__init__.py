"""The Universal Prediction Interface."""
