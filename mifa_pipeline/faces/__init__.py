"""Independent face models that judge generated samples (detection, identity, AU estimation)."""
