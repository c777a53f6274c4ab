"""Hugging Face integration: argument groups for the scripts (:mod:`.arguments`)."""
