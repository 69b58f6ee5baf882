"""train: supervised fine-tuning with TRL (translator on pairs, Hala models on conversations), resumable."""
