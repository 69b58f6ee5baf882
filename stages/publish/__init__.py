"""publish: models and datasets to the Hugging Face Hub with their cards; a dry run writes the cards and the
plan."""
