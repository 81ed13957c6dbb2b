"""Figures: reconstructions now; masks, attention and rollout maps join here."""
