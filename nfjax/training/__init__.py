"""Training transformers on neural-field data: tasks (what is trained) and the trainer (the loop)."""
