"""Training of the bundled tiny models and connectors on the synthetic VQA task (recipe: lab/training.md)."""
