"""Evaluation of pretrained encoders: weighted k-NN (knn.py), linear probing (linprobe.py), end-to-end
fine-tuning (finetune.py), on shared feature extraction (features.py) and metrics (metrics.py)."""
