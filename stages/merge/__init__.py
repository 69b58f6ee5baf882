"""merge: slerp (or linear) of a fine-tuned model with its base, tensor by tensor, MergeKit-compatible."""
