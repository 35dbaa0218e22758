"""Backbones, the stream model (VGG19 + Bi-LSTM + attention), losses, schedules and training."""
