"""Knowledge injection: worlds of fictitious facts, model backends, rank metrics."""
