"""Evaluation of frozen and fine-tuned encoders (k-NN now; linear probe and fine-tune build on the same features)."""
